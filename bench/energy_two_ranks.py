"""Two ranks on two GPUs: rank 0's stage figure must equal the sum of both GPUs' raw counters.

    torchrun --nproc-per-node 2 bench/energy_two_ranks.py --out $OUT     (results: docs/benchmarks.md)

Each rank sees both GPUs (no per-rank CUDA_VISIBLE_DEVICES) and works on cuda:LOCAL_RANK with a different
load; the window must measure only its own GPU and rank 0 must add the two, counting each once.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pynvml
import torch
import torch.distributed as dist

from dist_bench.config import EnergyConfig
from dist_bench.energy.window import EnergyWindow


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    pynvml.nvmlInit()
    handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    dist.barrier()
    torch.cuda.synchronize()
    raw_before = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles]
    window = EnergyWindow(EnergyConfig(codecarbon=False), args.out / f"rank{rank}", "two_ranks")
    with window:
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            for _ in range(4 if rank == 0 else 1):  # rank 0 works harder: the two GPUs differ
                a @ a  # the work is the point
            torch.cuda.synchronize()
            if rank == 1:
                time.sleep(0.02)
        dist.barrier()  # both windows close together, so the raw reads bracket both
    raw_after = [pynvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in handles]
    if rank == 0:
        raw = [(b - a_) / 1000 for a_, b in zip(raw_before, raw_after, strict=True)]
        reading = window.reading
        result = {
            "gpus_in_box": len(handles),
            "raw_counter_j_per_gpu": raw,
            "raw_sum_j": sum(raw[:2]),
            "rank0_combined_gpu_energy_j": reading.gpu_energy_j,
            "combined_vs_raw_sum": reading.gpu_energy_j / sum(raw[:2]) - 1,
            "per_gpu_j": reading.per_gpu_j,
            "gpus": list(reading.gpus),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "energy_two_ranks.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
