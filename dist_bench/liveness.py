"""Which runs are alive: a run whose process died without ending it (SIGKILL, the OOM killer, a lost node)
is marked KILLED by the next pipeline instead of staying RUNNING for ever.

    with hold_lock(cfg.output.run_dir) as lock:          # for the pipeline's lifetime
        mlflow.start_run(..., tags={**tags(lock), ...})  # every pipeline and stage run names the lock
    close_dead_runs()                                    # at the start of every pipeline

The lock is an flock on a file under `<output.run_dir>/.alive/`; the kernel releases it when its process
dies, however it dies, so a lock that can be taken belongs to a dead process. A lock on a shared file
system works across hosts; where the file is not visible (another host's local disk) the host and pid
tags decide, and only for this host.
"""

from __future__ import annotations

import fcntl
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow.tracking import MlflowClient

LIVENESS = "dist_bench.liveness_lock"  # tag: the lock file the run's process holds while it lives
HOST, PID = "dist_bench.host", "dist_bench.pid"


def close_dead_runs() -> list[str]:
    """Mark KILLED every RUNNING run whose process is gone; return their ids.

    A run's process holds its liveness lock (flock) until it ends the run; the kernel releases the lock when
    the process dies, however it dies. A lock that can be taken therefore belongs to a dead process. Where
    the lock file is not visible from here (another host's local disk) the run is left alone unless it was
    started on this host by a process that no longer exists.
    """
    client = MlflowClient()
    runs = client.search_runs(
        experiment_ids=_all_experiment_ids(),
        filter_string=f"attributes.status = 'RUNNING' and tags.`{LIVENESS}` LIKE '%'",
    )
    closed = []
    for run in runs:
        # Status read again after the lock was taken: the owner may have ended the run in between.
        if _owner_is_dead(run.data.tags) and client.get_run(run.info.run_id).info.status == "RUNNING":
            mark_killed(client, run.info.run_id)
            closed.append(run.info.run_id)
    return closed


@contextmanager
def hold_lock(run_dir: str) -> Iterator[Path]:
    """A lock file held for as long as this block runs (the pipeline's lifetime)."""
    folder = Path(run_dir).resolve() / ".alive"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.lock"
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)  # before the unlock: a sweeper never takes a live run's lock


def tags(lock: Path) -> dict[str, str]:
    return {LIVENESS: str(lock), HOST: socket.gethostname(), PID: str(os.getpid())}


def _owner_is_dead(run_tags: dict[str, str]) -> bool:
    lock = Path(run_tags[LIVENESS])
    try:
        handle = lock.open("r")
    except FileNotFoundError:  # a wiped run dir, or another host's local disk
        on_this_host = run_tags.get(HOST) == socket.gethostname()
        return on_this_host and not _pid_alive(int(run_tags.get(PID, "0") or 0))
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        lock.unlink(missing_ok=True)
        return True


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_killed(client: MlflowClient, run_id: str) -> None:
    """A run whose process died without ending it."""
    client.set_tag(run_id, "dist_bench.interrupted", "true")
    client.set_terminated(run_id, status="KILLED")


def _all_experiment_ids() -> list[str]:
    return [e.experiment_id for e in MlflowClient().search_experiments()]
