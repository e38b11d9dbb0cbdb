"""The logit cache's format: what a position keeps, how it is packed, and how training reads it back.

Format 2 (`dist-bench-topp/2`, written by `logit_caching`). Per supervised position, from the teacher's
full-vocabulary distribution p at temperature 1:

- **Adaptive top-p.** Tokens in descending probability until their cumulative probability reaches
  `logits.cover`, at most `logits.top_k`, at least one. A teacher's distribution is peaked: at most positions
  a handful of tokens hold nearly all of the mass, so a fixed k spends most of its bytes on nothing.
  (`cover: 1.0` keeps exactly top_k.)
- **Log-probs as 8-bit codes on the sorted curve.** code_j = round((log p_1 - log p_j) / step), step =
  `logits.logprob_step` nats; the top-1's code is always 0 and not stored. A token whose code would pass
  255 (p_j < p_1 e^(-255 step)) is not kept: it goes to the tail.
- **Tail mass.** log(1 - sum of the kept p_j), as float16: both the tail (its exponent; relative error
  |log tail| 2^-11, under 1% for tails above e^-20) and the kept mass (-expm1 of it: relative error 2^-11
  where the kept mass is small) survive the rounding. It is computed as 1 - kept in float64 from the
  float32 log-probs, so a tail below ~1e-6 is rounding noise of the teacher's own log-sum-exp.
  Decoding shifts the codes' curve so that the kept log-probs sum to exactly this mass, so the KD loss's
  `bucket` tail (rest = 1 - sum of the kept probabilities) sees the true mass of what was dropped.
  **Error bound:** every decoded log-prob is within one `step` of the teacher's (half a step from the
  code's rounding, at most half a step from the shift), plus float16's 2^-11 relative error of the mass.
- **Token ids bit-packed** at ceil(log2 V) bits (18 for a 151,936-token vocabulary), little-endian, one
  stream per shard.

Bytes per position: 3 + n (ceil(log2 V) / 8 + 1) - 1 for n kept tokens (an 18-bit vocabulary: 3.25 n + 2).

Shard tensors (safetensors): `counts` uint8|int16 [P] (tokens kept per position), `log_tail` float16 [P],
`codes` uint8 [E - P] (every kept token but each position's first), `token_ids` uint8 [ceil(E bits / 8)],
`offsets` int64 [S + 1] (positions of sequence i: offsets[i]:offsets[i+1]), `sequence_index` int64 [S],
`input_tokens` int64 [1]. E = sum(counts).

Format 1 (`dist-bench-topk/1`, fixed top-k: `token_ids` int32 [P, k] and `logprobs` float [P, k]) is still
read. Both readers give training the same thing (`batch`): [n, K] teacher ids and log-probs, padded where a
position kept fewer than the batch's widest: a padded entry has log-prob -inf and repeats the row's first
id, which the KD loss treats as absent (losses.py).

Packing, quantisation and decoding are ours: no maintained library stores sparse, variable-width top-p
distributions (DistillKit's own compressed format is tied to its trainer and keeps a fixed k).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from safetensors.torch import load_file

try:  # Triton ships with CUDA builds of torch on Linux; CPU builds take the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None

FORMAT_V1 = "dist-bench-topk/1"
FORMAT_V2 = "dist-bench-topp/2"
CODE_MAX = 255  # codes are uint8
MAX_ID_BITS = 25  # a read takes 4 bytes: bits + 7 (the offset in the first byte) must fit in 32
TOPK_TILE = 128  # columns per tile of tiled_topk: 1187 tiles of a 151,936-token vocabulary


def id_bits(vocab_size: int) -> int:
    """Bits per packed token id: ceil(log2 V), at least 1."""
    return max(1, math.ceil(math.log2(vocab_size)))


def bytes_per_position(kept: float, vocab_size: int) -> float:
    """Format 2's bytes for a position that keeps `kept` tokens (the module docstring's formula)."""
    return 3 + kept * (id_bits(vocab_size) / 8 + 1) - 1


# ---- selection, on the teacher's device -----------------------------------------------------------------


class Selected(NamedTuple):
    """A chunk of positions' kept tokens, fixed width (top_k) so nothing waits for the host: entries at and
    past `counts` are not kept."""

    ids: torch.Tensor  # [c, top_k] int32, descending probability
    codes: torch.Tensor  # [c, top_k] uint8; column 0 is 0
    counts: torch.Tensor  # [c] int16: tokens kept
    log_tail: torch.Tensor  # [c] float16: log(1 - kept probability mass)


def select(logits: torch.Tensor, top_k: int, cover: float, step: float) -> Selected:
    """The kept tokens of rows of full-vocabulary logits [c, V] (in the teacher's dtype; log-probs work too),
    as the module docstring says. No [c, V] buffer besides the logits' own: one pass over them gives each
    row's log-sum-exp and its tile maxima (tile_stats), the top-k is taken through the tiles, and only its
    values are normalised."""
    tile_max, lse = tile_stats(logits)
    top = tiled_topk(logits, top_k, tile_max)  # sorted, descending
    values = top.values.float() - lse[:, None]
    codes = ((values[:, :1] - values) / step).round()
    if cover >= 1.0:
        counts = torch.full(values.shape[:1], top_k, dtype=torch.int64, device=logits.device)
    else:
        mass_before = values.exp().cumsum(-1)[:, :-1]  # mass of the tokens before each one
        counts = 1 + (mass_before < cover).sum(-1)
    # codes grow along a row: the tokens that fit in 8 bits are a prefix
    counts = torch.minimum(counts, (codes <= CODE_MAX).sum(-1))
    kept = torch.arange(top_k, device=logits.device) < counts[:, None]
    kept_mass = (values.double().exp() * kept).sum(-1)
    return Selected(
        top.indices.to(torch.int32),
        codes.clamp_max(CODE_MAX).to(torch.uint8),
        counts.to(torch.int16),
        (1 - kept_mass).clamp_min(0).log().to(torch.float16),
    )


class TopK(NamedTuple):
    values: torch.Tensor
    indices: torch.Tensor


def tile_stats(logits: torch.Tensor, tile: int = TOPK_TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """(the maximum of each whole `tile` columns [rows, V // tile], in the logits' dtype; each row's
    log-sum-exp [rows], float32), from one read of the logits: a Triton kernel on CUDA (ours: torch has no
    fused max-per-tile-and-logsumexp, and `amax` on the tiled view plus `logsumexp` in float32 read the
    [4096, 151936] logits three times and write two float32 copies, 2.3 ms against ~0.4 ms on an H200),
    torch elsewhere."""
    rows, width = logits.shape
    tiles = width // tile
    if _triton_ok(logits, tile):
        tile_max = torch.empty((rows, tiles), dtype=logits.dtype, device=logits.device)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        _tile_stats_kernel[(rows,)](
            logits, logits.stride(0), width, tile_max, tile_max.stride(0), tiles, lse,
            TILE=tile, BLOCK=_STATS_BLOCK, num_warps=4,
        )  # fmt: skip
        return tile_max, lse
    tile_max = logits[:, : tiles * tile].unflatten(1, (tiles, tile)).amax(-1)
    return tile_max, torch.logsumexp(logits.float(), -1)


def tiled_topk(logits: torch.Tensor, k: int, tile_max: torch.Tensor, tile: int = TOPK_TILE) -> TopK:
    """torch.topk over the last dimension, the same values (ids may differ between equal values), in a
    fraction of its time on a wide vocabulary, given tile_stats' tile maxima: the k tiles of `tile` columns
    with the largest maxima hold the k largest values (a tile holding one of them has a maximum at least as
    large as the k-th value, and at most k tiles outrank it), so a top-k over the tile maxima and a top-k
    over those k tiles' columns (plus the columns past the last whole tile) replace torch.topk's radix
    passes over the whole row. On an H200 for [4096, 151936] bf16 logits torch.topk takes 4.5 ms
    (docs/benchmarks.md)."""
    rows, width = logits.shape
    tiles = tile_max.shape[1]
    if tiles <= 2 * k:  # a narrow vocabulary: nothing to prune
        top = logits.topk(k, dim=-1)
        return TopK(top.values, top.indices)
    whole = logits[:, : tiles * tile].unflatten(1, (tiles, tile))  # a view
    best = tile_max.topk(k, dim=-1).indices  # [rows, k]
    columns = torch.arange(tile, device=logits.device)
    candidates = whole.gather(1, best[:, :, None].expand(rows, k, tile)).flatten(1)
    candidate_ids = (best[:, :, None] * tile + columns).flatten(1)
    if tiles * tile < width:  # the columns past the last whole tile are candidates too
        rest = torch.arange(tiles * tile, width, device=logits.device).expand(rows, -1)
        candidates = torch.cat([candidates, logits[:, tiles * tile :]], 1)
        candidate_ids = torch.cat([candidate_ids, rest], 1)
    top = candidates.topk(k, dim=-1)
    return TopK(top.values, candidate_ids.gather(1, top.indices))


# Columns per step of the tile-statistics kernel (32 tiles of 128) and 4 warps: 0.36 ms for [4096, 151936]
# bf16 on an H200, against 0.52 ms at 1024 columns and 4 warps (a sweep of 1024-4096 x 2-16 warps, 2026-12-01).
_STATS_BLOCK = 4096


def _triton_ok(logits: torch.Tensor, tile: int) -> bool:
    return (
        triton is not None
        and logits.is_cuda
        and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and logits.stride(1) == 1
        and _STATS_BLOCK % tile == 0
    )


if triton is not None:

    @triton.jit
    def _tile_stats_kernel(
        logits_ptr, logits_stride, n_cols, tile_max_ptr, tile_max_stride, n_tiles, lse_ptr,
        TILE: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # One program per row: BLOCK columns at a time, their BLOCK // TILE tile maxima stored (whole tiles
        # only) and folded into the row's online log-sum-exp.
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * logits_stride
        running_max = -float("inf")
        running_sum = 0.0
        for start in range(0, n_cols, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            z = tl.load(row_ptr + offsets, mask=offsets < n_cols, other=-float("inf")).to(tl.float32)
            maxima = tl.max(tl.reshape(z, (BLOCK // TILE, TILE)), axis=1)  # exact in the logits' dtype
            tile_index = start // TILE + tl.arange(0, BLOCK // TILE)
            tl.store(
                tile_max_ptr + row * tile_max_stride + tile_index,
                maxima.to(tile_max_ptr.dtype.element_ty),
                mask=tile_index < n_tiles,
            )
            new_max = tl.maximum(running_max, tl.max(z, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
            running_max = new_max
        tl.store(lse_ptr + row, running_max + tl.log(running_sum))


def decode(codes: torch.Tensor, counts: torch.Tensor, log_tail: torch.Tensor, step: float) -> torch.Tensor:
    """[n, K] codes (column 0 the top-1's 0) -> float32 log-probs, -inf past each row's count, shifted so
    that each row's kept probabilities sum to 1 - exp(log_tail)."""
    k = codes.shape[1]
    kept = torch.arange(k, device=codes.device) < counts[:, None].long()
    curve = (-step * codes.float()).masked_fill(~kept, -math.inf)  # log p_j - log p_1
    kept_mass = (-torch.expm1(log_tail.float())).clamp_min(torch.finfo(torch.float32).tiny)
    shift = kept_mass.log() - torch.logsumexp(curve, -1)
    return curve + shift[:, None]


def reconstruction_kl(
    logp: torch.Tensor, ids: torch.Tensor, kept_logp: torch.Tensor, tail: torch.Tensor
) -> torch.Tensor:
    """KL(p || r) per row, nats: p the full distribution (log-probs [m, V]), r what a cache keeps of it: the
    kept ids' probabilities (kept_logp, -inf where not kept) and the tail mass spread evenly over the other
    V - n tokens (what is known of them). The fidelity figure of the cache and of the benchmarks."""
    v = logp.shape[1]
    kept = kept_logp > -math.inf
    n = kept.sum(-1, keepdim=True)
    spread = (tail.float()[:, None].clamp_min(torch.finfo(torch.float32).tiny) / (v - n).clamp_min(1)).log()
    log_r = spread.expand(-1, v).clone()
    log_r.scatter_(1, ids.long(), torch.where(kept, kept_logp.float(), spread))
    return (logp.exp() * (logp - log_r)).sum(-1)


def fidelity(logits: torch.Tensor, chosen: Selected, step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p || the cache's reconstruction), entropy of p), summed over the rows of logits [m, V]: the
    reconstruction is decoded from exactly what the shard stores (codes, counts, the float16 tail)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    kept_logp = decode(chosen.codes, chosen.counts, chosen.log_tail, step)
    tail = chosen.log_tail.float().exp()
    kl = reconstruction_kl(logp, chosen.ids, kept_logp, tail)
    entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # 0 * -inf (underflowed p) is 0
    return kl.sum(), entropy.sum()


# ---- packing, on the host ----------------------------------------------------------------------------


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative ids -> a little-endian bit stream of `bits` bits each (uint8)."""
    packer = IdPacker(bits)
    return np.concatenate([packer.add(ids), packer.close()])


class IdPacker:
    """pack_ids a batch at a time: the bytes of add(a), add(b), ..., close() are pack_ids(a + b + ...). The
    bits that do not fill a byte wait for the next batch. (So the logit cache's writer packs each batch as it
    comes, in calls of a few milliseconds, instead of holding the interpreter for a whole shard's ids.)"""

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.carry = np.zeros(0, dtype=np.uint8)  # bits of the last, unfilled byte, one per element

    def add(self, ids: np.ndarray) -> np.ndarray:
        # each id's four little-endian bytes as 32 bits, of which the low `bits` are kept: 32 bytes of scratch
        # per id, and no per-bit shifts of int64 arrays (5x faster on a shard of a million ids)
        planes = np.unpackbits(ids.astype("<u4").view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")
        stream = np.concatenate([self.carry, planes[:, : self.bits].reshape(-1)])
        whole = stream.size - stream.size % 8
        self.carry = stream[whole:]
        return np.packbits(stream[:whole], bitorder="little")

    def close(self) -> np.ndarray:
        """The last byte (zero-padded), if bits are left."""
        return np.packbits(self.carry, bitorder="little")


def unpack_ids(stream: torch.Tensor, bit_positions: torch.Tensor, bits: int) -> torch.Tensor:
    """The `bits`-bit ids starting at these bit positions of a stream (uint8, with 3 bytes of slack at its
    end): four bytes read per id, shifted and masked. int64."""
    at = bit_positions >> 3
    word = stream[at].long()
    for i in (1, 2, 3):
        word |= stream[at + i].long() << (8 * i)
    return (word >> (bit_positions & 7)) & ((1 << bits) - 1)


def encode_rows(chosen: Selected) -> dict[str, np.ndarray]:
    """A batch's Selected, on the host -> its kept entries, flat, position by position: ids, codes (without
    each position's first), counts, tail."""
    counts = chosen.counts.numpy().astype(np.int64)
    kept = np.arange(chosen.ids.shape[1]) < counts[:, None]
    return {
        "ids": chosen.ids.numpy()[kept],
        "codes": chosen.codes.numpy()[:, 1:][kept[:, 1:]],
        "counts": counts,
        "log_tail": chosen.log_tail.numpy(),
    }


# ---- reading, for training -----------------------------------------------------------------------------


def open_cache(cache_dir: Path) -> TopKCache | TopPCache:
    """A finished cache of either format, its shards checked against the manifest's sha256."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    if manifest.get("format") == FORMAT_V1:
        return TopKCache.open(cache_dir)
    if manifest.get("format") == FORMAT_V2:
        return TopPCache.open(cache_dir)
    raise ValueError(
        f"{cache_dir}/manifest.json: format {manifest.get('format')!r} is not one this version reads "
        f"({FORMAT_V1}, {FORMAT_V2}); cache the logits again"
    )


def _checked_shards(cache_dir: Path, manifest: dict) -> list[dict[str, torch.Tensor]]:
    shards = []
    for shard in manifest["shards"]:
        path = cache_dir / "shards" / shard["file"]
        if hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
            raise ValueError(f"{path}: content does not match the manifest's sha256")
        shards.append(load_file(str(path)))
    return shards


def _sequence_rows(
    manifest: dict, shards: list[dict[str, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position, number of positions) of each dataset sequence, over the shards in order."""
    row_start = torch.zeros(manifest["sequences"], dtype=torch.int64)
    row_count = torch.zeros(manifest["sequences"], dtype=torch.int64)
    rows = 0
    for tensors in shards:
        offsets = tensors["offsets"]
        row_start[tensors["sequence_index"]] = offsets[:-1] + rows
        row_count[tensors["sequence_index"]] = offsets[1:] - offsets[:-1]
        rows += int(offsets[-1])
    return row_start, row_count


def _rows(row_start: torch.Tensor, row_count: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Position numbers of these sequences, in order: matches the collators' supervised-position order."""
    return torch.cat([torch.arange(row_start[i], row_start[i] + row_count[i]) for i in indices])


@dataclass
class TopKCache:
    """Format 1: a fixed top-k per position."""

    manifest: dict
    token_ids: torch.Tensor  # [P, k] int32, as stored: half the memory of int64
    logprobs: torch.Tensor  # [P, k] as stored (float32 or float16)
    row_start: torch.Tensor  # [N] first row of sequence i
    row_count: torch.Tensor  # [N]

    @classmethod
    def open(cls, cache_dir: Path) -> TopKCache:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if manifest.get("format") != FORMAT_V1:
            raise ValueError(
                f"{cache_dir}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT_V1}"
            )
        shards = _checked_shards(cache_dir, manifest)
        row_start, row_count = _sequence_rows(manifest, shards)
        ids = torch.cat([s["token_ids"] for s in shards])
        return cls(manifest, ids, torch.cat([s["logprobs"] for s in shards]), row_start, row_count)

    def rows(self, indices: list[int]) -> torch.Tensor:
        return _rows(self.row_start, self.row_count, indices)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ids (int64) and log-probs [n, k] of these sequences' supervised positions, in order."""
        rows = self.rows(indices)
        return self.token_ids[rows].long(), self.logprobs[rows].float()


@dataclass
class TopPCache:
    """Format 2, kept packed in memory and decoded a batch at a time."""

    manifest: dict
    counts: torch.Tensor  # [P] tokens kept
    log_tail: torch.Tensor  # [P] float16
    codes: torch.Tensor  # [E - P] uint8
    id_stream: torch.Tensor  # every shard's packed ids, one after the other (each starts on a byte)
    first_bit: torch.Tensor  # [P] int64: bit position of the position's first id in id_stream
    first_code: torch.Tensor  # [P] int64: index of the position's second token's code in codes
    row_start: torch.Tensor
    row_count: torch.Tensor

    @classmethod
    def open(cls, cache_dir: Path) -> TopPCache:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        shards = _checked_shards(cache_dir, manifest)
        row_start, row_count = _sequence_rows(manifest, shards)
        bits = manifest["id_bits"]
        counts = torch.cat([s["counts"].long() for s in shards])
        first_bit, byte_base = [], 0
        for tensors in shards:
            entries = tensors["counts"].long().cumsum(0) - tensors["counts"].long()  # exclusive
            first_bit.append(byte_base * 8 + entries * bits)
            byte_base += tensors["token_ids"].numel()
        first_code = (counts - 1).cumsum(0) - (counts - 1)
        stream = torch.cat([*(s["token_ids"] for s in shards), torch.zeros(3, dtype=torch.uint8)])
        return cls(
            manifest,
            counts,
            torch.cat([s["log_tail"] for s in shards]),
            torch.cat([s["codes"] for s in shards]),
            stream,
            torch.cat(first_bit),
            first_code,
            row_start,
            row_count,
        )

    def rows(self, indices: list[int]) -> torch.Tensor:
        return _rows(self.row_start, self.row_count, indices)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher ids (int64) and log-probs [n, K] of these sequences' supervised positions, in order, K the
        batch's widest position; padded entries as the module docstring says."""
        rows = self.rows(indices)
        counts = self.counts[rows]
        width = int(counts.max())
        column = torch.arange(width)
        kept = column < counts[:, None]
        bits = self.manifest["id_bits"]
        at = self.first_bit[rows, None] + torch.where(kept, column, 0) * bits
        ids = unpack_ids(self.id_stream, at, bits)
        ids = torch.where(kept, ids, ids[:, :1])
        code_at = (self.first_code[rows, None] + column[1:] - 1).clamp_max(self.codes.numel() - 1)
        later = torch.where(kept[:, 1:], self.codes[code_at.clamp_min(0)], 0) if width > 1 else None
        codes = torch.zeros((len(rows), width), dtype=torch.uint8)
        if later is not None:
            codes[:, 1:] = later
        return ids, decode(codes, counts, self.log_tail[rows], self.manifest["logprob_step"])
