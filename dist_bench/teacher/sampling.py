"""The next token from a decode step's logits, as `generate` chooses it, in one pass over them on CUDA.

`generate` samples with `multinomial(softmax(warped fp32 logits))`; on CUDA torch draws one sample as an
exponential race, argmax_i p_i / E_i with E_i ~ Exp(1) (ATen's `multinomial`, n_sample 1). At a batch
of 1024 rows and a 152k vocabulary that is six passes over a [rows, vocab] fp32 tensor per token
(upcast, temperature, softmax, exponential, divide, argmax): ~15% of a 1.5B teacher's decode step on an
H200. `race_sample` runs the same race in one read of the bf16 logits (in logs: argmax_i l_i / T - log
E_i, the same distribution), with Triton's Philox keyed by a seed the decode step advances on the GPU,
so a captured step draws new numbers on every replay. No library offers this for a transformers model
(FlashInfer's samplers are not in the image and bring their own JIT); it is ~30 lines.

Only plain temperature sampling takes this path; top-k and top-p keep transformers' warpers (their sort
needs the whole row) and torch's multinomial. On CPU everything is `generate`'s own ops, which is what
lets the tests compare completions token for token.
"""

from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of torch; without it every path is torch's
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK = 4096  # vocabulary columns per iteration of a row's program


def race_sample_available(logits: torch.Tensor) -> bool:
    return triton is not None and logits.is_cuda


def race_sample(logits: torch.Tensor, temperature: float, seed: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab] (any float dtype), drawn from softmax(logits /
    temperature); `seed` (int64 [1] on the same device) keys the draw."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    _race_kernel[(rows,)](logits, logits.stride(0), vocab, 1.0 / temperature, seed, out, BLOCK=BLOCK)
    return out


if triton is not None:

    @triton.jit
    def _race_kernel(
        logits_ptr, row_stride, vocab, inverse_temperature, seed_ptr, out_ptr, BLOCK: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        seed = tl.load(seed_ptr)
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_at = tl.zeros([BLOCK], tl.int64)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK).to(tl.int64)
            inside = cols < vocab
            logit = tl.load(logits_ptr + row * row_stride + cols, mask=inside, other=float("-inf"))
            uniform = tl.rand(seed, row * vocab + cols)  # [0, 1): E = -log(u) ~ Exp(1)
            key = logit.to(tl.float32) * inverse_temperature - tl.log(-tl.log(uniform))
            key = tl.where(inside, key, float("-inf"))
            better = key > best
            best = tl.where(better, key, best)
            best_at = tl.where(better, cols, best_at)
        top = tl.max(best, 0)
        tl.store(out_ptr + row, tl.min(tl.where(best == top, best_at, vocab), 0))
