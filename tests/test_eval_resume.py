"""An eval stage killed inside an lm-eval task resumes from lm-eval's own request cache: the model is asked
only what it had not answered, and the scores and token counts are those of an uninterrupted stage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import SMALL, small_config
from dist_bench import pipeline
from dist_bench.evaluation import harness

# The real CLI in a process that SIGKILLs itself right after the request cache's DIE_AT_COMMIT-th commit in a
# task (COMMIT_EVERY_S = 0: one commit before every batch), before that batch starts.
KILL_AFTER_A_COMMIT = textwrap.dedent(
    """
    import os, signal, sys
    from dist_bench.evaluation import harness

    harness.COMMIT_EVERY_S = 0.0
    committer = harness._committer

    def dying(*args):
        commit, done = committer(*args), []

        def commit_then_die():
            commit()
            done.append(1)
            if len(done) == int(os.environ["DIE_AT_COMMIT"]):
                os.kill(os.getpid(), signal.SIGKILL)

        return commit_then_die

    harness._committer = dying
    from dist_bench.cli import app
    app(sys.argv[1:], prog_name="dist-bench")
    """
)


def count_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The model's batches from here on (log-likelihood and generation alike)."""
    batches: list[int] = []
    for name in ("_model_call", "_model_generate"):
        method = getattr(harness.CountingHFLM, name)

        def counted(self: harness.CountingHFLM, *args: object, _method=method, **kwargs: object) -> object:
            batches.append(1)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(harness.CountingHFLM, name, counted)
    return batches


@pytest.mark.parametrize("task", ["tiny_arith", "tiny_mc"])  # generation; multiple choice (log-likelihood)
def test_a_task_killed_midway_resumes_from_its_answers(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    monkeypatch.setattr(harness, "COMMIT_EVERY_S", 0.0)
    settings = [f"eval.tasks=[{task}]", "eval.batch_size=2"]
    batches = count_batches(monkeypatch)
    whole = pipeline.evaluate(
        small_config(workdir, *settings, f"output.run_dir={workdir / 'whole'}"), "tinyworld:teacher"
    )
    whole_batches = len(batches)
    assert whole_batches >= 4

    run_dir = workdir / "killed"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILL_AFTER_A_COMMIT,
            "eval",
            "--model",
            "tinyworld:teacher",
            *SMALL,
            *settings,
            f"output.run_dir={run_dir}",
        ],
        cwd=workdir,
        env={**os.environ, "DIE_AT_COMMIT": "3"},  # before batch 3: batches 1 and 2 on disk
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert list(run_dir.glob(f"eval/*/request_cache/{task}_rank0.db"))

    batches.clear()
    resumed = pipeline.evaluate(
        small_config(workdir, *settings, f"output.run_dir={run_dir}"), "tinyworld:teacher"
    )
    assert len(batches) == whole_batches - 2  # only what had not been answered
    scores = {k: v for k, v in whole.stages[0].metrics.items() if k.startswith(f"eval/{task}/")}
    scores = {k: v for k, v in scores.items() if not k.endswith(("energy_j", "duration_s", "j_per_token"))}
    assert f"eval/{task}/tokens" in scores and len(scores) > 1
    assert {k: resumed.stages[0].metrics[k] for k in scores} == scores  # the scores and the tokens
    assert resumed.stages[0].metrics["prefill_tokens"] == whole.stages[0].metrics["prefill_tokens"]
    assert resumed.stages[0].metrics["decode_tokens"] == whole.stages[0].metrics["decode_tokens"]
    assert not list(run_dir.glob("eval/*/request_cache"))  # removed once every task was done
