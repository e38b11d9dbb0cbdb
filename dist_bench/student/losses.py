"""Knowledge-distillation loss against an offline top-k teacher cache, chunked over positions.

    loss = ce_weight * CE + (1 - ce_weight) * T^2 * D        (every term a mean over the N positions)

CE is the cross-entropy of the student's full-vocabulary logits s = h W^T (+ b) at T = 1 against the
next-token targets. D compares teacher and student at temperature T. Notation, per position:

    z = s / T,   log q = log_softmax(z) over the full vocabulary V,   q_k = q at the K cached ids,
    l_k = cached teacher log-probs (full-vocabulary log-softmax at T = 1, so sum_k exp(l_k) <= 1).

tail="renormalize" (the K cached ids are the whole support):
    teacher  p_k = softmax(l / T)_k over the K entries.
    forward_kl   D = sum_k p_k (log p_k - log q_k), with q_k the FULL-vocabulary student probabilities.
                 This is the loss of `dist_bench.student.kd.kd_loss`; it also pushes student mass into the
                 top-k (D >= -log sum_k q_k > 0 even when the student agrees with the teacher on the k ids).
    reverse_kl   D = sum_k q~_k (log q~_k - log p_k), with the student renormalised over the K ids:
                 q~ = softmax(z at the ids) (a proper distribution on the teacher's support).
    jsd          JSD_beta(p, q~) as below.
tail="bucket" (K + 1 entries: the cached ids plus one bucket for the rest of the vocabulary):
    teacher  rest = max(1 - sum_k exp(l_k), eps) (eps = 1e-8; the cache is at T = 1, so the rest-mass
             is only known there), then log p = log_softmax([l_1 .. l_K, log rest] / T).
    student  log q_k (full vocabulary, at T) and log q_rest = logsumexp(z over the non-cached ids) - lse(z),
             computed with the cached ids masked to -inf, not as log1p(-sum q_k) (which loses precision).
    forward_kl / reverse_kl / jsd on these K+1-way distributions. Needs K < V.

Generalised JSD, TRL's convention (`GKDTrainer.generalized_jsd_loss`, GKD paper Eq. 1), P the teacher and
Q the student distribution:
    M = beta * P + (1 - beta) * Q,   JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M);
and, as in TRL, beta = 0 means KL(P || Q) (forward) and beta = 1 means KL(Q || P) (reverse), on the
same P, Q (for renormalize: q~, not the full-vocabulary q_k).

Duplicate ids in a row (only possible when K > the teacher's vocabulary, which the project forbids)
are not merged: the formulas above are then applied with the duplicate entries counted twice (the
analytic gradient is still that formula's exact gradient).
Padding: a row may carry fewer real entries than K (the logit cache's format 2 keeps a variable number per
position). A padded entry has teacher log-prob -inf and repeats one of the row's real ids; it is absent from
every formula above: P = 0 there, the renormalised student excludes it, and its terms and g are 0 (masked,
never computed as 0 * inf). Every row needs at least one real entry.
Ids must lie in [0, V) and targets must be real token ids (no -100): neither is checked, to avoid host
syncs.

`kd_loss` never materialises [N, V] logits: for every chunk of rows it computes the logits, the loss
terms and dLoss/dlogits analytically (as Liger-Kernel's fused-linear losses do), then folds the latter
into dL/dh (rows of the chunk) and dL/dW, dL/db (accumulated in fp32). Peak memory is a few [chunk, V]
fp32 buffers plus the [N, H] and [V, H] gradients. With g = dD/dlog Q (entries treated as independent):
    forward_kl  g = -P            reverse_kl  g = Q (log Q - log P + 1)
    jsd         g = (1 - beta) Q (log Q - log M)
and, with S = sum(g), the chain rule through the student's parametrisation gives dD/dz:
    full-vocabulary log q_k (renormalize forward_kl, and bucket):
        dD/dz = scatter_ids(g_k) - S q  [+ g_rest * q_j / q_rest on the non-cached ids j, bucket]
    renormalised q~ (renormalize reverse_kl / jsd):  dD/dz_ids = g - S q~, 0 elsewhere
and dLoss/ds = (ce_weight (softmax(s) - onehot(target)) + (1 - ce_weight) T dD/dz) / N.
`kd_loss_dense` states the same maths plainly with full [N, V] logits and autograd (tests, reading).

impl="fused" (default; tail="renormalize" only: bucket always runs the chunked path) never holds more
than one [chunk, VOCAB_TILE] logit tile: each tile is folded into log-sum-exp statistics (T = 1 for CE,
and T for forward KL) while the target's and the K cached ids' logits are read from it
(`student/kernels.py`: Triton on CUDA, torch elsewhere); backward recomputes each tile and overwrites it
with dLoss/dlogits (the dense softmax terms, then the K ids' entries, computed on [N, K]) before the two
gradient GEMMs, as TRL's chunked log-prob head (the SFT loss) does for CE alone. So KD pays the SFT head's
GEMMs plus O(N K) work. Precision: every logit is rounded to the compute dtype (bf16 on GPU) before the
fp32 fold, as in TRL's head; fp64 inputs stay fp64 throughout (the tests' reference precision).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from dist_bench.student.kernels import fold_tile, gradient_tile

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("renormalize", "bucket")
IMPLS = ("fused", "chunked")
# Positions per chunk when the config leaves it unset. renormalize: one [4096, VOCAB_TILE] logit tile at a
# time, TRL's own token tile (on an H200 at vocabulary 151,936: 17.1 ms forward+backward at 4096 against
# 20.0 ms at 1024, and 16.8 ms for the SFT head; docs/benchmarks.md). bucket: its [chunk, V] fp32 buffers.
DEFAULT_CHUNK = {"renormalize": 4096, "bucket": 1024}
VOCAB_TILE = 32768  # the kernel's vocabulary tile: TRL's own (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)
REST_EPS = 1e-8  # floor of the teacher's rest-mass (bucket tail): rounding can make 1 - sum p <= 0


class KDLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    ce: torch.Tensor  # detached
    divergence: torch.Tensor  # detached, before the T^2 and (1 - ce_weight) factors


def kd_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    tail: str = "renormalize",
    chunk_size: int | None = 1024,
    impl: str = "fused",
) -> KDLossOutput:
    """The loss of the module docstring, chunk_size positions at a time; see there for the maths.
    impl="fused" (tail="renormalize" only) goes through TRL's log-prob kernel, "chunked" never does."""
    _validate(hidden, weight, bias, targets, teacher_ids, teacher_logprobs, temperature, ce_weight)
    _validate_options(divergence, tail, jsd_beta, chunk_size, teacher_ids.shape[1], weight.shape[0])
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    options = (temperature, ce_weight, divergence, jsd_beta, tail, chunk_size)
    tensors = (hidden, weight, bias, targets, teacher_ids, teacher_logprobs)
    needs = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in tensors[:3])
    if impl == "fused" and tail == "renormalize":
        loss, ce, div = _TiledKD.apply(*tensors, options)
    elif not any(needs):  # nothing to differentiate: skip all gradient work and the autograd node
        loss, ce, div, _ = _chunked(*tensors, *options, needs=needs)
    else:
        loss, ce, div = _ChunkedKD.apply(*tensors, options, needs)
    return KDLossOutput(loss, ce.detach(), div.detach())


class _ChunkedKD(torch.autograd.Function):
    """Forward computes the gradients too; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_ids, teacher_logprobs, options, needs):  # type: ignore[override]
        loss, ce, div, grads = _chunked(
            hidden, weight, bias, targets, teacher_ids, teacher_logprobs, *options, needs=needs
        )
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(ce, div)
        return loss, ce, div

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div):  # type: ignore[override]
        # No `if grad_loss == 1` shortcut: that would be a host sync.
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*scaled, None, None, None, None, None)


class _TiledKD(torch.autograd.Function):
    """tail="renormalize", vocabulary tile by vocabulary tile (the module docstring's impl="fused").

    Forward: per chunk of positions and tile of the vocabulary, one [chunk, VOCAB_TILE] logit tile in the
    compute dtype, folded by `kernels.fold_tile` into log-sum-exp statistics (T = 1, and T for forward KL)
    while the target's and the K ids' logits are read from it. The loss and every per-row coefficient of
    its gradient then follow on [N] and [N, K] tensors. Backward recomputes each tile, turns it into
    dLoss/dlogits in place (`kernels.gradient_tile`) and accumulates the two gradient GEMMs in fp32, as
    TRL's SFT head does: KD costs the SFT head's GEMMs plus O(N K) work. No host syncs.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher_ids, teacher_logprobs, options):  # type: ignore[override]
        temperature, ce_weight, divergence, jsd_beta, _, chunk_size = options
        device, n, k = hidden.device, hidden.shape[0], teacher_ids.shape[1]
        compute = (
            torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        )
        acc, t = _compute_dtype(hidden), float(temperature)
        targets, ids = targets.long().contiguous(), teacher_ids.long().contiguous()
        forward_kl = divergence == "forward_kl"  # (jsd at beta 0 is KL(P || q~): renormalised, as below)
        two_temps = forward_kl and t != 1.0  # log q_k needs the log-sum-exp of s / T as well
        max1, sum1 = hidden.new_full((n,), -math.inf, dtype=acc), hidden.new_zeros((n,), dtype=acc)
        max_t, sum_t = (
            (torch.full_like(max1, -math.inf), torch.zeros_like(sum1)) if two_temps else (None, None)
        )
        target_logit, id_logits = hidden.new_zeros((n,), dtype=acc), hidden.new_zeros((n, k), dtype=acc)
        w, b = weight.to(compute), None if bias is None else bias.to(compute)  # one cast, not one per chunk
        for rows, cols, tile in _tiles(hidden, w, b, chunk_size):
            fold_tile(tile, cols.start, targets[rows], ids[rows], max1[rows], sum1[rows],
                      None if max_t is None else max_t[rows], None if sum_t is None else sum_t[rows],
                      target_logit[rows], id_logits[rows], 1.0 / t)  # fmt: skip
        lse1 = max1 + sum1.log()
        lse_t = max_t + sum_t.log() if two_temps else lse1
        # forward KL: the full-vocabulary log q at the ids; else the student renormalised over the K ids
        logp = _teacher_logp(teacher_logprobs.to(acc), t, "renormalize")
        logq = (
            id_logits / t - lse_t[:, None]
            if forward_kl
            else torch.log_softmax((id_logits / t).masked_fill(logp == -math.inf, -math.inf), -1)
        )
        d_rows, g = _divergence_and_grad(logp, logq, divergence, jsd_beta)
        ce, div = (lse1 - target_logit).mean(), d_rows.mean()
        loss = ce_weight * ce + (1.0 - ce_weight) * t * t * div

        # dLoss/ds = a (softmax(s) - onehot(target)) + b dD/dz, with dD/dz from the module docstring.
        a, b_ = ce_weight / n, (1.0 - ce_weight) * t / n
        total = g.sum(-1)
        coef1 = torch.full_like(lse1, a)
        coef_t = -b_ * total if two_temps else None
        if forward_kl and not two_temps:
            coef1 = coef1 - b_ * total  # softmax(s / T) is softmax(s)
        sparse = b_ * g if forward_kl else b_ * (g - total[:, None] * logq.exp())
        # Dense part at the ids, plus the sparse part summed over the row's copies of an id (a duplicate id
        # gets every copy's share, as the formula's gradient does).
        at_ids = coef1[:, None] * (id_logits - lse1[:, None]).exp() - a * (ids == targets[:, None])
        if coef_t is not None:
            at_ids += coef_t[:, None] * (id_logits / t - lse_t[:, None]).exp()
        first = (ids[:, :, None] == ids[:, None, :]).to(torch.uint8).argmax(-1)  # first copy of each id
        at_ids += torch.zeros_like(sparse).scatter_add_(1, first, sparse).gather(1, first)
        ctx.save_for_backward(hidden, weight, bias, targets, ids, lse1, lse_t, coef1,
                              coef_t if coef_t is not None else lse1, at_ids)  # fmt: skip
        ctx.two_temps, ctx.a, ctx.inv_t, ctx.chunk_size, ctx.compute = (
            two_temps,
            a,
            1.0 / t,
            chunk_size,
            compute,
        )
        ce, div = ce.detach(), div.detach()
        ctx.mark_non_differentiable(ce, div)
        return loss, ce, div

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_div):  # type: ignore[override]
        hidden, weight, bias, targets, ids, lse1, lse_t, coef1, coef_t, at_ids = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _compute_dtype(hidden)
        scale = grad_loss.to(acc)  # a device scalar: no `if grad == 1` host sync
        coef1, coef_t, at_ids = coef1 * scale, coef_t * scale if ctx.two_temps else None, at_ids * scale
        coef_target = (ctx.a * scale).expand_as(coef1).contiguous()
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        w = weight.to(ctx.compute)
        b = None if bias is None else bias.to(ctx.compute)
        for rows, cols, tile in _tiles(hidden, w, b, ctx.chunk_size) if need_h or need_w or need_b else ():
            gradient_tile(tile, cols.start, targets[rows], lse1[rows], lse_t[rows] if ctx.two_temps else None,
                          coef1[rows], coef_t[rows] if coef_t is not None else None, coef_target[rows],
                          ids[rows], at_ids[rows], ctx.inv_t)  # fmt: skip
            if grad_h is not None:
                _addmm_acc(grad_h[rows], tile, w[cols])
            if grad_w is not None:
                _addmm_acc(grad_w[cols], tile.t(), hidden[rows].to(ctx.compute))
            if grad_b is not None:
                grad_b[cols] += tile.sum(0, dtype=acc)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None,
        )  # fmt: skip


def _tiles(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk_size: int | None
) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(positions, vocabulary entries, their logit tile) over all [N, V] logits, one reused buffer; the
    tile is the caller's to overwrite until the next one is made."""
    n, v = hidden.shape[0], weight.shape[0]
    step, width = n if chunk_size is None else min(chunk_size, n), min(VOCAB_TILE, v)
    buffer = torch.empty((step, width), dtype=weight.dtype, device=hidden.device)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        h = hidden[rows].to(weight.dtype)
        for v0 in range(0, v, width):
            cols = slice(v0, min(v0 + width, v))
            tile = buffer[: rows.stop - rows.start, : cols.stop - cols.start]
            torch.mm(h, weight[cols].t(), out=tile)
            if bias is not None:
                tile.add_(bias[cols])
            yield rows, cols, tile


def _addmm_acc(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b in acc's dtype (fp32 for bf16 inputs), without rounding a @ b to the inputs' dtype
    first (TRL's `_addmm_fp32`: summing bf16-rounded products over tiles biases training)."""
    if acc.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and acc.dtype == torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    ce_weight: float,
    divergence: str,
    jsd_beta: float,
    tail: str,
    chunk_size: int | None,
    *,
    needs: tuple[bool, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    n, v = hidden.shape[0], weight.shape[0]
    dtype = _compute_dtype(hidden)
    t = float(temperature)
    step = n if chunk_size is None else min(chunk_size, n)
    want_grad = any(needs)
    # Per-row dLoss/ds = a (softmax(s) - onehot) + b dD/dz; the 1/N of the mean is folded in here.
    a, b = ce_weight / n, (1.0 - ce_weight) * t / n
    logp_teacher = _teacher_logp(teacher_logprobs.to(dtype), t, tail)
    ce_sum = hidden.new_zeros((), dtype=dtype)
    div_sum = hidden.new_zeros((), dtype=dtype)
    grad_h = torch.empty_like(hidden) if needs[0] else None
    # fp32 (or fp64) accumulators over chunks; cast to the parameter dtypes at the end.
    grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needs[1] else None
    grad_b = torch.zeros(v, dtype=dtype, device=weight.device) if needs[2] else None
    with torch.no_grad():
        for start in range(0, n, step):
            rows = slice(start, start + step)
            h, tgt, ids = hidden[rows], targets[rows, None], teacher_ids[rows]
            s = F.linear(h, weight, bias).to(dtype)  # [C, V]: the only full-vocabulary buffers are per chunk
            lse1 = torch.logsumexp(s, -1, keepdim=True)
            ce_sum += (lse1 - s.gather(1, tgt)).sum()
            if want_grad:
                grad = (s - lse1).exp_().mul_(a)  # a softmax(s) - a onehot(target)
                grad.scatter_add_(1, tgt, grad.new_full(tgt.shape, -a))
            # From here on s is only needed as z = s / T: reuse its buffer (it is ours, not the caller's).
            z = s.div_(t) if t != 1.0 else s
            lse = torch.logsumexp(z, -1, keepdim=True) if t != 1.0 else lse1
            zk = z.gather(1, ids)
            if tail == "bucket":
                lse_rest = torch.logsumexp(z.scatter_(1, ids, -math.inf), -1, keepdim=True)  # z: ids masked
                logq = torch.cat([zk, lse_rest], -1) - lse
            elif divergence == "forward_kl":
                logq = zk - lse  # full-vocabulary log q at the ids: not normalised over the K
            else:  # renormalised over the row's ids, padding excluded
                logq = torch.log_softmax(zk.masked_fill(logp_teacher[rows] == -math.inf, -math.inf), -1)
            d_rows, g = _divergence_and_grad(logp_teacher[rows], logq, divergence, jsd_beta)
            div_sum += d_rows.sum()
            if not want_grad:
                del s, z  # free this chunk's [C, V] buffer before the next one is allocated
                continue
            total = g.sum(-1, keepdim=True)
            if tail == "bucket":
                # Non-cached j: g_rest q_j / q_rest - S q_j = exp(z_j - lse_rest) (g_rest - S q_rest);
                # written so that a tiny q_rest never multiplies an underflowed q_j.
                # At the ids: g_k - S q_k, the -S q_k written with scatter_ (not added) so that an id
                # listed twice still gets it once, as autograd through the formula would.
                q_rest = (lse_rest - lse).exp()
                z.sub_(lse_rest).exp_().mul_(b * (g[:, -1:] - total * q_rest))  # 0 at the ids
                grad.add_(z.scatter_(1, ids, -b * total * (zk - lse).exp()))
                grad.scatter_add_(1, ids, b * g[:, :-1])
            elif divergence == "forward_kl":
                grad.add_(z.sub_(lse).exp_().mul_(-b * total))
                grad.scatter_add_(1, ids, b * g)
            else:
                grad.scatter_add_(1, ids, b * (g - total * logq.exp()))
            del s, z  # free the [C, V] buffer before the matmuls allocate theirs
            grad_p = grad.to(weight.dtype)  # matmuls in the parameters' dtype, as Liger does
            if grad_h is not None:
                grad_h[rows] = grad_p @ weight
            if grad_w is not None:
                grad_w.add_(grad_p.T @ h.to(weight.dtype))  # add_ upcasts a bf16 product: no fp32 copy
            if grad_b is not None:
                grad_b += grad.sum(0)
            del grad, grad_p
    ce, div = ce_sum / n, div_sum / n
    loss = ce_weight * ce + (1.0 - ce_weight) * t * t * div
    grads = [
        grad_h,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),  # type: ignore[union-attr]
    ]
    return loss, ce, div, grads


def _divergence_and_grad(
    logp: torch.Tensor, logq: torch.Tensor, divergence: str, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row D(P, Q) and g = dD/dlog Q with the entries of log Q treated as independent. Entries where the
    teacher's log P is -inf are padding (the module docstring): they add nothing to D and get g = 0, with no
    0 * inf anywhere (so no NaN, in values or in autograd through them)."""
    divergence = _jsd_endpoint(divergence, beta)
    valid = logp > -math.inf
    logp, logq = logp.masked_fill(~valid, 0.0), logq.masked_fill(~valid, 0.0)
    p = logp.exp().masked_fill(~valid, 0.0)
    if divergence == "forward_kl":
        return (p * (logp - logq)).sum(-1), -p
    q = logq.exp().masked_fill(~valid, 0.0)
    if divergence == "reverse_kl":
        return (q * (logq - logp)).sum(-1), q * (logq - logp + 1.0)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    d = beta * (p * (logp - logm)).sum(-1) + (1.0 - beta) * (q * (logq - logm)).sum(-1)
    # d/dQ of beta KL(P||M) + (1-beta) KL(Q||M) is (1-beta)(log Q - log M): the other terms cancel.
    return d, (1.0 - beta) * q * (logq - logm)


def _teacher_logp(logprobs: torch.Tensor, t: float, tail: str) -> torch.Tensor:
    if tail == "bucket":
        # 1 - sum exp(l) written as -expm1(logsumexp(l)): exact where the rest-mass is small.
        rest = (-torch.expm1(torch.logsumexp(logprobs, -1, keepdim=True))).clamp_min(REST_EPS)
        logprobs = torch.cat([logprobs, rest.log()], -1)
    return torch.log_softmax(logprobs / t, -1)


def kd_loss_dense(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    tail: str = "renormalize",
    chunk_size: int | None = None,  # accepted for a drop-in signature; ignored
) -> KDLossOutput:
    """The same loss, plainly: full [N, V] logits and autograd. The reference for tests and readers."""
    _validate(hidden, weight, bias, targets, teacher_ids, teacher_logprobs, temperature, ce_weight)
    _validate_options(divergence, tail, jsd_beta, chunk_size, teacher_ids.shape[1], weight.shape[0])
    logits = F.linear(hidden, weight, bias).to(_compute_dtype(hidden))
    ce = F.cross_entropy(logits, targets)
    teacher = teacher_logprobs.to(logits.dtype)
    student = torch.log_softmax(logits / temperature, dim=-1)
    if tail == "bucket":
        rest = (1 - teacher.exp().sum(-1, keepdim=True)).clamp_min(REST_EPS)
        logp = torch.log_softmax(torch.cat([teacher, rest.log()], -1) / temperature, dim=-1)
        others = (logits / temperature).scatter(1, teacher_ids, -math.inf)
        student_rest = torch.logsumexp(others, -1, keepdim=True) - torch.logsumexp(
            logits / temperature, -1, keepdim=True
        )
        logq = torch.cat([student.gather(1, teacher_ids), student_rest], -1)
    else:
        logp = torch.log_softmax(teacher / temperature, dim=-1)
        if divergence == "forward_kl":
            logq = student.gather(1, teacher_ids)  # as in dist_bench.student.kd.kd_loss
        else:
            at_ids = (logits / temperature).gather(1, teacher_ids)
            logq = torch.log_softmax(at_ids.masked_fill(logp == -math.inf, -math.inf), dim=-1)
    kind = _jsd_endpoint(divergence, jsd_beta)
    # padding (teacher log-prob -inf) is absent: its entries are zeroed, never multiplied as 0 * inf
    valid = logp > -math.inf
    logp, logq = logp.masked_fill(~valid, 0.0), logq.masked_fill(~valid, 0.0)
    p, q = logp.exp() * valid, logq.exp() * valid
    if kind == "forward_kl":
        d = (p * (logp - logq)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (logq - logp)).sum(-1)
    else:
        logm = torch.log((jsd_beta * p + (1 - jsd_beta) * q).masked_fill(~valid, 1.0))
        d = jsd_beta * (p * (logp - logm)).sum(-1) + (1 - jsd_beta) * (q * (logq - logm)).sum(-1)
    div = d.mean()
    loss = ce_weight * ce + (1 - ce_weight) * temperature**2 * div
    return KDLossOutput(loss, ce.detach(), div.detach())


def _jsd_endpoint(divergence: str, beta: float) -> str:
    """TRL's convention: JSD with beta 0 is forward KL(P||Q), with beta 1 reverse KL(Q||P)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        return "forward_kl" if beta == 0.0 else "reverse_kl"
    return divergence


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    return torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays fp64


def _validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    temperature: float,
    ce_weight: float,
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if not hidden.is_floating_point() or not teacher_logprobs.is_floating_point():
        raise ValueError("hidden and teacher_logprobs must be floating point")
    n, v = hidden.shape[0], weight.shape[0]
    if n == 0:
        raise ValueError("no supervised positions (N = 0): the mean over positions is undefined")
    if bias is not None and tuple(bias.shape) != (v,):
        raise ValueError(f"bias must be [V] = [{v}]; got {tuple(bias.shape)}")
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be [N] = [{n}]; got {tuple(targets.shape)}")
    if teacher_ids.dim() != 2 or teacher_ids.shape[0] != n or teacher_ids.shape[1] == 0:
        raise ValueError(f"teacher_ids must be [N, K] with N = {n}, K >= 1; got {tuple(teacher_ids.shape)}")
    if teacher_logprobs.shape != teacher_ids.shape:
        raise ValueError(
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} and teacher_ids {tuple(teacher_ids.shape)} differ"
        )
    for name, ids in (("targets", targets), ("teacher_ids", teacher_ids)):
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor; got {ids.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must be in [0, 1]; got {ce_weight}")


def _validate_options(
    divergence: str, tail: str, jsd_beta: float, chunk_size: int | None, k: int, v: int
) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    if tail not in TAILS:
        raise ValueError(f"unknown tail {tail!r}; expected one of {TAILS}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ValueError(f"jsd_beta must be in [0, 1]; got {jsd_beta}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None; got {chunk_size!r}")
    if tail == "bucket" and k >= v:
        raise ValueError(f"tail='bucket' needs K < V (a non-empty rest of the vocabulary); got K={k}, V={v}")
