"""What the GPUs of this host can send each other: peer access, and NCCL all-reduce time and bus bandwidth
for a Qwen2-0.5B-sized gradient (494 M values, fp32 and bf16), one process per GPU (issue 16).

    NCCL_DEBUG=INFO python bench/interconnect.py --out $OUT     (a 2-GPU machine; docs/benchmarks.md)

Data-parallel training all-reduces every gradient once per optimizer step; where that takes longer than the
backward pass it overlaps with, adding GPUs stops adding throughput. The bus bandwidth is NCCL's own
definition for all-reduce (nccl-tests): bytes x 2 (n-1)/n / time.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

VALUES = 494_032_768  # Qwen2-0.5B's parameters (tied embeddings)


def rank_main(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        grad = torch.ones(VALUES, dtype=dtype, device="cuda")
        for _ in range(2):  # warm-up: communicators, buffers
            dist.all_reduce(grad)
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            dist.barrier()
            torch.cuda.synchronize()
            start = time.perf_counter()
            dist.all_reduce(grad)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        size = grad.numel() * grad.element_size()
        results[str(dtype).removeprefix("torch.")] = {
            "bytes": size,
            "median_s": seconds,
            "bus_gb_per_s": size * 2 * (world - 1) / world / seconds / 1e9,
            "times_s": times,
        }
        del grad
    if rank == 0:
        peer = {f"{a}->{b}": torch.cuda.can_device_access_peer(a, b) for a in range(world) for b in range(world)
                if a != b}  # fmt: skip
        report = {"gpus": world, "peer_access": peer, "all_reduce": results,
                  "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}  # fmt: skip
        (out / "interconnect.json").write_text(json.dumps(report, indent=2))
        print(json.dumps(report), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    world = torch.cuda.device_count()
    mp.spawn(rank_main, args=(world, 29511, args.out), nprocs=world)


if __name__ == "__main__":
    main()
