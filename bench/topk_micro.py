"""The pieces of the logit_caching stage's LM-head work, timed alone on one [4096, 151936] bf16 chunk.

    python bench/topk_micro.py          (GPU; prints ms per chunk and a JSON line; results: docs/benchmarks.md)

torch.topk directly; the tile statistics (one max per 128 columns and the row's log-sum-exp) by the
Triton kernel against torch's amax + logsumexp, checked equal; the tiled top-k given the tile maxima,
checked to find torch.topk's values; the whole cache_format.select; the head GEMM itself.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dist_bench.teacher import cache_format

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


def torch_tile_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiles = x.shape[1] // cache_format.TOPK_TILE
    whole = x[:, : tiles * cache_format.TOPK_TILE].unflatten(1, (tiles, cache_format.TOPK_TILE))
    return whole.amax(-1), torch.logsumexp(x.float(), -1)


def main() -> None:
    torch.manual_seed(0)
    x = (torch.randn(4096, V, device="cuda") * 10).bfloat16()
    out: dict[str, object] = {"gpu": torch.cuda.get_device_name(), "rows": 4096, "vocab": V}
    tile_max, lse = cache_format.tile_stats(x)
    want_max, want_lse = torch_tile_stats(x)
    out["tile_max_equal"] = torch.equal(tile_max, want_max)
    out["lse_max_abs_err"] = float((lse - want_lse).abs().max())
    out["ms_tile_stats_triton"] = milliseconds(lambda: cache_format.tile_stats(x))
    out["ms_tile_stats_torch"] = milliseconds(lambda: torch_tile_stats(x))
    for k in (16, 64, 256):
        reference = x.topk(k, -1).values
        got = cache_format.tiled_topk(x, k, tile_max)
        out[f"k{k}_tiled_same_values"] = torch.equal(got.values, reference)
        out[f"k{k}_ms_torch_topk"] = milliseconds(lambda k=k: x.topk(k, -1))
        out[f"k{k}_ms_tiled_topk"] = milliseconds(lambda k=k: cache_format.tiled_topk(x, k, tile_max))
        out[f"k{k}_ms_select"] = milliseconds(lambda k=k: cache_format.select(x, k, 1.0, 1 / 8))
    hidden = torch.randn(4096, 1536, device="cuda").bfloat16()
    weight = (torch.randn(V, 1536, device="cuda") * 0.02).bfloat16()
    out["ms_head_gemm"] = milliseconds(lambda: hidden @ weight.t())
    print("topk_micro", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
