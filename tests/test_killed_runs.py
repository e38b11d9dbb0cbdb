"""A pipeline killed with SIGKILL leaves nothing RUNNING once it is rerun: its parent and stage runs are
marked KILLED (even when the kill came in the first instant of a stage), and live pipelines are left alone."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import SMALL, small_config
from dist_bench import liveness, pipeline, tracking

# The real CLI in a process that SIGKILLs itself right after MLflow created the first stage run: the moment
# at which a run used to exist without its tags.
KILL_AT_FIRST_STAGE_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from mlflow.tracking import MlflowClient

    create_run = MlflowClient.create_run

    def create_then_die(self, *args, **kwargs):
        run = create_run(self, *args, **kwargs)
        if (kwargs.get("tags") or {}).get("dist_bench.role") == "stage":
            os.kill(os.getpid(), signal.SIGKILL)
        return run

    MlflowClient.create_run = create_then_die
    from dist_bench.cli import app
    app(sys.argv[1:], prog_name="dist-bench")
    """
)


def all_runs() -> list:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"])


def overrides(workdir: Path) -> list[str]:
    return [*SMALL, f"output.run_dir={workdir / 'runs'}"]


def test_sigkill_in_the_first_instant_of_a_stage(workdir: Path) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT_FIRST_STAGE_RUN, "kd", *overrides(workdir)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = all_runs()
    assert [r.info.status for r in left] == ["RUNNING", "RUNNING"]
    parent, stage = left
    assert stage.data.tags["dist_bench.stage"] == "logit_caching"  # tagged from its creation
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id

    again = pipeline.kd(small_config(workdir))
    runs = {r.info.run_id: r for r in all_runs()}
    assert [r.info.status for r in runs.values()].count("RUNNING") == 0
    for run_id in (parent.info.run_id, stage.info.run_id):
        assert runs[run_id].info.status == "KILLED"
        assert runs[run_id].data.tags["dist_bench.interrupted"] == "true"
    assert runs[again.run_id].info.status == "FINISHED"
    resumed = runs[again.stages[0].run_id]
    assert resumed.data.tags["dist_bench.resumed_from"] == stage.info.run_id


def test_sigkill_mid_pipeline_then_rerun(workdir: Path) -> None:
    process = subprocess.Popen([sys.executable, "-m", "dist_bench", "kd", *overrides(workdir)], cwd=workdir)
    checkpoints = workdir / "runs" / "student_train"
    deadline = time.time() + 240
    while not list(checkpoints.glob("*/checkpoints/checkpoint-*")):
        assert process.poll() is None and time.time() < deadline, (
            "the pipeline ended before it could be killed"
        )
        time.sleep(0.05)

    # While it lives, another pipeline's sweep leaves its runs alone.
    tracking.open_store()
    assert liveness.close_dead_runs() == []
    assert sorted(r.info.status for r in all_runs()) == ["FINISHED", "RUNNING", "RUNNING"]

    process.send_signal(signal.SIGKILL)
    process.wait()
    again = pipeline.kd(small_config(workdir))

    runs = all_runs()
    assert "RUNNING" not in [r.info.status for r in runs]
    new = {again.run_id, *(s.run_id for s in again.stages if not s.reused)}
    first = [r for r in runs if r.info.run_id not in new]
    status = {r.info.run_name: r.info.status for r in first}
    assert status == {
        "tiny-kd": "KILLED",
        "tiny-kd/logit_caching": "FINISHED",
        "tiny-kd/student_train": "KILLED",
    }
    assert MlflowClient().get_run(again.run_id).info.status == "FINISHED"
    assert [s.reused for s in again.stages] == [True, False, False]  # the cache was kept, training resumed
    killed_training = next(r for r in first if r.info.run_name == "tiny-kd/student_train")
    assert again.stages[1].summary["resumed"] is True
    assert (
        MlflowClient().get_run(again.stages[1].run_id).data.tags["dist_bench.resumed_from"]
        == killed_training.info.run_id
    )


def test_a_lock_file_out_of_sight_is_judged_by_host_and_pid(workdir: Path) -> None:
    """Another host's local run dir: left alone. This host, pid gone: KILLED. This host, pid alive: left."""
    tracking.open_store()
    client = MlflowClient()
    experiment = tracking.experiment_id("sweep")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    cases = {
        "other-host": ("elsewhere.example", str(os.getpid() + 10_000_000)),
        "this-host-dead": (socket.gethostname(), dead.stdout.strip()),
        "this-host-alive": (socket.gethostname(), str(os.getpid())),
    }
    ids = {}
    for name, (host, pid) in cases.items():
        tags = {
            liveness.LIVENESS: str(workdir / "gone" / f"{name}.lock"),
            liveness.HOST: host,
            liveness.PID: pid,
        }
        ids[name] = client.create_run(experiment, tags=tags, run_name=name).info.run_id
    assert liveness.close_dead_runs() == [ids["this-host-dead"]]
    assert {name: client.get_run(i).info.status for name, i in ids.items()} == {
        "other-host": "RUNNING",
        "this-host-dead": "KILLED",
        "this-host-alive": "RUNNING",
    }
