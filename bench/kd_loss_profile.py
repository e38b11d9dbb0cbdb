"""Where the KD loss spends its time beyond the SFT head, at Qwen2-0.5B shape on one GPU.

    python bench/kd_loss_profile.py --out $OUT        (results: docs/benchmarks.md)

First checks the fused path's Triton kernels (student/kernels.py) against the dense reference on the GPU
in fp32 (every divergence, T = 1 and 2, several vocabulary tiles; the CPU tests cover the torch twins).
Then times forward+backward of (a) TRL's fused log-prob head alone (what SFT pays) and (b) losses.kd_loss
(fused path, top-64, forward_kl, renormalize; chunk sizes 1024 and 4096) on the same hidden states, and
prints the profiler's top CUDA kernels of (b).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from trl.kernels import ChunkedLogProbFunction

from dist_bench.student.losses import DIVERGENCES, kd_loss, kd_loss_dense


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def check_triton_against_dense() -> dict[str, float]:
    """Largest absolute difference of loss and gradients, fused (Triton) vs dense, fp32, per variant."""
    torch.manual_seed(1)
    n, h_dim, vocab, k = 300, 64, 70_000, 64  # three vocabulary tiles, the last one partial
    hidden = torch.randn(n, h_dim, device="cuda")
    weight = 0.3 * torch.randn(vocab, h_dim, device="cuda")
    bias = 0.1 * torch.randn(vocab, device="cuda")
    targets = torch.randint(0, vocab, (n,), device="cuda")
    teacher = torch.log_softmax(2 * torch.randn(n, vocab, device="cuda"), -1).topk(k)
    worst = {}
    for divergence in DIVERGENCES:
        for temperature in (1.0, 2.0):
            results = []
            for fn in (kd_loss, kd_loss_dense):
                leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
                out = fn(*leaves, targets, teacher.indices, teacher.values, temperature=temperature,
                         ce_weight=0.3, divergence=divergence, chunk_size=128)  # fmt: skip
                out.loss.backward()
                results.append([out.loss, out.ce, out.divergence, *(x.grad for x in leaves)])
            worst[f"{divergence}_T{temperature:g}"] = max(
                float((a - b).abs().max()) for a, b in zip(*results, strict=True)
            )
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    n, h_dim, vocab, k = 8184, 896, 151_936, 64
    hidden = (torch.randn(n, h_dim, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, h_dim, device="cuda") * 0.02).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    ids = torch.randint(0, vocab, (n, k), device="cuda")
    logprobs = torch.log_softmax(torch.randn(n, k, device="cuda"), -1) - 0.2

    def sft_head() -> None:
        lp = ChunkedLogProbFunction.apply(
            hidden, weight, None, targets, 1.0, 32768, None, 1.0, ("log_probs",)
        )[0]
        (-lp.mean()).backward()

    def kd() -> None:
        kd_loss(hidden, weight, None, targets, ids, logprobs).loss.backward()

    def kd_4096() -> None:
        kd_loss(hidden, weight, None, targets, ids, logprobs, chunk_size=4096).loss.backward()

    result = {
        "triton_vs_dense_fp32_max_abs_diff": check_triton_against_dense(),
        "sft_head_ms": timed(sft_head),
        "kd_loss_ms": timed(kd),
        "kd_loss_chunk4096_ms": timed(kd_4096),
    }
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            kd()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    print(json.dumps(result, indent=2))
    print(table)
    (args.out / "kd_loss_profile.json").write_text(json.dumps(result, indent=2))
    (args.out / "kd_loss_profile.txt").write_text(table)


if __name__ == "__main__":
    main()
