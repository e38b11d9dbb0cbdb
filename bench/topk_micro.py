"""The pieces of the logit_caching stage's LM-head work, timed alone on one [4096, 151936] bf16 chunk.

    python bench/topk_micro.py          (GPU; prints ms per chunk; results: docs/benchmarks.md)

torch.topk directly, and in two stages (per vocabulary tile, then over the tiles' winners; exact, same
values); torch.logsumexp in fp32 against the fold kernel's one-pass log-sum-exp; the head GEMM itself.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_bench.teacher.logit_cache import _log_sum_exp

V = 151_936


def milliseconds(fn: Callable[[], object], repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / repeats * 1000, 3)


def two_stage(x: torch.Tensor, k: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = x.shape
    pad = (-vocab) % width
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=-float("inf"))
    tiles = x.view(rows, -1, width).topk(k, dim=-1)
    base = (torch.arange(x.shape[1] // width, device=x.device) * width)[None, :, None]
    winners = tiles.values.reshape(rows, -1).topk(k, dim=-1)
    return winners.values, (tiles.indices + base).reshape(rows, -1).gather(1, winners.indices)


def main() -> None:
    torch.manual_seed(0)
    x = (torch.randn(4096, V, device="cuda") * 10).bfloat16()
    for k in (16, 64, 256):
        reference = x.topk(k, -1).values
        print("k", k, "direct bf16 ms", milliseconds(lambda k=k: x.topk(k, -1)))
        for width in (1187, 4748, 9496, 18992):
            same = torch.equal(two_stage(x, k, width)[0], reference)
            ms = milliseconds(lambda k=k, width=width: two_stage(x, k, width))
            print("  two-stage width", width, "ms", ms, "same values", same)
    print("logsumexp fp32 ms", milliseconds(lambda: torch.logsumexp(x.float(), -1)))
    print("fold-kernel log-sum-exp ms", milliseconds(lambda: _log_sum_exp(x)))
    hidden = torch.randn(4096, 1536, device="cuda").bfloat16()
    weight = (torch.randn(V, 1536, device="cuda") * 0.02).bfloat16()
    print("head GEMM ms", milliseconds(lambda: hidden @ weight.t()))


if __name__ == "__main__":
    main()
