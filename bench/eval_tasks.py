"""The eval stage at real shape: GSM8K, MMLU and IFEval from local files, each task in its own energy window.

    python bench/eval_tasks.py --out $OUT            (on the GPU machine; results: docs/benchmarks.md)
    python bench/eval_tasks.py --out /tmp/e --smoke  (a tiny shape on CPU: checks the code paths)
    python bench/eval_tasks.py --out $OUT/a --tasks gsm8k,mmlu --mmlu-per-subject 32 [--without-answer-log]

`--without-answer-log` is the baseline of the answer log (harness.AnswerLog, which lets a killed task resume
from the answers it gave): the stage runs every task with no log, as it did before the log existed.

The model is Qwen2-0.5B-shaped (random init, bf16, vocabulary 151,936, tied embeddings). Its tokenizer is the
tiny world's byte-level one padded with added tokens to the model's vocabulary (no Hub download on the GPU
machine), so prompts are a token per byte and the random model's generations decode to "<extra_k>" tokens.
The files are in the benchmarks' real schemas (tests/benchmark_files.py): GSM8K questions (tiny-world sums,
lm-eval's 5 shots from its train file), MMLU all 57 subjects from one file (`subject` column), IFEval rows.
It runs `pipeline.evaluate` as `dist-bench eval --tasks gsm8k,mmlu,ifeval` does, with the Hub off, and
prints per task: the scores (a random model's: near chance, or zero), tokens, energy, J/token, duration,
and whether the tasks' figures sum to the stage's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tests"))  # the real-schema file writers the tests use

from benchmark_files import gsm8k_rows, ifeval_rows, mmlu_rows, mt_bench_101_rows, write_jsonl  # noqa: E402

from dist_bench import pipeline  # noqa: E402
from dist_bench.config import load_config  # noqa: E402
from dist_bench.evaluation.tasks import builtin_root  # noqa: E402
from dist_bench.tinyworld import ASSETS  # noqa: E402
from dist_bench.tinyworld.tokenizer import build_tokenizer  # noqa: E402

QWEN2_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                 tie_word_embeddings=True)  # fmt: skip
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip


def build_model(shape: dict, folder: Path) -> Path:
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    torch.manual_seed(0)
    config = Qwen2Config(**shape, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, torch_dtype="bfloat16")  # fmt: skip
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_files(folder: Path, smoke: bool, mmlu_per_subject: int) -> dict[str, str]:
    sums = [json.loads(line) for line in (ASSETS / "data" / "arith_eval.jsonl").read_text().splitlines()]
    subjects = sorted(
        p.stem.removeprefix("mmlu_") for p in (builtin_root() / "mmlu" / "default").glob("mmlu_*.yaml")
    )
    count = 16 if smoke else 192
    gsm8k = folder / "gsm8k"
    write_jsonl(gsm8k / "test.jsonl", gsm8k_rows(sums[:count]))
    write_jsonl(gsm8k / "train.jsonl", gsm8k_rows(sums[count : count + 8]))
    return {
        "gsm8k": str(gsm8k),
        "mmlu": str(
            write_jsonl(folder / "mmlu" / "test.jsonl", mmlu_rows(subjects, 1 if smoke else mmlu_per_subject))
        ),
        "ifeval": str(write_jsonl(folder / "ifeval.jsonl", ifeval_rows() * (1 if smoke else 16))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument(
        "--judged",
        action="store_true",
        help="instead: MT-Bench-101 (64 dialogues) with the same model as a local judge: the judge benchmarks' "
        "CUDA path (the model under test answers through the local teacher's decode loop on lm-eval's weights)",
    )
    parser.add_argument("--tasks", default="gsm8k,mmlu,ifeval", help="some of gsm8k,mmlu,ifeval")
    parser.add_argument("--mmlu-per-subject", type=int, default=8, help="MMLU questions per subject (57)")
    parser.add_argument("--without-answer-log", action="store_true", help="baseline: no answer log")
    args = parser.parse_args()
    if not set(args.tasks.split(",")) <= {"gsm8k", "mmlu", "ifeval"}:
        parser.error(f"--tasks {args.tasks}: some of gsm8k,mmlu,ifeval, comma-separated")
    if args.without_answer_log:  # every task asked without a log, as before it existed (the stage passes one)
        from dist_bench.evaluation import harness

        with_log = harness.run_lm_eval
        harness.run_lm_eval = lambda *a, cache=None, **k: with_log(*a, **k)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"
    started = time.perf_counter()
    model = build_model(SMOKE if args.smoke else QWEN2_05B, out / "model")
    if args.judged:
        tasks = ["mt_bench_101"]
        data = {"mt_bench_101": str(write_jsonl(out / "data" / "mtbench101.jsonl", mt_bench_101_rows() * 32))}
        judged = [f"eval.judge={json.dumps({'model': str(model), 'dtype': 'bfloat16'})}", "eval.max_new_tokens=128",
                  "eval.judge_max_new_tokens=64"]  # fmt: skip
    else:
        tasks, judged = args.tasks.split(","), []
        files = write_files(out / "data", args.smoke, args.mmlu_per_subject)
        data = {task: files[task] for task in tasks}
    cfg = load_config(None, [
        f"eval.tasks={json.dumps(tasks)}", f"eval.data={json.dumps(data)}", "eval.limit=null",
        "eval.batch_size=64", "eval.max_length=2048", f"output.run_dir={out / 'runs'}",
        "tracking.experiment_name=bench-eval-tasks", *judged,
    ])  # fmt: skip
    parent = pipeline.evaluate(cfg, str(model), dtype="bfloat16")
    metrics = parent.stages[-1].metrics
    per_task = {
        task: {k.removeprefix(f"eval/{task}/"): v for k, v in metrics.items() if k.startswith(f"eval/{task}/")
               and "stderr" not in k}
        for task in tasks
    }  # fmt: skip
    stage = {k: v for k, v in metrics.items() if not k.startswith("eval/")}
    sums_check = {
        "tasks_energy_j": sum(per_task[t].get("energy_j", float("nan")) for t in tasks),
        "stage_total_energy_j": stage.get("total_energy_j"),
        "tasks_duration_s": sum(per_task[t]["duration_s"] for t in tasks),
        "stage_duration_s": stage.get("duration_s"),
        "tasks_tokens": sum(per_task[t]["tokens"] for t in tasks),
        "stage_tokens": stage.get("tokens"),
    }
    result = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "shape": "smoke" if args.smoke else "Qwen2-0.5B (random init, bf16)",
        "backend": "judged: the model under test and the judge through LocalTeacher"
        if args.judged
        else "lm-eval",
        "tasks": per_task,
        "answer_log": not args.without_answer_log,
        "stage": stage,
        "sums": sums_check,
        "wall_s": time.perf_counter() - started,
    }
    (out / "eval_tasks.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
