"""Rebuild the tiny world's shipped assets: corpus, tokenizer, untrained student and trained teacher.

    python -m dist_bench.tinyworld.build                      # everything (about 3 min on one GPU)
    python -m dist_bench.tinyworld.build --data-only          # just the corpus JSON lines
    python -m dist_bench.tinyworld.build --undertrained-only  # just student-undertrained (1 min, CPU)

Deterministic for a given device and torch version. The teacher is a 4-layer Llama trained with plain
cross-entropy on `kd_train`; the student-init is a 2-layer Llama with seeded random weights: the
"untrained student" row of the demo table and the starting point of every tiny KD run. The
student-undertrained is the student-init after UNDERTRAINED_STEPS of the same cross-entropy training,
stopped where it gets about a third of the sums right: the policy init of tiny_dpo, whose wrong answers
are the rejected side of its pairs. The run's settings, timings and greedy accuracies go to
`assets/BUILD.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dist_bench.tinyworld import ASSETS
from dist_bench.tinyworld import data as corpus
from dist_bench.tinyworld.tokenizer import build_tokenizer

TEACHER = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}
STUDENT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256}
# The student learns the sums abruptly between about 500 and 800 steps (batch 64, lr 2e-3: 0.07 exact
# match at 500, 0.31 at 600, 0.97 at 800 on CPU); 600 leaves most answers wrong but close.
UNDERTRAINED_STEPS = 600
UNDERTRAINED_SEED = 1


def llama_config(tokenizer: PreTrainedTokenizerFast, shape: dict[str, int]) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **shape,
    )


def new_model(tokenizer: PreTrainedTokenizerFast, shape: dict[str, int], seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(tokenizer, shape))


def train_teacher(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    records: list[dict],
    steps: int,
    device: torch.device,
    seed: int,
    batch_size: int = 64,
    lr: float = 2e-3,
) -> list[float]:
    """Cross-entropy on the completions; returns the loss every 100 steps."""
    encoded = []
    for record in records:
        prompt = tokenizer(record["prompt"])["input_ids"]
        completion = tokenizer(record["completion"])["input_ids"] + [tokenizer.eos_token_id]
        encoded.append((prompt + completion, [-100] * len(prompt) + completion))
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = 100

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(seed)
    losses = []
    for step in range(steps):
        batch = rng.sample(encoded, batch_size)
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            losses.append(round(loss.item(), 4))
    return losses


@torch.no_grad()
def greedy_accuracy(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, data_dir: Path
) -> dict[str, float]:
    """A quick self-check of the build (the demo's table uses lm-eval): exact match and MC accuracy."""
    device = next(model.parameters()).device
    model.eval()
    tokenizer.padding_side = "left"
    arith = [json.loads(line) for line in (data_dir / "arith_eval.jsonl").read_text().splitlines()]
    batch = tokenizer([corpus.arith_prompt(d) for d in arith], return_tensors="pt", padding=True).to(device)
    out = model.generate(
        **batch,
        max_new_tokens=8,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    arith_acc = sum(a.strip() == d["answer"] for a, d in zip(answers, arith, strict=False)) / len(arith)
    mc = [json.loads(line) for line in (data_dir / "mc_eval.jsonl").read_text().splitlines()]
    batch = tokenizer([corpus.mc_prompt(d) + " " for d in mc], return_tensors="pt", padding=True).to(device)
    letters = [tokenizer(letter)["input_ids"][0] for letter in corpus.MC_LETTERS]
    picked = model(**batch).logits[:, -1, letters].argmax(-1).tolist()
    tokenizer.padding_side = "right"
    return {
        "arith_exact_match": arith_acc,
        "mc_acc": sum(p == d["answer"] for p, d in zip(picked, mc, strict=False)) / len(mc),
    }


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    model.to("cpu").save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_undertrained(tokenizer: PreTrainedTokenizerFast, records: list[dict], out: Path) -> dict:
    """student-undertrained: the shipped student-init trained UNDERTRAINED_STEPS on CPU (a minute; CPU so
    that anyone can rebuild it bit for bit). Returns its BUILD.json fields."""
    model = LlamaForCausalLM.from_pretrained(out / "student-init")
    losses = train_teacher(
        model, tokenizer, records, UNDERTRAINED_STEPS, torch.device("cpu"), UNDERTRAINED_SEED
    )
    accuracy = greedy_accuracy(model, tokenizer, out / "data")
    save(model, tokenizer, out / "student-undertrained")
    return {
        "undertrained_command": "python -m dist_bench.tinyworld.build --undertrained-only",
        "undertrained_steps": UNDERTRAINED_STEPS,
        "undertrained_seed": UNDERTRAINED_SEED,
        "undertrained_torch": torch.__version__,
        "undertrained_loss_every_100_steps": losses,
        "undertrained_greedy_accuracy": accuracy,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ASSETS)
    parser.add_argument("--data-only", action="store_true")
    parser.add_argument("--undertrained-only", action="store_true", help="only student-undertrained")
    parser.add_argument("--steps", type=int, default=10000, help="teacher training steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    paths = corpus.write_corpus(args.out / "data", seed=args.seed)
    if args.data_only:
        return
    tokenizer = build_tokenizer()
    records = [json.loads(line) for line in paths["kd_train"].read_text().splitlines()]
    if not args.undertrained_only:
        save(new_model(tokenizer, STUDENT, seed=args.seed + 1), tokenizer, args.out / "student-init")
    undertrained = build_undertrained(tokenizer, records, args.out)
    build_record = args.out / "BUILD.json"
    if args.undertrained_only:
        record = json.loads(build_record.read_text())
        build_record.write_text(json.dumps({**record, **undertrained}, indent=2) + "\n")
        print(json.dumps(undertrained))
        return

    started = time.time()
    teacher = new_model(tokenizer, TEACHER, seed=args.seed)
    losses = train_teacher(teacher, tokenizer, records, args.steps, torch.device(args.device), args.seed)
    seconds = time.time() - started
    accuracy = greedy_accuracy(teacher, tokenizer, args.out / "data")
    save(teacher, tokenizer, args.out / "teacher")
    record = {
        "command": f"python -m dist_bench.tinyworld.build --steps {args.steps} --device {args.device} --seed {args.seed}",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "teacher_shape": TEACHER,
        "student_shape": STUDENT,
        "teacher_steps": args.steps,
        "teacher_train_seconds": round(seconds, 1),
        "teacher_loss_every_100_steps": losses,
        "teacher_greedy_accuracy": accuracy,
        **undertrained,
    }
    (args.out / "BUILD.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("device", "teacher_train_seconds", "teacher_greedy_accuracy")}))


if __name__ == "__main__":
    main()
