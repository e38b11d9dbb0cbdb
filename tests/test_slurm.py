"""scripts/slurm/dist_bench.sbatch, run as SLURM would run it on one node of two GPUs: `srun` and `scontrol`
are stand-ins (no SLURM here) that do what SLURM does for one node (srun runs its command once); torchrun,
the rendezvous, the ranks and the pipeline are real."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from conftest import PROJECT, SMALL, free_port

SCRIPT = PROJECT / "scripts" / "slurm" / "dist_bench.sbatch"


def fake_slurm(folder: Path) -> Path:
    """`srun [options] cmd...` runs cmd (one task: one node); `scontrol show hostnames` prints localhost."""
    folder.mkdir()
    (folder / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (folder / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for name in ("srun", "scontrol"):
        (folder / name).chmod((folder / name).stat().st_mode | stat.S_IEXEC)
    return folder


def sbatch(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    path = f"{fake_slurm(workdir / 'slurm-bin')}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    slurm = {"SLURM_NNODES": "1", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node001", "GPUS_PER_NODE": "2",
             "RDZV_PORT": str(free_port()), "PATH": path, "DIST_BENCH_PROGRESS_EVERY_S": "600"}  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=workdir, env={**os.environ, **slurm, **env},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_sbatch_template_runs_a_pipeline_on_the_ranks_of_a_node(workdir: Path) -> None:
    done = sbatch(workdir, "cache_logits", *SMALL, f"output.run_dir={workdir / 'runs'}")
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("dist_bench.role") == "pipeline"]
    (stage,) = [r for r in runs if r.data.tags.get("dist_bench.role") == "stage"]
    assert parent.info.status == stage.info.status == "FINISHED"
    assert parent.data.tags["dist_bench.world_size"] == stage.data.tags["dist_bench.ranks"] == "2"


def test_the_sbatch_template_needs_a_shared_tracking_server(workdir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(["bash", str(SCRIPT), "cache_logits"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert "set MLFLOW_TRACKING_URI to a tracking server every node reaches" in done.stderr
