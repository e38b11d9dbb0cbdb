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
from dist_bench.evaluation.harness import AnswerLog

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
    assert list(run_dir.glob(f"eval/*/request_cache/{task}.rank0.answers"))

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


def test_an_answer_log_cut_short_is_read_up_to_its_last_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "task.rank0.answers"
    log = AnswerLog(path)
    log.add_partial("loglikelihood", ("2+2=", " 4"), (-0.1, True))
    log.checkpoint({"prefill": 5, "decode": 0})
    whole = path.stat().st_size
    log.add_partial("generate_until", ("3+3=", {"until": ["\n"]}), " 6")
    log.checkpoint({"prefill": 9, "decode": 2})
    with path.open("r+b") as cut:  # killed while writing the second checkpoint
        cut.truncate(path.stat().st_size - 3)
    again = AnswerLog(path)
    assert again.tokens == {"prefill": 5, "decode": 0}
    assert list(again.done.values()) == [(-0.1, True)]
    assert path.stat().st_size == whole  # the torn tail is gone; the next checkpoint appends after it
    again.add_partial("generate_until", ("3+3=", {"until": ["\n"]}), " 6")
    again.checkpoint({"prefill": 9, "decode": 2})
    assert AnswerLog(path).tokens == {"prefill": 9, "decode": 2} and len(AnswerLog(path).done) == 2
