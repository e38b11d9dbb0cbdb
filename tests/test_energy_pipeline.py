"""The energy measurement inside real pipelines: a simulated GPU behind the NVML interface gives every
stage counter energy, timelines, net energy and a results CSV; MLflow's own system metrics run alongside;
two pipelines started together both finish with their own figures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import SMALL, small_config
from dist_bench import pipeline, report
from dist_bench.energy.nvml_sim import SimulatedNvml

STAGES = ["logit_caching", "student_train", "eval"]


def test_stages_get_gpu_energy_timelines_net_energy_and_results_rows(
    workdir: Path, simulated_gpu: SimulatedNvml
) -> None:
    mlflow.enable_system_metrics_logging()
    mlflow.set_system_metrics_sampling_interval(1)
    mlflow.set_system_metrics_samples_before_logging(1)
    try:
        parent = pipeline.kd(
            small_config(workdir, "energy.idle_measure_s=1.0", "energy.sample_interval_ms=20")
        )
    finally:
        mlflow.disable_system_metrics_logging()
    client = MlflowClient()
    for stage in parent.stages:
        run = client.get_run(stage.run_id)
        assert run.data.tags["energy.gpu.source"] == "nvml_counter"
        assert run.data.tags["energy.gpu.power_method"] == "instant"
        assert run.data.tags["energy.idle.source"] == "measured"
        metrics = run.data.metrics
        duration = metrics["duration_s"]
        assert metrics["gpu_energy_j"] == pytest.approx(
            250.0 * duration, abs=metrics["gpu_energy_uncertainty_j"]
        )
        # Idle measured on the same trace; over 1 s the counter's 0.1 s updates allow +-10%.
        assert metrics["idle_power_w"] == pytest.approx(250.0, rel=0.12)
        assert metrics["net_energy_j"] == pytest.approx(
            metrics["total_energy_j"] - metrics["idle_power_w"] * duration
        )
        assert metrics["vram_peak_mb"] == 2048.0
        artifacts = {a.path for a in client.list_artifacts(stage.run_id, "energy")}
        assert {"energy/power_timeline.csv", "energy/power_timeline.png"} <= artifacts
    parent_run = client.get_run(parent.run_id)
    assert (
        "total/net_energy_j" in parent_run.data.metrics
        and "total/gpu_energy_uncertainty_j" in parent_run.data.metrics
    )
    assert "energy/power_timeline.png" in {a.path for a in client.list_artifacts(parent.run_id, "energy")}
    # MLflow's system metrics logged beside ours, on the same runs.
    assert any(name.startswith("system/") for name in parent_run.data.metrics)

    rows = list(csv.DictReader((workdir / "runs" / "energy_results.csv").open()))
    assert [r["stage"] for r in rows] == STAGES
    assert all(
        float(r["energy_J"]) > 0 and float(r["avg_power_W"]) == pytest.approx(250.0, rel=0.02) for r in rows
    )
    assert rows[1]["batch_size"] == "8" and rows[1]["model"] == "tinyworld:student-init"

    table = report.run(["dist-bench"], workdir / "report")
    header = table.splitlines()[0]
    assert "net_kwh" in header and "gpu_uncertainty_pct" in header
    assert "±" in table.splitlines()[2] and "gpu_kwh n/a" not in table


def test_two_pipelines_started_together_both_finish_with_their_own_figures(workdir: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    commands = [
        [sys.executable, "-m", "dist_bench", "kd", *SMALL, "energy.codecarbon=true", f"data.max_samples={n}",
         f"output.run_dir={workdir / 'runs'}"]
        for n in (40, 44)
    ]  # fmt: skip
    processes = [
        subprocess.Popen(c, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for c in commands
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err.decode()[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    parents = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`dist_bench.role` = 'pipeline'"
    )
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    totals = [p.data.metrics["total/total_energy_j"] for p in parents]
    assert all(t > 0 for t in totals) and totals[0] != totals[1]
    stage_runs = client.search_runs([parents[0].info.experiment_id], "tags.`dist_bench.role` = 'stage'")
    assert len(stage_runs) == 6 and all(r.data.tags["energy.cpu.source"] == "estimated" for r in stage_runs)
