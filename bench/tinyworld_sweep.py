# Learnability sweep for the tiny world: optimizer steps (not seconds) to accuracy, per student shape,
# learning rate and task range, with plain cross-entropy (a lower bound for KD). Run on a GPU to explore,
# then multiply by the CPU step time to size the demo. Results: docs/benchmarks.md.
#   python bench/tinyworld_sweep.py '[{"d":64,"L":2,"lr":0.003,"bs":32,"amax":49,"steps":3000,"every":250}]'

import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.getcwd())
from pathlib import Path

from dist_bench.tinyworld import data as D
from dist_bench.tinyworld.build import greedy_accuracy, new_model
from dist_bench.tinyworld.tokenizer import build_tokenizer

dev = "cuda" if torch.cuda.is_available() else "cpu"
tok = build_tokenizer()


def run(d, L, lr, bs, amax, steps, every, seed=0):
    torch.manual_seed(seed)
    D.ARITH_MAX = amax
    # One data dir per process: parallel runs sharing one raced.
    paths = D.write_corpus(Path(f"/tmp/sweepdata{amax}-{os.getpid()}"))
    recs = [json.loads(line) for line in Path(paths["kd_train"]).read_text().splitlines()]
    encs = []
    for r in recs:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"])["input_ids"] + [tok.eos_token_id]
        encs.append((p + c, [-100] * len(p) + c))
    shape = {"hidden_size": d, "num_hidden_layers": L, "num_attention_heads": 4, "intermediate_size": 4 * d}
    m = new_model(tok, shape, seed).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    data_dir = Path(paths["arith_eval"]).parent

    def evaluate() -> tuple[float, float]:
        scores = greedy_accuracy(m, tok, data_dir)
        m.train()
        return round(scores["arith_exact_match"], 3), round(scores["mc_acc"], 3)

    rng = random.Random(seed)
    hist = []
    t0 = time.time()
    for step in range(1, steps + 1):
        batch = rng.sample(encs, bs)
        ml = max(len(x) for x, _ in batch)
        ids = torch.tensor([x + [tok.pad_token_id] * (ml - len(x)) for x, _ in batch], device=dev)
        lab = torch.tensor([y + [-100] * (ml - len(y)) for _, y in batch], device=dev)
        att = (ids != tok.pad_token_id).long()
        loss = m(input_ids=ids, attention_mask=att, labels=lab).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % every == 0:
            hist.append((step, round(loss.item(), 3), *evaluate()))
    return {
        "d": d,
        "L": L,
        "lr": lr,
        "bs": bs,
        "amax": amax,
        "secs": round(time.time() - t0, 1),
        "hist": hist,
    }


if __name__ == "__main__":
    out = os.environ.get("OUT", "/tmp")
    grid = json.loads(sys.argv[1])
    for g in grid:
        r = run(**g)
        print(json.dumps(r), flush=True)
        with open(f"{out}/sweep.jsonl", "a") as f:
            f.write(json.dumps(r) + "\n")
