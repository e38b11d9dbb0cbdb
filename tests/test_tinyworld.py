"""The tiny world: reproducible corpus with disjoint splits, a byte-level tokenizer shipped with each
model, and a teacher that is genuinely better than the untrained student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dist_bench import tinyworld
from dist_bench.tinyworld import build
from dist_bench.tinyworld import data as corpus
from dist_bench.tinyworld.tokenizer import build_tokenizer

DATA = tinyworld.ASSETS / "data"


def test_shipped_corpus_is_what_the_generator_writes(tmp_path: Path) -> None:
    corpus.write_corpus(tmp_path)
    for shipped in sorted(DATA.glob("*.jsonl")):
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


def test_train_and_eval_splits_are_disjoint() -> None:
    def questions(name: str) -> set[str]:
        rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
        return {json.dumps([r["question"], r.get("choices")]) for r in rows}

    assert not questions("arith_train") & questions("arith_eval")
    assert not questions("mc_train") & questions("mc_eval")
    prompts = {json.loads(line)["prompt"] for line in (DATA / "kd_train.jsonl").read_text().splitlines()}
    eval_prompts = {
        corpus.arith_prompt(json.loads(line)) for line in (DATA / "arith_eval.jsonl").read_text().splitlines()
    }
    assert not prompts & eval_prompts


@pytest.mark.parametrize("model", ["teacher", "student-init"])
def test_shipped_tokenizer_is_the_byte_level_one_built_in_code(model: str) -> None:
    shipped = AutoTokenizer.from_pretrained(tinyworld.resolve(f"tinyworld:{model}"))
    built = build_tokenizer()
    assert shipped.get_vocab() == built.get_vocab() and shipped.eos_token == built.eos_token
    text = "Question: What is 07 + 35?\nAnswer: #### 42 ü"
    ids = shipped(text)["input_ids"]
    assert ids == list(text.encode()) and shipped.decode(ids) == text


def test_unknown_tinyworld_asset_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="tinyworld:nope: no such tiny-world asset"):
        tinyworld.resolve("tinyworld:nope")


def test_teacher_is_far_better_than_the_untrained_student() -> None:
    torch.manual_seed(0)
    scores = {}
    for name in ("teacher", "student-init"):
        path = tinyworld.resolve(f"tinyworld:{name}")
        model = AutoModelForCausalLM.from_pretrained(path)
        scores[name] = build.greedy_accuracy(model, AutoTokenizer.from_pretrained(path), DATA)
    assert scores["teacher"]["arith_exact_match"] >= 0.95 and scores["teacher"]["mc_acc"] >= 0.95
    assert scores["student-init"]["arith_exact_match"] == 0.0 and scores["student-init"]["mc_acc"] < 0.4
    shapes = {
        name: AutoModelForCausalLM.from_pretrained(tinyworld.resolve(f"tinyworld:{name}")).config
        for name in scores
    }
    assert shapes["teacher"].num_hidden_layers == build.TEACHER["num_hidden_layers"]
    assert shapes["student-init"].hidden_size == build.STUDENT["hidden_size"]


def test_build_script_makes_loadable_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["build", "--out", str(tmp_path), "--steps", "3", "--device", "cpu"])
    build.main()
    record = json.loads((tmp_path / "BUILD.json").read_text())
    assert record["teacher_steps"] == 3 and set(record["teacher_greedy_accuracy"]) == {
        "arith_exact_match",
        "mc_acc",
    }
    for name in ("teacher", "student-init"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert model.config.vocab_size == len(build_tokenizer())
    # The untrained student is seeded: rebuilding gives the shipped weights exactly.
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path / "student-init").state_dict()
    shipped = AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init")).state_dict()
    assert all(torch.equal(rebuilt[k], shipped[k]) for k in shipped)
