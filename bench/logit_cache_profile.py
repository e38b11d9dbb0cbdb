"""Where the logit_caching stage's time goes beyond the bare forward (torch.profiler, CUDA and host).

python bench/logit_cache_profile.py --out $OUT     (GPU; the op table and a host-side phase breakdown)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from logit_cache import QWEN2_15B, fresh_model, random_examples

from dist_bench.config import load_config
from dist_bench.teacher import logit_cache


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top-k", type=int, default=64)
    args = parser.parse_args()
    model = fresh_model(QWEN2_15B, torch.device("cuda"))
    model.model.norm.weight.data *= 10.2  # ~1.5 nats (bench/logit_cache.py's scaling)
    examples = random_examples(128, 1024, QWEN2_15B["vocab_size"], 3)
    cfg = load_config(None, [f"logits.top_k={args.top_k}", "logits.cover=1.0", "logits.batch_size=16",
                             "logits.shard_size=128"])  # fmt: skip
    out = Path(tempfile.mkdtemp())
    logit_cache.cache_logits(model, examples[:32], 0, cfg, out)  # warm-up
    shutil.rmtree(out)
    out.mkdir()
    phases: dict[str, float] = {}
    real_shard, real_write = logit_cache._teacher_shard, logit_cache._write_shard

    def timed(name, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0

        return wrapper

    logit_cache._teacher_shard = timed("teacher_shard", real_shard)
    logit_cache._write_shard = timed("write_shard", real_write)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logit_cache.cache_logits(model, examples, 0, cfg, out)
        torch.cuda.synchronize()
        total = time.perf_counter() - t0
    print("PHASES", {**phases, "total": total, "tok_per_s": 128 * 1024 / total})
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    print(table)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
