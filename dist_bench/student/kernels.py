"""The vocabulary-tile kernels of the KD loss (`losses._TiledKD`): Triton on CUDA, torch elsewhere.

    fold_tile(tile, ...)      forward: online log-sum-exp at T = 1 (and at T), the target's logit and the
                              logits at the row's K cached ids, read from one [rows, cols] logit tile
    gradient_tile(tile, ...)  backward: overwrite the tile with dLoss/dlogits (dense part, then the K ids)

Why our own: TRL's `ChunkedLogProbFunction` (the SFT head, `trl.kernels`) folds a tile at one temperature
for one target per row; KD also needs the logits at the row's K cached ids from the same tile, a second
temperature for forward KL at T != 1, and a gradient with K extra entries per row. Computing those from
gathered weight rows instead (K x H reads and an atomic scatter into the weight gradient per position)
cost KD a tenth of its step on an H200 (docs/benchmarks.md). Liger's fused-linear losses keep a dense
[chunk, V] fp32 buffer per chunk instead of folding tiles. These kernels are TRL's fold, extended: the
logits are read once per tile, the ids cost K loads per row.

The torch twins do the same on a whole tile at once, in fp32 or wider (fp64 inputs stay fp64: the tests'
reference precision); they run wherever Triton does not (CPU) and for fp64 on CUDA.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch on Linux; CPU builds go through the torch twins
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

BLOCK = 1024  # vocabulary entries per Triton block (as TRL's kernel)


def use_triton(tile: torch.Tensor) -> bool:
    return (
        triton is not None and tile.is_cuda and tile.dtype in (torch.bfloat16, torch.float16, torch.float32)
    )


def fold_tile(
    tile: torch.Tensor,  # [rows, cols] logits of vocabulary entries vocab_start .. vocab_start + cols
    vocab_start: int,
    targets: torch.Tensor,  # [rows]
    ids: torch.Tensor,  # [rows, K] cached teacher ids
    max1: torch.Tensor,  # [rows] running max at T = 1 (updated)
    sum1: torch.Tensor,  # [rows] running sum of exp(s - max1) (updated)
    max_t: torch.Tensor | None,  # [rows] the same at temperature T (None: not needed)
    sum_t: torch.Tensor | None,
    target_logit: torch.Tensor,  # [rows] set where the target lies in this tile
    id_logits: torch.Tensor,  # [rows, K] set where an id lies in this tile
    inv_t: float,
) -> None:
    rows, cols = tile.shape
    if use_triton(tile):
        two = max_t is not None
        _fold_kernel[(rows,)](
            tile, tile.stride(0), cols, vocab_start, targets, ids, ids.stride(0), ids.shape[1],
            max1, sum1, max_t if two else max1, sum_t if two else sum1, target_logit,
            id_logits, id_logits.stride(0), inv_t,
            TWO_TEMPS=two, BLOCK=BLOCK, BLOCK_K=triton.next_power_of_2(ids.shape[1]),
        )  # fmt: skip
        return
    z = tile.to(max1.dtype)
    _fold_online(z, max1, sum1)
    if max_t is not None:
        _fold_online(z * inv_t, max_t, sum_t)
    local, inside = _local(targets[:, None], vocab_start, cols)
    target_logit.copy_(torch.where(inside[:, 0], z.gather(1, local)[:, 0], target_logit))
    local, inside = _local(ids, vocab_start, cols)
    id_logits.copy_(torch.where(inside, z.gather(1, local), id_logits))


def gradient_tile(
    tile: torch.Tensor,  # [rows, cols] logits in, dLoss/dlogits out (in place)
    vocab_start: int,
    targets: torch.Tensor,  # [rows]
    lse1: torch.Tensor,  # [rows] log-sum-exp at T = 1
    lse_t: torch.Tensor | None,  # [rows] log-sum-exp of s / T (None: no softmax-at-T term)
    coef1: torch.Tensor,  # [rows] times softmax(s)
    coef_t: torch.Tensor | None,  # [rows] times softmax(s / T)
    coef_target: torch.Tensor,  # [rows] subtracted at the target
    ids: torch.Tensor,  # [rows, K]
    id_grads: torch.Tensor,  # [rows, K] the complete gradient at the ids (written over the dense one)
    inv_t: float,
) -> None:
    """grad_j = coef1 softmax(s)_j + coef_t softmax(s / T)_j - coef_target [j = target], then the K ids'
    entries replaced by id_grads (computed exactly on [rows, K]: no second rounding of the dense value)."""
    rows, cols = tile.shape
    if use_triton(tile):
        two = lse_t is not None
        _gradient_kernel[(rows, triton.cdiv(cols, BLOCK))](
            tile, tile.stride(0), cols, vocab_start, targets, lse1, lse_t if two else lse1,
            coef1, coef_t if two else coef1, coef_target, inv_t, TWO_TEMPS=two, BLOCK=BLOCK,
        )  # fmt: skip
        # Launched after the dense kernel on the same stream: the ids' entries are written last.
        _put_ids_kernel[(rows,)](
            tile, tile.stride(0), cols, vocab_start, ids, ids.stride(0), id_grads, id_grads.stride(0),
            ids.shape[1], BLOCK_K=triton.next_power_of_2(ids.shape[1]),
        )  # fmt: skip
        return
    z = tile.to(lse1.dtype)
    grad = coef1[:, None] * (z - lse1[:, None]).exp()
    if lse_t is not None:
        grad += coef_t[:, None] * (z * inv_t - lse_t[:, None]).exp()
    local, inside = _local(targets[:, None], vocab_start, cols)
    grad.scatter_add_(1, local, torch.where(inside, -coef_target[:, None], 0.0))
    local, inside = _local(ids, vocab_start, cols)
    row_index = torch.arange(rows, device=tile.device)[:, None].expand_as(local)
    grad[row_index[inside], local[inside]] = id_grads[inside]
    tile.copy_(grad)


def _fold_online(z: torch.Tensor, running_max: torch.Tensor, running_sum: torch.Tensor) -> None:
    new_max = torch.maximum(running_max, z.amax(-1))
    running_sum.mul_((running_max - new_max).exp()).add_((z - new_max[:, None]).exp().sum(-1))
    running_max.copy_(new_max)


def _local(ids: torch.Tensor, vocab_start: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column of each id within the tile (clamped into range) and whether it lies in the tile."""
    local = ids - vocab_start
    inside = (local >= 0) & (local < cols)
    return local.clamp(0, cols - 1), inside


if triton is not None:

    @triton.jit
    def _online(z, m, s):
        new_m = tl.maximum(m, tl.max(z, axis=0))
        return new_m, s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)

    @triton.jit
    def _fold_kernel(
        tile_ptr, tile_stride, n_cols, vocab_start, targets_ptr, ids_ptr, ids_stride, n_ids,
        max1_ptr, sum1_ptr, maxt_ptr, sumt_ptr, target_ptr, idl_ptr, idl_stride, inv_t,
        TWO_TEMPS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # One program per row: fold this tile into the row's running statistics, then pick its entries.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = tile_ptr + row * tile_stride
        m1 = tl.load(max1_ptr + row)
        s1 = tl.load(sum1_ptr + row)
        mt = tl.load(maxt_ptr + row)
        st = tl.load(sumt_ptr + row)
        for start in range(0, n_cols, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            z = tl.load(row_ptr + offsets, mask=offsets < n_cols, other=-float("inf")).to(tl.float32)
            m1, s1 = _online(z, m1, s1)
            if TWO_TEMPS:
                mt, st = _online(z * inv_t, mt, st)
        tl.store(max1_ptr + row, m1)
        tl.store(sum1_ptr + row, s1)
        if TWO_TEMPS:
            tl.store(maxt_ptr + row, mt)
            tl.store(sumt_ptr + row, st)
        local = tl.load(targets_ptr + row) - vocab_start
        if (local >= 0) & (local < n_cols):
            tl.store(target_ptr + row, tl.load(row_ptr + local).to(tl.float32))
        k = tl.arange(0, BLOCK_K)
        local_ids = tl.load(ids_ptr + row * ids_stride + k, mask=k < n_ids, other=0) - vocab_start
        inside = (k < n_ids) & (local_ids >= 0) & (local_ids < n_cols)
        values = tl.load(row_ptr + local_ids, mask=inside, other=0.0).to(tl.float32)
        tl.store(idl_ptr + row * idl_stride + k, values, mask=inside)

    @triton.jit
    def _gradient_kernel(
        tile_ptr, tile_stride, n_cols, vocab_start, targets_ptr, lse1_ptr, lset_ptr,
        coef1_ptr, coeft_ptr, coef_target_ptr, inv_t, TWO_TEMPS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n_cols
        ptrs = tile_ptr + row * tile_stride + offsets
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        grad = tl.load(coef1_ptr + row) * tl.exp(z - tl.load(lse1_ptr + row))
        if TWO_TEMPS:
            grad += tl.load(coeft_ptr + row) * tl.exp(z * inv_t - tl.load(lset_ptr + row))
        is_target = (offsets + vocab_start) == tl.load(targets_ptr + row)
        grad -= tl.where(is_target, tl.load(coef_target_ptr + row), 0.0)
        tl.store(ptrs, grad.to(tile_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _put_ids_kernel(
        tile_ptr, tile_stride, n_cols, vocab_start, ids_ptr, ids_stride, grads_ptr, grads_stride, n_ids,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        k = tl.arange(0, BLOCK_K)
        local = tl.load(ids_ptr + row * ids_stride + k, mask=k < n_ids, other=0) - vocab_start
        inside = (k < n_ids) & (local >= 0) & (local < n_cols)
        grads = tl.load(grads_ptr + row * grads_stride + k, mask=inside, other=0.0)
        tl.store(tile_ptr + row * tile_stride + local, grads.to(tile_ptr.dtype.element_ty), mask=inside)
