"""teacher_generation: the tiny teacher writes completions for the tiny world's prompts, batched; greedy
rows equal plain `model.generate` token for token; a killed stage resumes byte-identical (greedy and
seeded sampling); finish reasons and token counts; the sft pipeline trains on the kept completions and
reuses the generation when only a training setting changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_preflight import assert_rejected, dist_bench

from conftest import PROJECT, SMALL, small_config
from dist_bench import pipeline
from dist_bench.teacher import generation
from dist_bench.teacher.interface import Decoding, Prompt
from dist_bench.teacher.local import LocalTeacher

GENERATE = [
    "pipeline=sft",
    "generation.enabled=true",
    "generation.max_prompts=40",
    "generation.shard_size=16",  # shards of 16, 16 and 8 prompts
    "generation.batch_size=8",
    "generation.max_new_tokens=12",
    "generation.filters.verify=auto",
]


def stage_files(result: pipeline.ParentRun) -> dict[str, bytes]:
    out = result.stages[0].outputs["generation"]
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_greedy_rows_are_plain_generate_and_the_teacher_is_right(workdir: Path) -> None:
    cfg = small_config(workdir, *GENERATE)
    prompts = generation.read_prompts(cfg)
    assert len(prompts) == 40 and all(p.reference for p in prompts)
    teacher = LocalTeacher.load(cfg, torch.device("cpu"))
    rows = teacher.generate(prompts, Decoding.from_config(cfg.generation), seed=0)
    tokenizer = teacher.tokenizer
    for prompt, (completion,) in zip(prompts[:8], rows[:8], strict=True):
        ids = torch.tensor([tokenizer(prompt.text)["input_ids"]])
        plain = teacher.model.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, ids.shape[1] :].tolist()
        assert plain[-1] == tokenizer.eos_token_id  # it ended by itself
        assert completion.text == tokenizer.decode(plain[:-1])  # token for token, batched or not
        assert completion.completion_tokens == len(plain) and completion.finish_reason == "stop"
        assert completion.prompt_tokens == ids.shape[1]
    # the shipped teacher answers its own world: every greedy answer is the reference
    assert [c[0].text for c in rows] == [p.reference for p in prompts]


def test_finish_reason_length_and_stop_strings(workdir: Path) -> None:
    cfg = small_config(workdir, *GENERATE)
    prompts = [p for p in generation.read_prompts(cfg) if "####" in (p.reference or "")][:4]
    teacher = LocalTeacher.load(cfg, torch.device("cpu"))
    short = Decoding(1, 0.0, 1.0, None, 2, ())
    for (completion,) in teacher.generate(prompts, short, seed=0):
        assert completion.finish_reason == "length" and completion.completion_tokens == 2
    stop = Decoding(1, 0.0, 1.0, None, 12, ("##",))
    for (completion,) in teacher.generate(prompts, stop, seed=0):
        assert completion.finish_reason == "stop" and completion.text == " "  # cut before the stop string


@pytest.mark.parametrize("sampling", [[], ["generation.temperature=1.0", "generation.n=2"]])
def test_a_killed_generation_resumes_byte_identical(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, sampling: list[str]
) -> None:
    reference = pipeline.generate(
        small_config(workdir, *GENERATE, *sampling, f"output.run_dir={workdir / 'ref'}")
    )
    expected = stage_files(reference)
    assert [name for name in expected if name.startswith("shards/")] == [
        "shards/shard-00000.jsonl", "shards/shard-00001.jsonl", "shards/shard-00002.jsonl",
    ]  # fmt: skip

    calls: list[int] = []
    real = LocalTeacher.generate

    def die_on_the_second_shard(self: LocalTeacher, prompts: list[Prompt], *args: object) -> object:
        calls.append(prompts[0].id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C or SIGTERM in the middle of a shard
        return real(self, prompts, *args)

    monkeypatch.setattr(LocalTeacher, "generate", die_on_the_second_shard)
    cfg = small_config(workdir, *GENERATE, *sampling)
    with pytest.raises(KeyboardInterrupt):
        pipeline.generate(cfg)
    resumed = pipeline.generate(cfg)
    assert calls == [0, 16, 16, 32]  # shard 0 was kept, not generated again
    assert stage_files(resumed) == expected
    assert resumed.stages[0].summary["resumed"]


def test_sft_trains_on_the_kept_completions_and_reuses_the_generation(workdir: Path) -> None:
    # CodeCarbon on: a total energy exists here (no GPU), so the cost per generated token can be checked
    cfg = small_config(workdir, *GENERATE, "train.max_steps=3", "energy.codecarbon=true")
    first = pipeline.sft(cfg)
    assert [s.stage for s in first.stages] == ["teacher_generation", "student_train", "eval"]
    written = first.stages[0]
    train = written.outputs["train_data"].read_text().splitlines()
    assert len(train) == 40 == written.metrics["kept_completions"] == written.metrics["completions"]
    assert json.loads(train[0]).keys() == {"prompt", "completion"}
    metrics = MlflowClient().get_run(written.run_id).data.metrics
    assert metrics["decode_tokens"] > 0 and metrics["prefill_tokens"] > metrics["decode_tokens"]
    assert metrics["tokens"] == metrics["prefill_tokens"] + metrics["decode_tokens"]
    assert metrics["j_per_generated_token"] == pytest.approx(
        metrics["total_energy_j"] / metrics["decode_tokens"]
    )
    report = json.loads((written.outputs["generation"] / "filter_report.json").read_text())
    assert report  # written beside the shards
    # the student's data is the kept completions: its fingerprint is theirs, not data.train's
    params = MlflowClient().get_run(first.stages[1].run_id).data.params
    assert params["data.train"] == str(written.outputs["train_data"])

    # a training setting changed, nothing else: the teacher's completions are reused
    again = pipeline.sft(small_config(workdir, *GENERATE, "train.max_steps=4", "energy.codecarbon=true"))
    assert again.stages[0].reused and not again.stages[1].reused
    assert again.stages[1].metrics["steps"] == 4


SFT_CONFIG = str(PROJECT / "configs" / "experiments" / "tiny_sft.yaml")


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("generation.filters.refusal_patterns=['(unclosed']", "generation.filters.refusal_patterns[0]"),
        ("generation.max_new_tokens=200", "generation.max_new_tokens: 200 new tokens"),
        ("generation.stop=['']", "generation.stop[0]: empty string"),
    ],
)
@pytest.mark.parametrize("command", ["sft", "generate"])
def test_bad_generation_settings_stop_before_any_stage(
    tmp_path: Path, command: str, override: str, culprit: str
) -> None:
    done = dist_bench(tmp_path, command, "--config", SFT_CONFIG, override)
    assert_rejected(done, tmp_path, culprit)


def test_generate_alone_then_sft_reuses_it(tmp_path: Path) -> None:
    """`dist-bench generate` (what `mlflow run . -e generate` runs), then `dist-bench sft` with the same
    generation settings: the teacher's work is done once."""
    args = ["--config", SFT_CONFIG, *SMALL, "generation.max_prompts=16", "generation.batch_size=8",
            "train.max_steps=2"]  # fmt: skip
    generated = dist_bench(tmp_path, "generate", *args)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert "teacher_generation: ran" in generated.stdout
    trained = dist_bench(tmp_path, "sft", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "teacher_generation: reused" in trained.stdout and "student_train: ran" in trained.stdout
