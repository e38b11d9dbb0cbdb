"""The KD loss, both implementations (impl="fused": vocabulary tiles folded by student/kernels.py, the
default for tail="renormalize"; impl="chunked"): same values and gradients as the plain dense statement of
the maths (fp64, 1e-12: on CPU both paths stay in fp64), the project's current loss for forward KL, TRL's
generalised JSD convention, any chunking and vocabulary tiling, zero divergence against itself, a memory
peak of one chunk rather than [N, V], bf16 inputs, and clear argument errors. (The Triton kernels of the
fused path run on CUDA only: bench/kd_loss_profile.py checks them against this path on the GPU.)"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dist_bench.student import losses
from dist_bench.student.losses import DIVERGENCES, TAILS, KDLossOutput, kd_loss, kd_loss_dense

N, H, V, K = 37, 16, 300, 8
FUSED_ATOL = 1e-12  # the fused path against fp64: its torch twin of the tile kernels stays in fp64


def make_inputs(dtype: torch.dtype = torch.float64, k: int = K, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random student head and a teacher cache: the top-k of a different, peaked full-vocab distribution."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2 * torch.randn(N, V, generator=g, dtype=torch.float64), -1).topk(k)
    return {
        "hidden": torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype),
        "weight": (0.5 * torch.randn(V, H, generator=g, dtype=torch.float64)).to(dtype),
        "bias": (0.1 * torch.randn(V, generator=g, dtype=torch.float64)).to(dtype),
        "targets": torch.randint(0, V, (N,), generator=g),
        "teacher_ids": teacher.indices,
        "teacher_logprobs": teacher.values.float(),
    }


def loss_and_grads(fn, inputs: dict[str, torch.Tensor], **kwargs) -> tuple[KDLossOutput, list[torch.Tensor]]:
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in ("hidden", "weight", "bias")}
    out = fn(**{**inputs, **leaves}, **kwargs)
    out.loss.backward()
    return out, [leaves[name].grad for name in ("hidden", "weight", "bias")]


def assert_same(
    a: tuple[KDLossOutput, list[torch.Tensor]], b: tuple[KDLossOutput, list[torch.Tensor]], atol: float
):
    for x, y in zip([*a[0], *a[1]], [*b[0], *b[1]], strict=True):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("divergence", "tail", "temperature"), list(itertools.product(DIVERGENCES, TAILS, (1.0, 2.0)))
)
def test_chunked_matches_dense_reference_in_fp64(divergence: str, tail: str, temperature: float) -> None:
    inputs = make_inputs()
    kwargs = {"divergence": divergence, "tail": tail, "temperature": temperature, "ce_weight": 0.3}
    chunked = loss_and_grads(kd_loss, inputs, chunk_size=10, impl="chunked", **kwargs)  # chunks 10, 10, 10, 7
    dense = loss_and_grads(kd_loss_dense, inputs, **kwargs)
    assert_same(chunked, dense, atol=1e-6)
    assert chunked[0].divergence > 0


@pytest.mark.parametrize(("divergence", "temperature"), list(itertools.product(DIVERGENCES, (1.0, 2.0))))
def test_fused_matches_dense_reference_in_fp64(divergence: str, temperature: float) -> None:
    inputs = make_inputs()
    kwargs = {"divergence": divergence, "temperature": temperature, "ce_weight": 0.3}
    fused = loss_and_grads(kd_loss, inputs, chunk_size=10, **kwargs)  # the default for renormalize
    dense = loss_and_grads(kd_loss_dense, inputs, **kwargs)
    assert_same(fused, dense, atol=FUSED_ATOL)


@pytest.mark.parametrize(("divergence", "temperature"), list(itertools.product(DIVERGENCES, (1.0, 2.0))))
def test_fused_matches_chunked_in_fp32(divergence: str, temperature: float) -> None:
    inputs = make_inputs(torch.float32)
    kwargs = {"divergence": divergence, "temperature": temperature, "ce_weight": 0.3, "chunk_size": 10}
    fused = loss_and_grads(kd_loss, inputs, impl="fused", **kwargs)
    assert_same(fused, loss_and_grads(kd_loss, inputs, impl="chunked", **kwargs), atol=1e-5)


@pytest.mark.parametrize(("divergence", "temperature"), list(itertools.product(DIVERGENCES, (1.0, 2.0))))
def test_fused_over_several_vocabulary_tiles(monkeypatch, divergence: str, temperature: float) -> None:
    """Tiles of 64 entries (the last one 44 wide): the online log-sum-exp, the target's and the ids' logits
    and the gradients' ids entries are found in whichever tile holds them."""
    monkeypatch.setattr(losses, "VOCAB_TILE", 64)
    inputs = make_inputs()
    kwargs = {"divergence": divergence, "temperature": temperature, "ce_weight": 0.3}
    fused = loss_and_grads(kd_loss, inputs, chunk_size=10, **kwargs)
    assert_same(fused, loss_and_grads(kd_loss_dense, inputs, **kwargs), atol=FUSED_ATOL)


@pytest.mark.parametrize(
    ("divergence", "tail", "impl"), list(itertools.product(DIVERGENCES, TAILS, ("fused", "chunked")))
)
def test_duplicate_ids_get_the_gradient_of_the_formula(divergence: str, tail: str, impl: str) -> None:
    """Duplicates are not merged (documented), but the analytic gradient still is the formula's gradient."""
    inputs = make_inputs()
    inputs["teacher_ids"] = inputs["teacher_ids"].clone()
    inputs["teacher_ids"][::3, 1] = inputs["teacher_ids"][::3, 0]
    kwargs = {"divergence": divergence, "tail": tail, "temperature": 2.0}
    out = loss_and_grads(kd_loss, inputs, chunk_size=10, impl=impl, **kwargs)
    atol = FUSED_ATOL if impl == "fused" and tail == "renormalize" else 1e-12
    assert_same(out, loss_and_grads(kd_loss_dense, inputs, **kwargs), atol=atol)


@pytest.mark.parametrize(("tail", "beta"), list(itertools.product(TAILS, (0.0, 0.3, 1.0))))
def test_jsd_beta_matches_dense_and_its_endpoints_are_the_kls(tail: str, beta: float) -> None:
    inputs = make_inputs()
    kwargs = {"divergence": "jsd", "jsd_beta": beta, "tail": tail, "temperature": 2.0}
    assert_same(
        loss_and_grads(kd_loss, inputs, chunk_size=10, **kwargs),
        loss_and_grads(kd_loss_dense, inputs, **kwargs),
        1e-6,
    )
    if tail == "bucket" and beta in (0.0, 1.0):  # same K+1-way P and Q as the KLs use
        kl = "forward_kl" if beta == 0.0 else "reverse_kl"
        jsd = kd_loss(**inputs, **kwargs).divergence
        torch.testing.assert_close(jsd, kd_loss(**inputs, **{**kwargs, "divergence": kl}).divergence)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_follows_trl_generalized_jsd_convention(beta: float) -> None:
    """With the whole vocabulary cached (K = V) the renormalised distributions are the full ones, so the
    divergence must equal TRL's GKDTrainer.generalized_jsd_loss on the full logits."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    inputs = make_inputs(k=V)
    teacher_logits = torch.empty(N, V, dtype=torch.float64).scatter_(
        1, inputs["teacher_ids"], inputs["teacher_logprobs"].double()
    )
    inputs["teacher_logprobs"] = inputs["teacher_logprobs"].double()
    student_logits = inputs["hidden"] @ inputs["weight"].T + inputs["bias"]
    expected = gkd.GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta, temperature=2.0)
    out = kd_loss(**inputs, divergence="jsd", jsd_beta=beta, temperature=2.0, chunk_size=10)
    torch.testing.assert_close(out.divergence, expected, rtol=1e-10, atol=1e-12)


def project_formula(hidden, weight, bias, targets, teacher_ids, teacher_logprobs, temperature, ce_weight):
    """The loss in dist_bench/student/kd.py `kd_loss`, copied as it is (P supervised positions)."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()  # [P, V]
    ce = torch.nn.functional.cross_entropy(logits, targets)
    teacher_logp = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    student_logp = torch.log_softmax(logits / temperature, dim=-1).gather(1, teacher_ids)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    loss = ce_weight * ce + (1 - ce_weight) * temperature**2 * kl
    return KDLossOutput(loss, ce.detach(), kl.detach())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_kl_renormalize_is_the_projects_current_loss(temperature: float) -> None:
    inputs = make_inputs(torch.float32)
    kwargs = {"temperature": temperature, "ce_weight": 0.25}
    reference = loss_and_grads(project_formula, inputs, **kwargs)
    dense = loss_and_grads(kd_loss_dense, inputs, **kwargs)
    assert_same(dense, reference, atol=0)  # same operations, bit for bit
    for impl in ("fused", "chunked"):
        out = loss_and_grads(kd_loss, inputs, chunk_size=10, impl=impl, **kwargs)
        assert_same(out, reference, atol=1e-5)  # fp32: same maths, other rounding


@pytest.mark.parametrize(
    ("divergence", "tail", "impl"), list(itertools.product(DIVERGENCES, TAILS, ("fused", "chunked")))
)
def test_chunk_size_does_not_change_values_or_gradients(divergence: str, tail: str, impl: str) -> None:
    inputs = make_inputs()
    kwargs = {"divergence": divergence, "tail": tail, "temperature": 2.0, "impl": impl}
    whole = loss_and_grads(kd_loss, inputs, chunk_size=None, **kwargs)
    for chunk_size in (1, 7, 36, 37, 1024):
        assert_same(loss_and_grads(kd_loss, inputs, chunk_size=chunk_size, **kwargs), whole, atol=1e-12)


def own_cache(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A teacher cache made from the student itself: its full-vocab log-probs (T=1) at its own top-k."""
    logits = inputs["hidden"] @ inputs["weight"].T + inputs["bias"]
    top = torch.log_softmax(logits, -1).topk(K)
    return {**inputs, "teacher_ids": top.indices, "teacher_logprobs": top.values}


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_divergence_is_zero_against_the_student_itself(divergence: str) -> None:
    inputs = own_cache(make_inputs())
    zero = {"divergence": divergence, "ce_weight": 0.0, "chunk_size": 10}
    # bucket at T=1: teacher and student K+1-way distributions coincide, so D and its gradient vanish.
    out, grads = loss_and_grads(kd_loss, inputs, tail="bucket", **zero)
    assert abs(out.divergence) < 1e-12
    assert all(g.abs().max() < 1e-12 for g in grads)
    # renormalize, any T: reverse KL and JSD compare softmax over the same K logits on both sides.
    if divergence != "forward_kl":
        for t in (1.0, 2.0):
            assert abs(kd_loss(**inputs, tail="renormalize", temperature=t, **zero).divergence) < 1e-12
    # > 0 otherwise: another teacher; bucket at T != 1 (the rest-mass is tempered as one entry).
    assert kd_loss(**make_inputs(), tail="bucket", **zero).divergence > 1e-3
    assert kd_loss(**inputs, tail="bucket", temperature=2.0, **zero).divergence > 1e-6


def test_renormalized_forward_kl_against_itself_is_the_mass_outside_the_top_k() -> None:
    """p = q renormalised over the k ids, so KL(p || q_k) = -log sum_k q_k > 0: it pushes mass into the top-k."""
    inputs = own_cache(make_inputs())
    expected = -torch.logsumexp(inputs["teacher_logprobs"], -1).mean()
    for impl, atol in (("chunked", 1e-12), ("fused", FUSED_ATOL)):
        out = kd_loss(**inputs, divergence="forward_kl", tail="renormalize", chunk_size=10, impl=impl)
        torch.testing.assert_close(out.divergence, expected, rtol=0, atol=atol)
    assert expected > 1e-3


def peak_bytes(trace: Path, fn, inputs: dict[str, torch.Tensor], **kwargs) -> int:
    """Peak of the bytes allocated, net of frees, while `fn` runs forward and backward.

    The PyTorch profiler with profile_memory=True records every CPU allocator allocation and free as a
    "[memory]" event whose Bytes is positive or negative; the running sum of Bytes in time order is the
    memory live above the starting point (inputs already allocated do not count), its maximum the peak.
    """
    leaves = {name: inputs[name].detach().clone().requires_grad_() for name in ("hidden", "weight")}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(**{**inputs, **leaves}, **kwargs).loss.backward()
    prof.export_chrome_trace(str(trace))
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    events.sort(key=lambda e: (e["ts"], e["args"]["Ev Idx"]))
    running, peak = 0, 0
    for e in events:
        running += e["args"]["Bytes"]
        peak = max(peak, running)
    return peak


def test_chunked_peak_memory_is_a_fraction_of_the_dense_one(tmp_path: Path, monkeypatch) -> None:
    n, h, v, k = 1024, 64, 32000, 16
    g = torch.Generator().manual_seed(0)
    inputs = {
        "hidden": torch.randn(n, h, generator=g),
        "weight": 0.1 * torch.randn(v, h, generator=g),
        "bias": None,
        "targets": torch.randint(0, v, (n,), generator=g),
        "teacher_ids": torch.randint(0, v, (n, k), generator=g),
        "teacher_logprobs": torch.log_softmax(torch.randn(n, k, generator=g), -1) - 1.0,
    }
    kwargs = {"temperature": 2.0, "divergence": "jsd", "tail": "bucket"}
    dense = peak_bytes(tmp_path / "dense.json", kd_loss_dense, inputs, **kwargs)
    chunked = peak_bytes(tmp_path / "chunked.json", kd_loss, inputs, chunk_size=128, **kwargs)
    full_logits = n * v * 4
    assert dense >= full_logits  # the measurement sees the dense path's [N, V] fp32 logits
    assert chunked < 0.25 * dense, (chunked, dense)
    assert chunked < full_logits / 2, (chunked, full_logits)
    # The fused path (renormalize) holds one [chunk, tile] logit tile (and, in its CPU twin, a few fp32
    # copies of it). At the tile of 32768 >= V here one tile is the whole vocabulary, so the tile is shrunk
    # to V / 32, as 32768 is ~V / 5 at V = 151,936. Measured: nothing else in the path is [N, V].
    monkeypatch.setattr(losses, "VOCAB_TILE", 1000)
    kwargs["tail"] = "renormalize"
    dense = peak_bytes(tmp_path / "dense_renormalize.json", kd_loss_dense, inputs, **kwargs)
    fused = peak_bytes(tmp_path / "fused.json", kd_loss, inputs, chunk_size=128, **kwargs)
    assert fused < 0.25 * dense, (fused, dense)
    assert fused < full_logits / 2, (fused, full_logits)


def test_bf16_inputs() -> None:
    inputs = make_inputs(torch.bfloat16)
    reference = {**inputs, **{name: inputs[name].float() for name in ("hidden", "weight", "bias")}}
    for divergence, tail, impl in itertools.product(DIVERGENCES, TAILS, ("fused", "chunked")):
        kwargs = {"divergence": divergence, "tail": tail, "temperature": 2.0, "chunk_size": 10}
        out, grads = loss_and_grads(kd_loss, inputs, impl=impl, **kwargs)
        ref, ref_grads = loss_and_grads(kd_loss, reference, impl="chunked", **kwargs)
        assert out.loss.dtype == torch.float32
        torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=1e-3)
        for grad, ref_grad in zip(grads, ref_grads, strict=True):
            assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
            cos = torch.nn.functional.cosine_similarity(grad.float().flatten(), ref_grad.flatten(), dim=0)
            assert cos > 0.99, (divergence, tail, impl, cos)


def test_no_grad_partial_grad_tied_weights_and_grad_output_scaling() -> None:
    inputs = make_inputs()
    expected, (_, grad_w, _) = loss_and_grads(kd_loss_dense, inputs, divergence="jsd", tail="bucket")
    with torch.no_grad():
        out = kd_loss(**inputs, divergence="jsd", tail="bucket", chunk_size=10)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-12)
    # Only the weight requires grad: it alone gets one, scaled by the gradient flowing into the loss.
    weight = inputs["weight"].clone().requires_grad_()
    (
        3 * kd_loss(**{**inputs, "weight": weight}, divergence="jsd", tail="bucket", chunk_size=10).loss
    ).backward()
    torch.testing.assert_close(weight.grad, 3 * grad_w, rtol=0, atol=1e-12)
    # Weight tied to the input embedding: both paths' gradients land on the one parameter.
    tokens = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, fn in (("fused", kd_loss), ("chunked", kd_loss), ("dense", kd_loss_dense)):
        tied = inputs["weight"].clone().requires_grad_()
        impl = {} if name == "dense" else {"impl": name}
        fn(
            **{**inputs, "hidden": torch.tanh(tied[tokens]), "weight": tied}, chunk_size=10, **impl
        ).loss.backward()
        grads[name] = tied.grad
    torch.testing.assert_close(grads["chunked"], grads["dense"], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["fused"], grads["dense"], rtol=0, atol=FUSED_ATOL)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_no_grad_and_partial_grad(divergence: str) -> None:
    inputs = make_inputs()
    kwargs = {"divergence": divergence, "temperature": 2.0}
    expected, (_, grad_w, _) = loss_and_grads(kd_loss_dense, inputs, **kwargs)
    with torch.no_grad():
        out = kd_loss(**inputs, **kwargs)
    assert not out.loss.requires_grad
    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=FUSED_ATOL)
    weight = inputs["weight"].clone().requires_grad_()
    (3 * kd_loss(**{**inputs, "weight": weight}, **kwargs).loss).backward()
    torch.testing.assert_close(weight.grad, 3 * grad_w, rtol=0, atol=FUSED_ATOL)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"divergence": "kl"}, "unknown divergence"),
        ({"tail": "drop"}, "unknown tail"),
        ({"hidden": torch.zeros(N, H + 1)}, "hidden must be"),
        ({"bias": torch.zeros(V + 1)}, "bias must be"),
        ({"targets": torch.zeros(N + 1, dtype=torch.long)}, "targets must be"),
        ({"teacher_ids": torch.zeros(N, K + 1, dtype=torch.long)}, "teacher_logprobs .* differ"),
        ({"teacher_ids": torch.zeros(N, K)}, "teacher_ids must be an integer"),
        ({"temperature": 0.0}, "temperature"),
        ({"ce_weight": 1.5}, "ce_weight"),
        ({"jsd_beta": -0.1}, "jsd_beta"),
        ({"chunk_size": 0}, "chunk_size"),
        (
            {
                "tail": "bucket",
                "teacher_ids": torch.zeros(N, V, dtype=torch.long),
                "teacher_logprobs": torch.zeros(N, V),
            },
            "K < V",
        ),
        (
            {
                "hidden": torch.zeros(0, H),
                "targets": torch.zeros(0, dtype=torch.long),
                "teacher_ids": torch.zeros(0, K, dtype=torch.long),
                "teacher_logprobs": torch.zeros(0, K),
            },
            "no supervised positions",
        ),
    ],
)
def test_invalid_arguments(change: dict, message: str) -> None:
    inputs = {**make_inputs(torch.float32), **change}
    for fn in (kd_loss, kd_loss_dense):
        with pytest.raises(ValueError, match=message):
            fn(**inputs)


def test_unknown_impl() -> None:
    with pytest.raises(ValueError, match="unknown impl"):
        kd_loss(**make_inputs(torch.float32), impl="triton")
