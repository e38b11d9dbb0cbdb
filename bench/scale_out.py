"""The kd pipeline on one and on two GPUs: student_train's throughput, and every stage's energy against the
GPUs' own counters read here, outside the tracker (issue 16).

    python bench/scale_out.py --out $OUT --fsdp      (nvidia-h200-x2; results: docs/benchmarks.md)
    python bench/scale_out.py --out /tmp/s --smoke   (CPU, gloo ranks, tiny shapes: checks the code paths)

Models, written under --out: a Qwen2-0.5B-shaped student and a teacher of the same shape (random init, tied
embeddings, vocabulary 151,936), with the tiny world's byte-level tokenizer (the data's tokens are bytes;
the heads have Qwen's width). Data: prompt/completion records of random words, ~1024 tokens each.

`dist-bench kd --nproc 1`, then `--nproc 2`: the same config, their own run folders, one MLflow store.
While they run, a thread here reads NVML's total-energy counter of every GPU every 20 ms. For each stage
run, the counters' increase over the stage's energy window (`energy_window_unix_s` in its summary,
interpolated between reads), summed over the GPUs the run used, is set beside the stage's `gpu_energy_j`.
Goals: student_train tokens/s on 2 GPUs >= 1.8x one GPU; each stage's GPU energy within 1% of the
counters.

A short warm-up run comes first and is not measured (`--warmup-budget`). On a fresh machine the first run
was the slow one: 4.4 s more training loop and 5.2 s more logit caching than the same run repeated
(docs/benchmarks.md, 2026-12-01). The cause is the CUDA driver's JIT cache, empty on a fresh machine: a run
given an empty CUDA_CACHE_PATH on a warm machine was as slow (2026-12-02). Without the warm-up, whichever
world size runs first pays that alone.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_bench import tinyworld

PROJECT = Path(__file__).resolve().parent.parent

QWEN2_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True)  # fmt: skip
SMOKE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip


def write_model(folder: Path, shape: dict[str, int], seed: int) -> str:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**shape, attn_implementation="sdpa"))
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(tinyworld.resolve("tinyworld:teacher"))
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_data(path: Path, records: int, words: int) -> None:
    rng = random.Random(0)
    vocabulary = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))
                  for _ in range(2000)]  # fmt: skip
    with path.open("w") as handle:
        for _ in range(records):
            prompt = " ".join(rng.choices(vocabulary, k=words // 4))
            completion = " " + " ".join(rng.choices(vocabulary, k=words - words // 4))
            handle.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


class CounterReader:
    """NVML's total-energy counter (mJ) of every GPU, read every `every_s` on a thread, with its utilization
    (% of time a kernel ran): a GPU well below 100% in student_train waits on its host or on the other rank."""

    def __init__(self, every_s: float = 0.02) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        uuids = [pynvml.nvmlDeviceGetUUID(h) for h in self.handles]
        self.uuids = [u.decode() if isinstance(u, bytes) else u for u in uuids]
        self.times: list[float] = []
        self.mj: list[list[int]] = []
        self.busy: list[list[int]] = []
        self.every_s, self.stop = every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            t = time.time()
            self.mj.append([self.nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles])
            self.busy.append([self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])
            self.times.append(t)
            time.sleep(self.every_s)

    def joules(self, gpu: int, start: float, end: float) -> float:
        return (self._at(gpu, end) - self._at(gpu, start)) / 1000

    def utilization(self, gpu: int, start: float, end: float) -> float | None:
        inside = [row[gpu] for t, row in zip(self.times, self.busy, strict=False) if start <= t <= end]
        return sum(inside) / len(inside) if inside else None

    def _at(self, gpu: int, t: float) -> float:
        i = min(max(bisect.bisect_left(self.times, t), 1), len(self.times) - 1)
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.mj[i - 1][gpu], self.mj[i][gpu]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0) if t1 > t0 else v1


def run_pipeline(nproc: int, config: Path, out: Path, name: str, overrides: list[str]) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}",
           "DIST_BENCH_PROGRESS_EVERY_S": "600"}  # fmt: skip
    started = time.time()
    subprocess.run([sys.executable, "-m", "dist_bench", "kd", "--nproc", str(nproc), "--config", str(config),
                    *overrides, f"output.run_dir={out / f'runs-{name}'}"], env=env, check=True, cwd=PROJECT)  # fmt: skip
    return time.time() - started


def stage_figures(run_dir: Path, counters: CounterReader | None) -> dict[str, Any]:
    out = {}
    for summary_path in sorted(run_dir.glob("*/*/*.json")):
        summary = json.loads(summary_path.read_text())
        if summary.get("stage") != summary_path.parent.parent.name or "energy_window_unix_s" not in summary:
            continue
        figures = {k: summary["metrics"].get(k) for k in ("tokens_per_s", "gpu_energy_j", "duration_s")}
        figures["gpus"] = summary["energy"].get("gpus", [])
        figures["parallelism"] = summary.get("parallelism")
        if "phase_seconds" in summary:  # student_train: the loop apart from set-up and final save
            figures["phase_seconds"] = summary["phase_seconds"]
            figures["loop_tokens_per_s"] = (
                summary["tokens_processed"] / summary["phase_seconds"]["training_loop"]
            )
        if counters is not None and figures["gpu_energy_j"] is not None:
            start, end = summary["energy_window_unix_s"]
            # the summary names a GPU "<name> (<uuid>)"
            used = [i for i, uuid in enumerate(counters.uuids) if any(uuid in gpu for gpu in figures["gpus"])]
            figures["counter_gpus"] = used
            outside = sum(counters.joules(g, start, end) for g in used)
            figures["counters_j"] = outside
            figures["energy_over_counters"] = figures["gpu_energy_j"] / outside if outside else None
            figures["gpu_utilization_pct"] = [counters.utilization(g, start, end) for g in used]
        out[summary["stage"]] = figures
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True, help="scale_out.json goes here")
    parser.add_argument("--work", type=Path, default=None, help="models, data, runs (default: --out)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU ranks (gloo)")
    parser.add_argument(
        "--nprocs", default="1,2", help="world sizes to run, in order (1 on a one-GPU machine)"
    )
    parser.add_argument("--fsdp", action="store_true", help="also 2 ranks with train.distributed=fsdp (GPUs)")
    parser.add_argument("--also", action="append", default=[], metavar="NAME:KEY=VALUE[,KEY=VALUE]",
                        help="also each world size with these overrides, beside the default run; e.g. "
                        "inline:train.dataloader_workers=0 (repeatable)")  # fmt: skip
    parser.add_argument("--budget", type=int, default=3_000_000, help="train.token_budget")
    parser.add_argument("--warmup-budget", type=int, default=150_000,
                        help="train.token_budget of the unmeasured first run on one process (0: none)")  # fmt: skip
    parser.add_argument("--grad-accum", type=int, default=2, help="train.grad_accum: x 8 sequences per step")
    parser.add_argument("--eval-limit", type=int, default=200, help="documents per eval task (a window of "
                        "seconds: the energy counter moves every 100 ms)")  # fmt: skip
    args = parser.parse_args()
    if any(":" not in spec or "=" not in spec for spec in args.also):
        parser.error("--also: NAME:KEY=VALUE[,KEY=VALUE], e.g. pad64:train.pad_to_multiple_of=64")
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out
    work.mkdir(parents=True, exist_ok=True)
    shape, records, words = (SMOKE, 64, 60) if args.smoke else (QWEN2_05B, 1536, 170)
    teacher = write_model(work / "teacher", shape, 1)
    student = write_model(work / "student", shape, 2)
    write_data(work / "data.jsonl", records, words)
    device = "cpu" if args.smoke else "cuda"
    budget = 20_000 if args.smoke else args.budget
    config = work / "scale_out.yaml"
    config.write_text(json.dumps({
        "name": "scale-out", "pipeline": "kd",
        "teacher": {"model": teacher, "dtype": "float32" if args.smoke else "bfloat16"},
        "student": {"model": student},
        "data": {"train": str(work / "data.jsonl"), "max_length": 1024},
        "logits": {"top_k": 16, "batch_size": 16, "shard_size": 64},
        "train": {"token_budget": budget, "batch_size": 8,
                  "grad_accum": args.grad_accum,
                  "device": device, "precision": "fp32" if args.smoke else "bf16", "checkpoint_every": 1000},
        "tracking": {"reuse_stages": False},  # each world size runs every stage itself
        "eval": {"tasks": ["tiny_arith", "tiny_mc"], "task_dir": str(PROJECT / "configs" / "tasks"),
                 "device": device, "limit": 8 if args.smoke else args.eval_limit},
    }))  # fmt: skip  # JSON is YAML
    counters = None if args.smoke else CounterReader()
    results: dict[str, Any] = {"shape": shape, "records": records, "gpus": torch.cuda.device_count(),
                               "global_batch_sequences": 8 * args.grad_accum}  # fmt: skip
    nprocs = [int(n) for n in args.nprocs.split(",")]
    runs = [(f"nproc_{n}", n, str(n), []) for n in nprocs]
    variants = dict(spec.split(":", 1) for spec in args.also)
    runs += [(f"nproc_{n}_{name}", n, f"{n}-{name}", overrides.split(",")) for n in nprocs
             for name, overrides in variants.items()]  # fmt: skip
    if args.fsdp:  # FSDP2 through TRL's accelerate: the same budget, the student sharded over the 2 GPUs
        runs.append(("nproc_2_fsdp", 2, "2-fsdp", ["train.distributed=fsdp"]))
    if args.warmup_budget:  # first use's one-time costs, paid outside the measured runs
        overrides = [f"train.token_budget={min(args.warmup_budget, budget)}", "eval.limit=8"]
        results["warmup"] = {"wall_s": run_pipeline(1, config, work, "warmup", overrides)}
        results["warmup"]["stages"] = stage_figures(work / "runs-warmup", counters)
    for key, nproc, name, overrides in runs:
        results[key] = {"wall_s": run_pipeline(nproc, config, work, name, overrides)}
        results[key]["stages"] = stage_figures(work / f"runs-{name}", counters)
        print(key, json.dumps(results[key]), flush=True)
        (args.out / "scale_out.json").write_text(
            json.dumps(results, indent=2)
        )  # so far, should a later run fail
    if counters is not None:
        counters.stop.set()
    one, two = (results.get(f"nproc_{n}", {}).get("stages", {}).get("student_train", {}).get("tokens_per_s")
                for n in (1, 2))  # fmt: skip
    ratios = [s.get("energy_over_counters") for key, *_ in runs for s in results[key]["stages"].values()]
    loops = [results.get(f"nproc_{n}", {}).get("stages", {}).get("student_train", {}).get("loop_tokens_per_s")
             for n in (1, 2)]  # fmt: skip
    results["goals"] = {
        "student_train_speedup": two / one if one and two else None,
        "training_loop_speedup": loops[1] / loops[0] if all(loops) else None,
        "fsdp_student_train_speedup": (
            results["nproc_2_fsdp"]["stages"]["student_train"]["tokens_per_s"] / one
            if args.fsdp and one
            else None
        ),
        "speedup_goal": 1.8,
        **{  # the default run's student_train against each --also variant's, stage and loop
            f"nproc_{n}_{figure}_vs_{name}": results[f"nproc_{n}"]["stages"]["student_train"][figure]
            / results[f"nproc_{n}_{name}"]["stages"]["student_train"][figure]
            for n in nprocs
            for name in variants
            for figure in ("tokens_per_s", "loop_tokens_per_s")
        },
        "worst_energy_over_counters": max((abs(r - 1) for r in ratios if r is not None), default=None),
        "energy_goal": 0.01,
    }
    print("goals", json.dumps(results["goals"]), flush=True)
    (args.out / "scale_out.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
