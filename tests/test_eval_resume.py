"""An eval stage killed inside an lm-eval task resumes from the answers it logged (harness.AnswerLog): the
model is asked only what it had not answered, and the scores and token counts are those of an uninterrupted
stage, also when the resume has another number of processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from lm_eval.api.model import hash_args
from lm_eval.models.huggingface import HFLM

from conftest import SMALL, small_config
from dist_bench import pipeline
from dist_bench.evaluation import harness
from dist_bench.evaluation.harness import AnswerLog

# The real CLI in a process that SIGKILLs itself right after the request cache's DIE_AT_COMMIT-th commit in a
# task (COMMIT_EVERY_S = 0: one commit before every batch), before that batch starts. Under torchrun,
# DIE_AT_COMMIT is a list: each rank's (RANK) count.
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
            if len(done) == int(os.environ["DIE_AT_COMMIT"].split(",")[int(os.environ.get("RANK", "0"))]):
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


def test_a_two_rank_task_killed_midway_resumes_in_one_process_from_both_ranks_answers(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume may have another number of processes: lm-eval then splits the requests otherwise, so every
    rank takes the answers of every log, and the tokens of a log no rank appends to any more are counted
    once (by rank 0)."""
    monkeypatch.setattr(harness, "COMMIT_EVERY_S", 0.0)
    settings = ["eval.tasks=[tiny_mc]", "eval.batch_size=2", "eval.limit=16"]  # 4 batches a rank on two
    asked: list[str] = []  # the model's requests, by lm-eval's key
    for kind in ("loglikelihood", "generate_until"):
        method = getattr(HFLM, kind)

        def asking(
            self: HFLM, requests: list, *args: object, _method=method, _kind=kind, **kw: object
        ) -> list:
            asked.extend(hash_args(_kind, r.args) for r in requests)
            return _method(self, requests, *args, **kw)

        monkeypatch.setattr(HFLM, kind, asking)
    read: list[int] = []  # the prefill tokens this process counts
    select = harness.CountingHFLM._select_cont_toks

    def counted(
        self: harness.CountingHFLM, logits: object, contlen: object = None, inplen: object = None
    ) -> object:
        read.append(inplen or 0)
        return select(self, logits, contlen=contlen, inplen=inplen)

    monkeypatch.setattr(harness.CountingHFLM, "_select_cont_toks", counted)
    whole = pipeline.evaluate(
        small_config(workdir, *settings, f"output.run_dir={workdir / 'whole'}"), "tinyworld:teacher"
    )
    every_request = set(asked)
    assert len(every_request) == len(asked) >= 32

    run_dir, script = workdir / "killed", workdir / "kill_after_a_commit.py"
    script.write_text(KILL_AFTER_A_COMMIT)
    # rank 1 dies at its 2nd commit (2 batches on disk), rank 0 at its 3rd or when torchrun stops it
    env = {**os.environ, "DIE_AT_COMMIT": "3,2", "DIST_BENCH_PROGRESS_EVERY_S": "600"}
    command = ["eval", "--model", "tinyworld:teacher", *SMALL, *settings, f"output.run_dir={run_dir}"]
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         *command],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode != 0, killed.stderr[-2000:]
    (rank1,) = run_dir.glob("eval/*/request_cache/tiny_mc.rank1.answers")
    rank0 = rank1.with_name("tiny_mc.rank0.answers")
    on_disk = AnswerLog(rank1, [rank0])  # both ranks' answers and rank 1's tokens, up to their checkpoints
    disk_prefill = on_disk.tokens["prefill"] + AnswerLog(rank0).tokens["prefill"]
    assert AnswerLog(rank1).done and set(on_disk.done) <= every_request

    asked.clear()
    read.clear()
    resumed = pipeline.evaluate(
        small_config(workdir, *settings, f"output.run_dir={run_dir}"), "tinyworld:teacher"
    )
    assert sorted(asked) == sorted(every_request - set(on_disk.done))  # the unanswered ones, each once
    metrics = resumed.stages[0].metrics
    scores = {k: v for k, v in whole.stages[0].metrics.items() if k.startswith("eval/tiny_mc/acc")}
    assert scores and {k: metrics[k] for k in scores} == scores
    # the killed ranks' checkpointed tokens (rank 1's through rank 0, its log no longer appended to) + this run's
    assert metrics["prefill_tokens"] == disk_prefill + sum(read)


def test_a_task_with_perplexity_requests_keeps_no_answer_log(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-eval gives perplexity (loglikelihood_rolling) answers only at the end of their call while their
    batches' tokens and energy accrue, so a log committed in or after that call would count work that a
    resume asks again. A task (here a group) with such requests keeps no log and resumes whole."""
    monkeypatch.setattr(harness, "COMMIT_EVERY_S", 0.0)  # a checkpoint before every batch that has answers
    project = Path(__file__).resolve().parent.parent
    tasks = workdir / "tasks"
    tasks.mkdir()
    mc = (project / "configs" / "tasks" / "tiny_mc.yaml").read_text()
    mc = mc.replace("task: tiny_mc", "task: tiny_mc_copy").replace("../../", f"{project}/")
    (tasks / "tiny_mc_copy.yaml").write_text(mc)
    (tasks / "ppl.jsonl").write_text("".join(f'{{"text": "{a} plus {a} is {a + a}."}}\n' for a in range(12)))
    (tasks / "tiny_ppl.yaml").write_text(
        textwrap.dedent("""\
        task: tiny_ppl
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: PPL
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        """).replace("PPL", str(tasks / "ppl.jsonl"))  # absolute: a group's subtasks are indexed by lm-eval
    )
    (tasks / "tiny_mixed.yaml").write_text("group: tiny_mixed\ntask:\n  - tiny_ppl\n  - tiny_mc_copy\n")
    checkpoints: list[Path] = []
    checkpoint = AnswerLog.checkpoint

    def recorded(self: AnswerLog, tokens: dict[str, int]) -> None:
        checkpoints.append(self.path)
        checkpoint(self, tokens)

    monkeypatch.setattr(AnswerLog, "checkpoint", recorded)
    settings = [f"eval.task_dir={tasks}", "eval.batch_size=2"]
    alone = pipeline.evaluate(
        small_config(workdir, *settings, "eval.tasks=[tiny_mc_copy]", f"output.run_dir={workdir / 'mc'}"),
        "tinyworld:teacher",
    )
    assert (
        checkpoints and "eval/tiny_mc_copy/acc" in alone.stages[0].metrics
    )  # the multiple choice alone: logged

    checkpoints.clear()
    mixed = pipeline.evaluate(
        small_config(workdir, *settings, "eval.tasks=[tiny_mixed]", f"output.run_dir={workdir / 'mixed'}"),
        "tinyworld:teacher",
    )
    metrics = mixed.stages[0].metrics
    assert "eval/tiny_ppl/word_perplexity" in metrics and "eval/tiny_mc_copy/acc" in metrics, sorted(metrics)
    assert checkpoints == []  # nothing kept, nothing committed inside it: a resume redoes it whole
