"""generation.backend `graph` (dist_bench/teacher/static_decode.py): on CPU its decode loop runs eagerly
and gives `generate`'s completions token for token, greedy and seeded sampling alike (same forward,
warpers and sampling); batches share one decoder state; `auto` picks it only on CUDA for a capturable
teacher; pre-flight refuses `graph` for a teacher that cannot be captured. On a GPU, the captured and
replayed step gives the eager step's tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from test_preflight import assert_rejected, dist_bench

from conftest import PROJECT, SMALL, small_config
from dist_bench import tinyworld
from dist_bench.teacher import generation, sampling, static_decode
from dist_bench.teacher.interface import Decoding
from dist_bench.teacher.local import LocalTeacher, resolve_backend

SFT_CONFIG = str(PROJECT / "configs/experiments/tiny_sft.yaml")
GENERATE = ["pipeline=sft", "generation.enabled=true", "generation.max_prompts=40"]
DECODINGS = {
    "greedy": Decoding(1, 0.0, 1.0, None, 12, ()),
    "sampled": Decoding(2, 0.7, 0.9, 20, 12, ()),  # temperature, top-k and top-p warpers, two samples
    "temperature 1": Decoding(3, 1.0, 1.0, None, 12, ()),
    "stop string": Decoding(1, 0.0, 1.0, None, 12, ("##",)),
    "cut by length": Decoding(1, 0.0, 1.0, None, 3, ()),
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalTeacher, LocalTeacher, list]:
    cfg = small_config(tmp_path_factory.mktemp("w"), *GENERATE)
    plain = LocalTeacher.load(cfg, torch.device("cpu"))
    plain.batch_size = 7  # 40 prompts: five batches of 7, then one of 5 (a second decoder state)
    graph = LocalTeacher(plain.model, plain.tokenizer, 7, plain.chat_template, plain.identity(), "graph")
    return plain, graph, generation.read_prompts(cfg)


@pytest.mark.parametrize("name", DECODINGS)
def test_graph_backend_writes_what_generate_writes(teachers: tuple, name: str) -> None:
    plain, graph, prompts = teachers
    decoding = DECODINGS[name]
    expected = plain.generate(prompts, decoding, seed=3)
    got = graph.generate(prompts, decoding, seed=3)
    assert got == expected  # text, finish reason, prompt and completion tokens, every sample
    reasons = [c.finish_reason for row in got for c in row]
    assert ("length" in reasons) == (name == "cut by length") and "stop" in reasons
    if name == "stop string":  # the loop ran on past the stop string; only the tokens through it count
        unstopped = graph.generate(prompts, DECODINGS["greedy"], seed=3)
        cut = [(a[0], b[0]) for a, b in zip(got, unstopped, strict=True) if "##" in b[0].text]
        assert len(cut) >= 10
        for stopped, full in cut:
            assert full.text.startswith(stopped.text) and "##" not in stopped.text
            assert stopped.completion_tokens < full.completion_tokens
    assert graph.identity()["backend"] == "transformers.static-cache-graph"
    assert plain.identity()["backend"] == "transformers.generate"


def test_reading_the_cache_only_up_to_the_written_slots_changes_nothing(
    teachers: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decode steps attend over the cache up to the next multiple of KEY_BLOCK past the written slots;
    with blocks of 8 nearly every step reads a different length, and the rows are still generate's."""
    plain, graph, prompts = teachers
    monkeypatch.setattr(static_decode, "KEY_BLOCK", 8)
    seen: list[int | None] = []
    attention = static_decode.grouped_query_decode_attention

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(static_decode._key_limit)
        return attention(*args, **kwargs)

    monkeypatch.setitem(transformers.AttentionInterface._global_mapping, static_decode.ATTENTION, spy)
    for decoding in (DECODINGS["greedy"], DECODINGS["sampled"]):
        assert graph.generate(prompts, decoding, seed=4) == plain.generate(prompts, decoding, seed=4)
    assert len({limit for limit in seen if limit is not None}) >= 4


def test_batches_of_one_shape_share_one_decoder_state(teachers: tuple) -> None:
    _, graph, prompts = teachers
    decoding = DECODINGS["greedy"]
    graph.generate(prompts[:7], decoding, seed=0)
    state = graph._decoder._state
    keys = state.cache.layers[0].keys
    graph.generate(prompts[7:14], decoding, seed=0)
    assert graph._decoder._state is state and state.cache.layers[0].keys is keys  # reused in place
    graph.generate(prompts[:3], decoding, seed=0)
    assert graph._decoder._state is not state  # another row count: its own cache


def test_the_teachers_generation_defaults_do_not_leak_into_the_decoding(teachers: tuple) -> None:
    """A teacher's generation_config.json may set a repetition penalty, min_p, ...: the rows record the
    config's decoding, so `generate` must not apply them behind its back (the graph loop never does)."""
    plain, graph, prompts = teachers
    decoding = DECODINGS["sampled"]
    expected = graph.generate(prompts[:14], decoding, seed=5)
    defaults = plain.model.generation_config
    saved = defaults.to_dict()
    defaults.repetition_penalty, defaults.min_p, defaults.no_repeat_ngram_size = 5.0, 0.5, 2
    try:
        assert plain.generate(prompts[:14], decoding, seed=5) == expected
    finally:
        for key, value in saved.items():
            setattr(defaults, key, value)


def test_auto_is_the_graph_loop_on_cuda_for_a_capturable_teacher() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", cpu, transformers.LlamaForCausalLM) == "generate"
    assert resolve_backend("auto", cuda, transformers.LlamaForCausalLM) == "graph"
    assert resolve_backend("auto", cuda, transformers.MptForCausalLM) == "generate"  # not capturable
    assert resolve_backend("generate", cuda, transformers.LlamaForCausalLM) == "generate"
    assert resolve_backend("graph", cpu, transformers.LlamaForCausalLM) == "graph"  # eager there


def test_preflight_refuses_graph_for_a_teacher_it_cannot_capture(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tinyworld.ASSETS / "teacher", teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "architectures": ["MptForCausalLM"]}))
    done = dist_bench(
        tmp_path, "generate", "--config", SFT_CONFIG, *SMALL, f"teacher.model={teacher}",
        "generation.backend=graph",
    )  # fmt: skip
    assert_rejected(done, tmp_path, "generation.backend", "MptForCausalLM")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the captured step")
def test_the_captured_step_replays_what_the_eager_step_computes(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, *GENERATE, "train.device=cuda")
    graph = LocalTeacher.load(cfg, torch.device("cuda"))
    assert graph.backend == "graph"  # auto, on CUDA
    prompts = generation.read_prompts(cfg)
    sampled = Decoding(2, 5.0, 1.0, None, 40, ())  # the race sampler; hot enough that seeds tell apart
    nucleus = Decoding(2, 0.7, 0.9, 20, 40, ())  # transformers' warpers and torch's multinomial
    for decoding in (DECODINGS["greedy"], sampled, nucleus):
        replayed = graph.generate(prompts, decoding, seed=1)
        assert graph._decoder._state.graphs  # captured: one graph per key length the decode reached
        graph._decoder.capture, graph._decoder._state = False, None
        eager = graph.generate(prompts, decoding, seed=1)
        graph._decoder.capture, graph._decoder._state = True, None
        if decoding is not nucleus:  # torch's multinomial draws from other offsets inside a graph
            assert replayed == eager
        assert {len(row) for row in replayed} == {decoding.n}
        if decoding.greedy:
            assert [row[0].text for row in replayed] == [p.reference for p in prompts]  # the teacher is right
        if decoding is sampled:
            assert replayed != graph.generate(prompts, decoding, seed=2)  # the seed matters


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the Triton sampler")
@pytest.mark.parametrize("vocab", [10, 5000])  # one block of columns; two, the second partly outside
def test_the_race_sampler_draws_from_the_softmax(vocab: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(vocab, device="cuda") * 2
    rows = 200_000
    drawn = sampling.race_sample(
        logits.expand(rows, vocab).to(torch.bfloat16), 0.7, torch.tensor([7], device="cuda")
    )
    expected = torch.softmax(logits.to(torch.bfloat16).float() / 0.7, -1)
    reference = torch.multinomial(expected, rows, replacement=True)  # torch's own sampler, same sample size
    distance = 0.5 * (torch.bincount(drawn, minlength=vocab) / rows - expected).abs().sum()
    torch_distance = 0.5 * (torch.bincount(reference, minlength=vocab) / rows - expected).abs().sum()
    assert distance < 1.5 * torch_distance + 0.002, (float(distance), float(torch_distance))
