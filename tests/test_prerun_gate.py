"""Pre-run validation as a pipeline stage: the gate stops a pipeline before any teacher work, its idle
baseline feeds net energy, and `mlflow run . -e prerun -P quick=true` works on a CPU-only machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, SMALL, small_config, store_outside_the_checkout
from dist_bench import pipeline
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.nvml_sim import SimulatedGpu, SimulatedNvml, constant

FAST_PRERUN = [
    "prerun.enabled=true",
    "prerun.quick=true",
    "prerun.skip_sampling=true",
    "prerun.skip_burn_in=true",
]


def all_runs(client: MlflowClient) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_required_prerun_with_an_impossible_gpu_stops_the_pipeline_before_logit_caching(
    workdir: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dist_bench", "kd", *SMALL, *FAST_PRERUN, "prerun.required=true",
         "prerun.expected_gpu=A100", f"output.run_dir={workdir / 'runs'}"],
        cwd=workdir, env={**os.environ}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-bench: error: prerun failed, pipeline stopped:"), (
        done.stderr
    )
    assert "A100" in lines[0]
    client = MlflowClient()
    status = {r.info.run_name: r.info.status for r in all_runs(client)}
    assert status["tiny-kd"] == "FAILED" and status["tiny-kd/prerun"] == "FINISHED"
    assert "tiny-kd/logit_caching" not in status and not (workdir / "runs" / "logit_caching").exists()


def test_optional_prerun_runs_first_and_reports(workdir: Path) -> None:
    parent = pipeline.kd(small_config(workdir, *FAST_PRERUN, "prerun.expected_gpu=A100"))
    assert [s.stage for s in parent.stages] == ["prerun", "logit_caching", "student_train", "eval"]
    run = MlflowClient().get_run(parent.run_id)
    assert run.info.status == "FINISHED"  # not required: the failed check is reported, not enforced
    assert run.data.metrics["prerun/all_checks_passed"] == 0.0
    assert run.data.tags["dist_bench.prerun.passed"] == "false"
    # Never reused: a second pipeline validates the machine again.
    again = pipeline.kd(small_config(workdir, *FAST_PRERUN, "prerun.expected_gpu=A100"))
    assert not again.stages[0].reused and again.stages[1].reused


def test_prerun_idle_baseline_feeds_net_energy(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = SimulatedNvml(SimulatedGpu("GPU-7070", "NVIDIA H100 80GB HBM3", 81559, constant(70.0)))
    monkeypatch.setattr(gpu_module, "load_nvml", lambda: nvml)
    monkeypatch.setattr(gpu_module, "torch_cuda_uuids", lambda: ["7070"])
    parent = pipeline.kd(small_config(workdir, *FAST_PRERUN))
    client = MlflowClient()
    assert client.get_run(parent.run_id).data.tags["energy.idle.source"] == "prerun"
    for stage in parent.stages[1:]:
        metrics = client.get_run(stage.run_id).data.metrics
        assert metrics["idle_power_w"] == pytest.approx(70.0, rel=0.12)
        assert "net_energy_j" in metrics


def test_mlflow_run_prerun_quick_on_a_cpu_machine(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store_outside_the_checkout(tmp_path, "prerun-test"),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    out = tmp_path / "validation"
    done = subprocess.run(
        [str(bin_dir / "mlflow"), "run", ".", "-e", "prerun", "--env-manager", "local", "--experiment-name", "prerun-test",
         "-P", "quick=true", "-P", f"output_dir={out}", "-P", f"overrides=output.run_dir={tmp_path / 'runs'}"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "prerun_validation_report.json").read_text())
    assert report["all_checks_passed"] is True
    for path in ("idle_baseline/idle_baseline.json", "idle_baseline/idle_baseline_readings.json",
                 "burn_in/energy_logs/stage_burn_in.json"):  # fmt: skip
        assert (out / path).is_file(), path
    assert any((out / "sampling_validation").iterdir())
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = all_runs(client)
    stage = next(r for r in runs if r.data.tags.get("dist_bench.stage") == "prerun")
    assert stage.info.status == "FINISHED" and stage.data.metrics["all_checks_passed"] == 1.0
    assert "prerun_validation" in [a.path for a in client.list_artifacts(stage.info.run_id)]
