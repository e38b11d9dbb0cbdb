"""Progress for a person watching: plain lines with an ETA when the output is not a terminal (CI, mlflow run
logs), at most one per interval and one at the end; a stage reports in its own unit."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from conftest import PROJECT, SMALL, small_config
from dist_bench import pipeline
from dist_bench.config import load_config
from dist_bench.progress import Progress


def test_lines_carry_done_total_share_and_an_eta(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_BENCH_PROGRESS_EVERY_S", "0")
    out = io.StringIO()  # not a terminal: lines, not a bar
    with Progress("student_train", 1000, "tokens", stream=out) as progress:
        progress.set(250)
        progress.advance(250)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("student_train: 250/1,000 tokens (25%), ") and "ETA" in lines[0]
    assert lines[1].startswith("student_train: 500/1,000 tokens (50%), ")
    assert re.search(r"ETA \d+ s$", lines[1])
    assert lines[-1].startswith("student_train: 500/1,000 tokens (50%)")  # the closing line


def test_lines_are_rate_limited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_BENCH_PROGRESS_EVERY_S", "3600")
    out = io.StringIO()
    with Progress("teacher_generation", 10, "prompts", done=4, stream=out) as progress:
        for _ in range(6):
            progress.advance()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the closing line
    assert out.getvalue().startswith("teacher_generation: 10/10 prompts (100%)")


def test_a_progress_that_is_not_shown_counts_in_silence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIST_BENCH_PROGRESS_EVERY_S", "0")
    out = io.StringIO()
    with Progress("eval", 2, "tasks", stream=out, shown=False) as progress:
        progress.advance()
        progress.advance()
    assert out.getvalue() == "" and progress.done == 2


def test_a_pipeline_reports_each_stage_in_its_unit(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIST_BENCH_PROGRESS_EVERY_S", "0")
    pipeline.kd(small_config(workdir))
    err = capsys.readouterr().err
    for pattern in (
        r"logit_caching: 3/3 shards \(100%\)",  # 48 records in shards of 16
        r"student_train: [\d,]+/[\d,]+ tokens \(100%\)",
        r"eval: 2/2 tasks \(100%\)",
    ):
        assert re.search(pattern, err), (pattern, err[-2000:])


def test_the_dpo_pipeline_reports_prompts_and_training_tokens(
    workdir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIST_BENCH_PROGRESS_EVERY_S", "0")
    experiment = PROJECT / "configs" / "experiments" / "tiny_dpo.yaml"
    cfg = load_config(experiment, [*SMALL, f"output.run_dir={workdir / 'runs'}", "dpo.heldout_pairs=8"])
    parent = pipeline.dpo(cfg)
    err = capsys.readouterr().err
    budget = parent.stages[-2].metrics["policy_tokens"]
    for shards in ("shards", "student-shards"):  # the teacher's answers and the student's: a line each
        assert re.search(rf"teacher_generation \({shards}\): [\d,]+/[\d,]+ prompts \(100%\)", err), err[
            -3000:
        ]
    assert f"dpo_training: {budget:,.0f}/{budget:,.0f} tokens (100%)" in err, err[-2000:]
