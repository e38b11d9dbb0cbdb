"""The KD loss on padded rows (the logit cache's format 2 keeps a variable number of tokens per position):
a padded entry (teacher log-prob -inf, a repeat of the row's first id) is absent, exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dist_bench.student.losses import DIVERGENCES, TAILS, kd_loss, kd_loss_dense

N, H, V, K = 20, 12, 60, 5
REAL = [1 + i % K for i in range(N)]  # real entries per row: 1, 2, .., 5, 1, 2, ..


def inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=torch.float64), -1).topk(K)
    return {
        "hidden": torch.randn(N, H, generator=g, dtype=torch.float64),
        "weight": 0.5 * torch.randn(V, H, generator=g, dtype=torch.float64),
        "bias": 0.1 * torch.randn(V, generator=g, dtype=torch.float64),
        "targets": torch.randint(0, V, (N,), generator=g),
        "teacher_ids": teacher.indices,
        "teacher_logprobs": teacher.values,
    }


def padded(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pad = torch.arange(K)[None, :] >= torch.tensor(REAL)[:, None]
    ids = torch.where(pad, data["teacher_ids"][:, :1], data["teacher_ids"])
    return {
        **data,
        "teacher_ids": ids,
        "teacher_logprobs": data["teacher_logprobs"].masked_fill(pad, -math.inf),
    }


def leaves(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: data[name].detach().clone().requires_grad_() for name in ("hidden", "weight", "bias")}


def reference(data: dict[str, torch.Tensor], **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss with every row's padding cut off: rows grouped by their real count, each group's mean
    weighted by its share of the rows (the loss is a mean over rows)."""
    params = leaves(data)
    total = torch.zeros((), dtype=torch.float64)
    for count in sorted(set(REAL)):
        rows = torch.tensor([i for i, c in enumerate(REAL) if c == count])
        group = kd_loss_dense(
            params["hidden"][rows], params["weight"], params["bias"], data["targets"][rows],
            data["teacher_ids"][rows, :count], data["teacher_logprobs"][rows, :count], **options,
        )  # fmt: skip
        total = total + group.loss * len(rows) / N
    total.backward()
    return total.detach(), [params[name].grad for name in ("hidden", "weight", "bias")]


CASES = [
    (impl, divergence, tail, temperature, beta)
    for impl, (divergence, beta), tail, temperature in itertools.product(
        ("dense", "chunked", "fused"),
        [(d, 0.5) for d in DIVERGENCES] + [("jsd", 0.0), ("jsd", 1.0)],
        TAILS,
        (1.0, 2.0),
    )
    if not (impl == "fused" and tail == "bucket")
]


@pytest.mark.parametrize(("impl", "divergence", "tail", "temperature", "beta"), CASES)
def test_padding_is_absent_from_the_loss_and_its_gradients(
    impl: str, divergence: str, tail: str, temperature: float, beta: float
) -> None:
    data = inputs()
    options = dict(temperature=temperature, ce_weight=0.3, divergence=divergence, jsd_beta=beta, tail=tail)
    want_loss, want_grads = reference(data, **options)
    batch = padded(data)
    params = leaves(batch)
    args = {**batch, **params}
    if impl == "dense":
        out = kd_loss_dense(**args, **options)
    else:
        out = kd_loss(**args, **options, impl=impl, chunk_size=7)
    out.loss.backward()
    # fused: its fp64 tile twin differs from dense by ~4e-10 on these inputs with no padding at all
    atol = 1e-8 if impl == "fused" else 1e-10
    torch.testing.assert_close(out.loss.detach(), want_loss, rtol=0, atol=atol)
    for name, want in zip(("hidden", "weight", "bias"), want_grads, strict=True):
        got = params[name].grad
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, rtol=0, atol=atol)


def test_without_padding_the_mask_changes_nothing() -> None:
    data = inputs(seed=1)
    for divergence, tail in itertools.product(DIVERGENCES, TAILS):
        options = dict(temperature=1.5, ce_weight=0.5, divergence=divergence, tail=tail)
        dense = kd_loss_dense(**data, **options).loss
        chunked = kd_loss(**data, **options, impl="chunked").loss
        torch.testing.assert_close(chunked, dense, rtol=0, atol=1e-10)
