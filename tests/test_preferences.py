"""teacher_generation in preference mode (teacher/preferences.py), then dpo on its pairs.

tiny_dpo raises held-out exact match over its init and prefers the teacher's answers on held-out pairs;
teacher_vs_student pairs are exactly the two models' answers; a judge behind a real OpenAI-compatible
server on 127.0.0.1 rates the teacher's samples and the best is paired against the worst, its tokens in
the stage's; a killed stage resumes to byte-identical pairs without redoing a finished shard; pairs are
reused when only DPO settings change; bad preference settings stop pre-flight."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from api_server import ApiServer, Behaviour
from mlflow.tracking import MlflowClient
from test_preflight import assert_rejected, dist_bench

from conftest import PROJECT, SMALL, small_config
from dist_bench import pipeline, preflight
from dist_bench.config import ConfigError, load_config
from dist_bench.preflight import PreflightError
from dist_bench.teacher.interface import Prompt
from dist_bench.teacher.local import LocalTeacher

TINY_DPO = PROJECT / "configs/experiments/tiny_dpo.yaml"
KEY_ENV = "DIST_BENCH_TEST_API_KEY"
KEY = "sk-test-judge-77d1"


def rows(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for shard in sorted(folder.glob("shard-*.jsonl"))
        for line in shard.read_text().splitlines()
    ]


def test_tiny_dpo_learns_the_teachers_preferences(workdir: Path) -> None:
    """The tiny world's dpo row at a fifth of its token budget: the pairs are the teacher's answer against
    the under-trained student's wherever they differ; DPO raises exact match on the held-out eval split
    over the init's and prefers the chosen answer on most held-out pairs; changing a DPO setting reuses
    the pairs."""
    base = [f"output.run_dir={workdir / 'runs'}", "energy.codecarbon=false"]
    cfg = load_config(TINY_DPO, [*base, "train.token_budget=600000"])
    first = pipeline.dpo(cfg)
    assert [s.stage for s in first.stages] == ["teacher_generation", "dpo_training", "eval"]
    built, trained, evaluated = first.stages

    stage_dir = built.outputs["preference_dataset"].parent
    teacher = {r["prompt_id"]: r for r in rows(stage_dir / "generation/shards")}
    student = {r["prompt_id"]: r for r in rows(stage_dir / "generation/student-shards")}
    assert len(teacher) == len(student) == 2300  # every arithmetic prompt, answered by both
    expected = [
        {"prompt": t["prompt"], "chosen": t["completion"], "rejected": student[i]["completion"]}
        for i, t in sorted(teacher.items())
        if t["completion"].strip() != student[i]["completion"].strip()
    ]
    pairs = [json.loads(line) for line in built.outputs["pairs"].read_text().splitlines()]
    assert [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs] == expected
    assert built.metrics["preferences/dropped/identical"] == 2300 - len(expected)
    assert 1000 < len(expected) < 2000  # the init is right on about a third of the sums
    assert built.metrics["tokens"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in [*teacher.values(), *student.values()]
    )

    init = pipeline.evaluate(cfg, "tinyworld:student-undertrained").stages[0].metrics
    assert init["eval/tiny_arith/exact_match"] == pytest.approx(0.305)  # as BUILD.json records
    assert evaluated.metrics["eval/tiny_arith/exact_match"] > init["eval/tiny_arith/exact_match"] + 0.15
    assert trained.metrics["heldout_pairs"] == 200 and trained.metrics["pairs"] == len(expected) - 200
    assert trained.metrics["heldout/rewards/accuracies"] > 0.8
    assert trained.metrics["heldout/rewards/margins"] > 0

    again = pipeline.dpo(load_config(TINY_DPO, [*base, "train.token_budget=20000", "dpo.beta=0.2"]))
    assert again.stages[0].reused and again.stages[0].run_id == built.run_id
    assert not again.stages[1].reused
    params = MlflowClient().get_run(again.stages[1].run_id).data.params
    assert params["preferences.fingerprint"] == built.fingerprints["pairs"]


SMALL_DPO = [*SMALL, "generation.max_prompts=40", "generation.shard_size=16", "generation.batch_size=8",
             "train.max_steps=2"]  # fmt: skip


def test_a_killed_preference_stage_resumes_to_the_same_pairs(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = pipeline.build_preferences(
        load_config(TINY_DPO, [*SMALL_DPO, f"output.run_dir={workdir / 'ref'}"])
    ).stages[0]
    expected = reference.outputs["preference_dataset"]

    loaded: list[str] = []
    calls: list[tuple[str, int]] = []
    real_load, real_generate = LocalTeacher.load, LocalTeacher.generate

    def load(cls: type, cfg: object, device: object, spec: object, *args: object) -> LocalTeacher:
        loaded.append(spec.model)  # type: ignore[attr-defined]
        return real_load(cfg, device, spec, *args)  # type: ignore[arg-type]

    def die_in_the_students_second_shard(self: LocalTeacher, prompts: list[Prompt], *args: object) -> object:
        calls.append((self.identity()["model"], prompts[0].id))
        if calls[-1] == ("tinyworld:student-undertrained", 16) and len(loaded) == 2:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM while the policy init writes
        return real_generate(self, prompts, *args)

    monkeypatch.setattr(LocalTeacher, "load", classmethod(load))
    monkeypatch.setattr(LocalTeacher, "generate", die_in_the_students_second_shard)
    cfg = load_config(TINY_DPO, [*SMALL_DPO, f"output.run_dir={workdir / 'runs'}"])
    with pytest.raises(KeyboardInterrupt):
        pipeline.build_preferences(cfg)
    resumed = pipeline.build_preferences(cfg).stages[0]
    teacher, student = "tinyworld:teacher", "tinyworld:student-undertrained"
    assert calls == [(teacher, 0), (teacher, 16), (teacher, 32), (student, 0), (student, 16),
                     (student, 16), (student, 32)]  # fmt: skip
    # the teacher's shards were all written: the resumed stage does not even load it
    assert loaded == [teacher, student, student]
    assert resumed.summary["resumed"]
    for name in ("train.jsonl", "report.json", "manifest.json"):
        assert (resumed.outputs["preference_dataset"] / name).read_bytes() == (expected / name).read_bytes()


def test_verified_pairs_from_the_teachers_samples(workdir: Path) -> None:
    """Two samples per prompt at temperature 4 (the tiny teacher is too sure of its sums to err below): where
    one has the reference's number and the other not, the right one is chosen; every pair is checked here
    against the reference itself."""
    cfg = load_config(
        TINY_DPO,
        [*SMALL_DPO, f"output.run_dir={workdir / 'runs'}", "preferences.method=verified", "generation.n=2",
         "generation.temperature=4.0", "data.max_samples=64", "generation.max_prompts=64"],
    )  # fmt: skip
    built = pipeline.build_preferences(cfg).stages[0]
    samples = rows(built.outputs["preference_dataset"].parent / "generation/shards")
    assert len(samples) == 128 and built.metrics["tokens"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in samples
    )
    pairs = [json.loads(line) for line in built.outputs["pairs"].read_text().splitlines()]
    reference = {r["prompt_id"]: r["reference"].split("####")[1].strip() for r in samples}
    number = re.compile(r"####\s*(-?\d+)")
    for pair in pairs:
        assert number.search(pair["chosen"]).group(1) == reference[pair["prompt_id"]]
        rejected = number.search(pair["rejected"])
        assert rejected is None or rejected.group(1) != reference[pair["prompt_id"]]
    dropped = {
        k.rsplit("/", 1)[1]: v for k, v in built.metrics.items() if k.startswith("preferences/dropped/")
    }
    assert len(pairs) >= 5 and len(pairs) + sum(dropped.values()) == 64
    assert dropped["no_incorrect"] > 0  # the teacher is mostly right, even at 1.5


def judge_verdict(body: dict) -> str | None:
    """The test server's judge: rates an answer by its first word (w37 -> 8) and explains first, as judges
    do; any other request gets the server's usual words."""
    text = " ".join(str(m.get("content")) for m in body.get("messages", []))
    if "impartial judge" not in text:
        return None
    answer = text.split("[The Start of Assistant's Answer]\n")[1].split("\n[The End")[0]
    return f"The answer reads well. Rating: [[{rating_of(answer)}]]"


def rating_of(answer: str) -> int:
    return 1 + int(answer.split()[0][1:]) % 10


def test_a_judge_behind_an_api_pairs_the_best_sample_against_the_worst(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    with ApiServer(Behaviour(api_key=KEY, answer=judge_verdict, words_per_answer=6)) as server:
        api = [f"base_url={server.base_url}", "model=teacher-model", f"api_key_env={KEY_ENV}"]
        cfg = small_config(
            workdir, "pipeline=dpo", "preferences.method=judge", "generation.n=3", "generation.temperature=0.8",
            "generation.max_prompts=10", "generation.shard_size=4", "generation.max_new_tokens=8",
            *[f"teacher.api.{a}" for a in api], "preferences.judge.model=judge",
            *[f"preferences.judge.api.{a}" for a in api],
        )  # fmt: skip
        built = pipeline.build_preferences(cfg).stages[0]
        judged = [r for r in server.log if r.body and "impartial judge" in json.dumps(r.body)]
    stage_dir = built.outputs["preference_dataset"].parent
    samples = rows(stage_dir / "generation/shards")
    assert len(samples) == 30 and len(judged) == 30  # every sample judged once, greedily
    assert {r.body["temperature"] for r in judged} == {0.0}

    expected, ties = [], 0
    for prompt_id in range(10):
        group = [r for r in samples if r["prompt_id"] == prompt_id]  # in sample order
        ratings = [rating_of(r["completion"]) for r in group]
        best, worst = ratings.index(max(ratings)), ratings.index(min(ratings))
        if max(ratings) == min(ratings):
            ties += 1
            continue
        expected.append((prompt_id, group[best]["completion"], group[worst]["completion"], best, worst))
    pairs = [json.loads(line) for line in built.outputs["pairs"].read_text().splitlines()]
    got = [(p["prompt_id"], p["chosen"], p["rejected"], p["chosen_sample"], p["rejected_sample"])
           for p in pairs]  # fmt: skip
    assert got == expected and len(expected) >= 5
    assert built.metrics["preferences/dropped/tie"] == ties
    verdicts = rows(stage_dir / "generation/judge-shards")
    assert all(re.search(r"Rating: \[\[\d+\]\]$", v["completion"]) for v in verdicts)
    # the judge's tokens are the stage's too, as the server counted them
    assert built.metrics["tokens"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in [*samples, *verdicts]
    )
    assert built.metrics["preferences/judge_tokens"] == sum(
        r["prompt_tokens"] + r["completion_tokens"] for r in verdicts
    )


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["generation.n=2"], "generation.n: teacher_vs_student pairs each prompt's first answer"),
        (["preferences.method=verified"], "generation.n: verified pairs two of the teacher's samples"),
        (
            ["preferences.method=verified", "generation.n=4"],
            "generation.temperature: 0 (greedy) writes 4 identical",
        ),
        (
            [
                "preferences.method=judge",
                "generation.n=2",
                "generation.temperature=0.7",
                "preferences.judge.model=judge",
                "preferences.judge.api.base_url=http://127.0.0.1:9/v1",
                "preferences.judge.api.model=judge",
            ],
            "preferences.judge.api.base_url: cannot reach",
        ),
        (
            [
                "preferences.method=judge",
                "generation.n=2",
                "generation.temperature=0.7",
                "preferences.judge.model=/no/such/judge",
            ],
            "preferences.judge.model",
        ),
        (["dpo.heldout_pairs=0", "preferences.method=null"], "preferences.path: the dpo pipeline needs"),
        (  # a local judge: the tiny teacher reads 128 tokens, the grading prompt alone is longer
            [
                "preferences.method=judge",
                "generation.n=2",
                "generation.temperature=0.7",
                "preferences.judge.model=tinyworld:teacher",
            ],
            "preferences.judge.model: the grading prompt, a question, an answer and the verdict take up to",
        ),
    ],
)
def test_bad_preference_settings_stop_preflight(overrides: list[str], culprit: str) -> None:
    with pytest.raises(PreflightError, match=re.escape(culprit)):
        preflight.run(load_config(TINY_DPO, overrides), "dpo")


def test_preferences_refuses_a_config_that_builds_no_pairs_and_both_sources(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=re.escape("set preferences.method (build pairs) or preferences.path")
    ):
        load_config(TINY_DPO, ["preferences.path=pairs.jsonl"])
    with pytest.raises(ConfigError, match=re.escape("preferences.judge is set but preferences.method is")):
        load_config(TINY_DPO, ["preferences.judge.model=tinyworld:teacher"])
    done = dist_bench(tmp_path, "preferences", "--config", str(TINY_DPO), "preferences.method=null",
                      "preferences.path=pairs.jsonl")  # fmt: skip
    assert_rejected(done, tmp_path, "preferences.method: unset")
