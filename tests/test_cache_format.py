"""The logit cache's format 2 on hand-made distributions: what it keeps, the tail, the codes' error bound,
the bit packing, and that a stage's shards decode to what the teacher said."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from dist_bench.teacher import cache_format
from dist_bench.teacher.cache_format import Selected


def logits_of(*probabilities: list[float]) -> torch.Tensor:
    """Rows of logits whose softmax is exactly these probabilities (each row sums to 1)."""
    return torch.tensor(probabilities, dtype=torch.float64).log().float()


def test_cover_keeps_the_fewest_most_likely_tokens_that_reach_it() -> None:
    rows = logits_of(
        [0.5, 0.3, 0.15, 0.05, 0.0],  # 0.5 + 0.3 = 0.8 < 0.9; + 0.15 = 0.95 >= 0.9: three
        [0.05, 0.9, 0.05, 0.0, 0.0],  # 0.9 alone reaches it: one
        [0.2, 0.2, 0.2, 0.2, 0.2],  # flat: capped at top_k = 4
        [0.1, 0.7, 0.1, 0.1, 0.0],  # 0.7 + 0.1 = 0.8 < 0.9, + 0.1 = 0.9 reaches it: three
    )
    chosen = cache_format.select(rows, top_k=4, cover=0.9, step=1 / 16)
    assert chosen.counts.tolist() == [3, 1, 4, 3]
    assert chosen.ids[0, :3].tolist() == [0, 1, 2] and chosen.ids[1, 0] == 1
    assert chosen.ids[3, 0] == 1 and sorted(chosen.ids[3, 1:3].tolist()) in ([0, 2], [0, 3], [2, 3])
    # cover 1.0 is plain top-k
    assert cache_format.select(rows, top_k=2, cover=1.0, step=1 / 16).counts.tolist() == [2, 2, 2, 2]


def test_the_tail_is_exactly_the_mass_not_kept() -> None:
    rows = logits_of([0.5, 0.3, 0.15, 0.05], [0.999, 0.0009, 0.0001, 0.0], [0.25, 0.25, 0.25, 0.25])
    chosen = cache_format.select(rows, top_k=3, cover=0.9, step=1 / 16)
    assert chosen.counts.tolist() == [3, 1, 3]
    tail = chosen.log_tail.double().exp()
    # float16 keeps log(tail) to 2^-11 relative: small tails keep their own precision
    for got, want in zip(tail.tolist(), [0.05, 0.001, 0.25], strict=True):
        assert got == pytest.approx(want, rel=2e-3)
    # and the decoded log-probs carry exactly that mass, whatever the codes' rounding
    kept = cache_format.decode(chosen.codes, chosen.counts, chosen.log_tail, 1 / 16)
    kept_mass = kept.double().exp().sum(-1)
    torch.testing.assert_close(kept_mass, 1 - tail, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("step", [1 / 16, 1 / 4])
def test_decoded_log_probs_are_within_one_step(step: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 1000, generator=generator) * 4  # peaked and flat rows alike
    chosen = cache_format.select(logits, top_k=64, cover=0.999, step=step)
    decoded = cache_format.decode(chosen.codes, chosen.counts, chosen.log_tail, step)
    true = torch.log_softmax(logits, -1).gather(1, chosen.ids.long())
    kept = decoded > -math.inf
    assert torch.equal(kept.sum(-1), chosen.counts.long())
    error = (decoded - true).abs()[kept]
    assert error.max() <= step * (1 + 1e-3) + 1e-3  # one step, plus float16's error of the tail
    assert error.max() > step / 8  # the bound is not vacuous: the codes do round


def test_tokens_beyond_255_codes_go_to_the_tail() -> None:
    # with steps of 1/32 nats, 255 codes reach 7.97 nats below the top-1: p_2 = p_1 e^-7.9 is kept,
    # p_3 = p_1 e^-8.1 is not, nor anything after it
    rows = torch.tensor([[0.0, -7.9, -8.1, -12.0]])
    chosen = cache_format.select(rows, top_k=4, cover=1.0, step=1 / 32)
    assert chosen.counts.tolist() == [2]
    dropped = torch.tensor([-8.1, -12.0]).exp().sum() / torch.tensor([0.0, -7.9, -8.1, -12.0]).exp().sum()
    assert float(chosen.log_tail.double().exp()) == pytest.approx(float(dropped), rel=5e-3)


def test_bit_packing_round_trips_ids_of_any_width() -> None:
    generator = np.random.default_rng(0)
    for vocab in (2, 258, 151_936, 1 << 25):
        bits = cache_format.id_bits(vocab)
        ids = generator.integers(0, vocab, size=1001)
        stream = torch.from_numpy(np.concatenate([cache_format.pack_ids(ids, bits), np.zeros(3, np.uint8)]))
        assert stream.numel() == math.ceil(1001 * bits / 8) + 3
        got = cache_format.unpack_ids(stream, torch.arange(1001) * bits, bits)
        assert got.tolist() == ids.tolist()
    assert cache_format.id_bits(151_936) == 18


def test_packing_batch_by_batch_gives_the_bytes_of_packing_them_all_at_once() -> None:
    ids = np.random.default_rng(1).integers(0, 151_936, size=1000)
    for cuts in ([0, 1000], [0, 1, 2, 3, 1000], [0, 7, 333, 334, 999, 1000], [0, 0, 500, 500, 1000]):
        packer = cache_format.IdPacker(18)
        parts = [packer.add(ids[a:b]) for a, b in itertools.pairwise(cuts)] + [packer.close()]
        assert np.concatenate(parts).tobytes() == cache_format.pack_ids(ids, 18).tobytes()
    reference = np.zeros(math.ceil(1000 * 18 / 8), np.uint8)  # bit by bit, the slow obvious way
    for n, token in enumerate(ids):
        for b in range(18):
            if int(token) >> b & 1:
                reference[(n * 18 + b) // 8] |= 1 << ((n * 18 + b) % 8)
    assert cache_format.pack_ids(ids, 18).tobytes() == reference.tobytes()


def test_reconstruction_kl_is_zero_for_a_lossless_cache_and_grows_with_what_is_dropped() -> None:
    logp = torch.log_softmax(torch.randn(8, 50, generator=torch.Generator().manual_seed(1)) * 2, -1)
    ids = logp.argsort(-1, descending=True)
    everything = cache_format.reconstruction_kl(logp, ids, logp.gather(1, ids), torch.zeros(8))
    torch.testing.assert_close(everything, torch.zeros(8), atol=1e-6, rtol=0)
    kls = []
    for keep in (40, 10, 2):
        kept = logp.gather(1, ids[:, :keep])
        tail = 1 - kept.exp().sum(-1)
        kls.append(cache_format.reconstruction_kl(logp, ids[:, :keep], kept, tail).mean())
    assert 0 < kls[0] < kls[1] < kls[2]


def test_fidelity_reads_what_the_shard_would_store() -> None:
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(2)) * 3
    chosen = cache_format.select(logits, top_k=32, cover=0.95, step=1 / 16)
    kl, entropy = cache_format.fidelity(logits, chosen, 1 / 16)
    logp = torch.log_softmax(logits, -1)
    assert float(entropy) == pytest.approx(float(-(logp.exp() * logp).sum()), rel=1e-5)
    # about the tail's share of the divergence (cover 0.95): positive, finite, well under the entropy
    assert 0 < float(kl) < float(entropy)
    # keeping every token leaves only the codes' rounding: (step / 2)^2 / 3 / 2 nats at most per row
    everything = cache_format.select(logits / 3, top_k=300, cover=1.0, step=1 / 16)
    assert 0 < float(cache_format.fidelity(logits / 3, everything, 1 / 16)[0]) / 16 < (1 / 32) ** 2 / 6 * 1.5


def test_encoded_rows_keep_only_the_kept_entries_in_order() -> None:
    chosen = Selected(
        ids=torch.tensor([[5, 7, 9], [4, 1, 2]], dtype=torch.int32),
        codes=torch.tensor([[0, 3, 8], [0, 9, 9]], dtype=torch.uint8),
        counts=torch.tensor([3, 1], dtype=torch.int16),
        log_tail=torch.tensor([-3.0, -2.0], dtype=torch.float16),
    )
    rows = cache_format.encode_rows(chosen)
    assert rows["ids"].tolist() == [5, 7, 9, 4]
    assert rows["codes"].tolist() == [3, 8]
    assert rows["counts"].tolist() == [3, 1]


@pytest.mark.parametrize("width", [300, 1280, 1337])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_tiled_topk_finds_the_same_values_as_torch_topk(width: int, k: int) -> None:
    generator = torch.Generator().manual_seed(width + k)
    logits = torch.randn(64, width, generator=generator)
    logits[:8] = logits[:8].round()  # many ties
    logits[8:16, -5:] += 10  # the largest values past the last whole tile
    tile_max, lse = cache_format.tile_stats(logits, tile=16)
    assert torch.equal(tile_max, logits[:, : width // 16 * 16].unflatten(1, (-1, 16)).amax(-1))
    assert torch.allclose(lse, torch.logsumexp(logits, -1))
    got = cache_format.tiled_topk(logits, k, tile_max, tile=16)
    want = logits.topk(k, -1)
    assert torch.equal(got.values, want.values)
    assert torch.equal(logits.gather(1, got.indices), got.values)  # the ids hold those values
    assert all(len(set(row)) == k for row in got.indices.tolist())  # k different tokens
