"""Pre-run validation (seed 000): idle variance and background-load warnings, a sampling interval that misses
a burst, hardware mismatches as critical findings, burn-in energy logs on CPU and on a simulated GPU, the
whole output tree in quick mode, the seed's call shapes and the command line.

A simulated H100 (energy/nvml_sim.py) stands behind the real NVML code path: `load_nvml` returns it and
`torch_cuda_uuids` reports its UUID, as in test_energy_pipeline.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dist_bench import prerun
from dist_bench.config import EnergyConfig
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import uuid_key
from dist_bench.energy.nvml_sim import PowerTrace, SimulatedGpu, SimulatedNvml, constant, square_wave, steps
from dist_bench.prerun import validation

FAST = EnergyConfig(codecarbon=False, sample_interval_ms=20)
SMALL = {"batch_size": 4, "model_dim": 64, "num_layers": 1, "seq_len": 32, "vocab_size": 256}
SEED_TREE = [
    "prerun_validation_report.json",
    "idle_baseline/idle_baseline.json",
    "idle_baseline/idle_baseline_readings.json",
    "burn_in/energy_logs/stage_burn_in.json",
    "sampling_validation/sampling_validation.json",
]
Simulate = Callable[..., SimulatedNvml]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Two cores shared with other jobs: a second intra-op thread makes small CPU steps ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU-only machine, also when the tests run on a GPU box."""
    monkeypatch.setattr(gpu_module, "torch_cuda_uuids", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def simulate(monkeypatch: pytest.MonkeyPatch) -> Simulate:
    """This process 'has' the given H100s: NVML is the simulation, torch reports their UUIDs."""

    def install(*traces: PowerTrace | Callable[[float], float], **kw: object) -> SimulatedNvml:
        gpus = [
            SimulatedGpu(f"GPU-51{i:02d}", "NVIDIA H100 80GB HBM3", 81559, trace, **kw)  # type: ignore[arg-type]
            for i, trace in enumerate(traces)
        ]
        nvml = SimulatedNvml(*gpus)
        monkeypatch.setattr(gpu_module, "load_nvml", lambda: nvml)
        monkeypatch.setattr(gpu_module, "torch_cuda_uuids", lambda: [uuid_key(g.uuid) for g in gpus])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the work itself runs on CPU
        return nvml

    return install


# --- idle baseline ----------------------------------------------------------------------------------------
def test_noisy_idle_warns_about_variance_and_saves_readings(tmp_path: Path, simulate: Simulate) -> None:
    simulate(square_wave(90.0, 50.0, 0.4, 0.5))  # 20 W either side of 70 W: someone else is busy
    baseline = prerun.measure_idle_baseline(0.02, poll_interval_ms=100, output_dir=tmp_path)
    assert baseline.gpu_std_power_watts > 5.0
    assert baseline.gpu_min_power_watts == 50.0 and baseline.gpu_max_power_watts == 90.0
    assert any("high idle power variance" in w and "background workloads" in w for w in baseline.warnings)
    assert not any("background load" in w for w in baseline.warnings)  # 70 W on average is normal
    assert baseline.avg_source == "nvml_counter" and baseline.gpu_names == [
        "NVIDIA H100 80GB HBM3 (GPU-5100)"
    ]
    saved = json.loads((tmp_path / "idle_baseline_readings.json").read_text())
    assert len(saved["readings"]) == baseline.readings_count >= 8  # 1.2 s at 100 ms
    assert {r["total_power_w"] for r in saved["readings"]} == {50.0, 90.0}
    assert json.loads((tmp_path / "idle_baseline.json").read_text()) == baseline.to_dict()


# 120 W is what an H100 idles at with a CUDA context (no warning); 200 W means something else is running.
@pytest.mark.parametrize(("watts", "background"), [(70.0, False), (120.0, False), (200.0, True)])
def test_steady_idle_has_no_variance_warning_and_high_idle_a_background_one(
    tmp_path: Path, simulate: Simulate, watts: float, background: bool
) -> None:
    simulate(constant(watts))
    baseline = prerun.measure_idle_baseline(0.02, poll_interval_ms=100, output_dir=tmp_path)
    assert baseline.gpu_std_power_watts == 0.0
    assert not any("variance" in w for w in baseline.warnings)
    assert any("background load" in w for w in baseline.warnings) is background
    # The counter's 0.1 s updates over 1.2 s allow ~10%; the samples see the trace exactly.
    assert baseline.gpu_avg_power_watts == pytest.approx(watts, rel=0.12)
    assert baseline.sampled_avg_power_watts == pytest.approx(watts)
    assert baseline.idle_power_w_per_gpu == baseline.gpu_avg_power_watts  # one GPU


def test_two_gpus_are_summed_per_reading(simulate: Simulate) -> None:
    simulate(constant(70.0), constant(60.0))
    baseline = prerun.measure_idle_baseline(0.01, poll_interval_ms=100)
    assert baseline.gpu_min_power_watts == baseline.gpu_max_power_watts == 130.0
    assert [g["sampled_avg_power_watts"] for g in baseline.per_gpu] == pytest.approx([70.0, 60.0])
    assert baseline.idle_power_w_per_gpu == pytest.approx(65.0, rel=0.12)


def test_idle_without_gpu_is_none_with_a_reason_and_does_not_wait(tmp_path: Path, no_gpu: None) -> None:
    start = time.monotonic()
    baseline = prerun.measure_idle_baseline(5.0, output_dir=tmp_path)
    assert time.monotonic() - start < 2.0  # nothing to poll: no five-minute sleep
    assert baseline.gpu_avg_power_watts is None and baseline.gpu_std_power_watts is None
    assert any("no CUDA device" in w for w in baseline.warnings) and baseline.critical_warnings == []
    assert (tmp_path / "idle_baseline_readings.json").exists()


def test_nvml_failing_on_a_machine_with_a_gpu_is_critical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu_module, "torch_cuda_uuids", lambda: ["5100"])

    def broken() -> None:
        raise ImportError("No module named 'pynvml'")

    monkeypatch.setattr(gpu_module, "load_nvml", broken)
    report = prerun.run_prerun_validation(tmp_path, skip_burn_in=True, skip_sampling=True)
    assert not report.all_checks_passed
    assert any("NVML failure on a machine with a GPU" in c for c in report.critical_warnings)
    assert report.idle_baseline is not None and report.idle_baseline.gpu_avg_power_watts is None


# --- sampling interval ------------------------------------------------------------------------------------
def test_long_polling_misses_a_burst_and_the_short_interval_is_recommended(
    tmp_path: Path, simulate: Simulate
) -> None:
    # 100 W, then 400 W from 0.4 s to 1.3 s: between the 1.5 s sampler's ticks at 0, 1.5 and 3 s.
    simulate(steps([(0.0, 100.0), (0.4, 400.0), (1.3, 100.0)]))
    result = prerun.validate_sampling_interval(
        tmp_path, duration_s=3.0, intervals_ms=(100, 1500), workload=time.sleep
    )
    assert result.counter_energy_joules == pytest.approx(100 * 3.0 + 300 * 0.9, rel=0.05)
    assert result.estimates[1500]["deviation_pct"] < -10  # saw 100 W throughout: about -47%
    assert abs(result.estimates[100]["deviation_pct"]) <= 10
    assert result.converged is False and result.recommended_interval_ms == 100
    assert any("1500 ms polling deviates" in w for w in result.warnings)
    series = json.loads((tmp_path / "sampling_series.json").read_text())["series"]
    assert {s["power_w"] for s in series["1500"]} == {100.0}  # ticks at 0, 1.5, 3 s (+ the final read)
    assert len(series["100"]) >= 20 and max(s["power_w"] for s in series["100"]) == 400.0
    assert json.loads((tmp_path / "sampling_validation.json").read_text()) == result.to_dict()


def test_a_steady_load_converges_and_the_longest_interval_up_to_500_ms_is_recommended(
    tmp_path: Path, simulate: Simulate
) -> None:
    simulate(constant(300.0))
    result = prerun.validate_sampling_interval(
        tmp_path, duration_s=2.5, intervals_ms=(100, 400, 1000), workload=time.sleep
    )
    assert all(abs(e["deviation_pct"]) <= 10 for e in result.estimates.values())
    assert result.converged is True and result.recommended_interval_ms == 400


def test_sampling_without_gpu_says_so_and_is_not_critical(tmp_path: Path, no_gpu: None) -> None:
    result = prerun.validate_sampling_interval(tmp_path, workload=lambda s: pytest.fail("nothing to measure"))
    assert result.counter_energy_joules is None and result.converged is None
    assert result.recommended_interval_ms is None and result.critical_warnings == []
    assert "no GPU energy counter" in result.warnings[0]
    assert (tmp_path / "sampling_validation.json").exists()


# --- hardware ---------------------------------------------------------------------------------------------
def test_hardware_mismatches_are_critical_and_fail_the_report(tmp_path: Path, simulate: Simulate) -> None:
    simulate(constant(70.0))
    hw = prerun.validate_hardware(
        expected_gpu_type="A100", min_vram_gb=96.0, expected_gpu_count=2, expected_cpu="no such cpu"
    )
    assert hw.actual_gpu_type == "NVIDIA H100 80GB HBM3" and hw.actual_gpu_count == 1
    assert hw.actual_vram_gb == pytest.approx(81559 / 1024, abs=0.01)
    assert not (hw.gpu_type_matches or hw.vram_sufficient or hw.gpu_count_matches or hw.cpu_matches)
    assert len(hw.critical_warnings) == 4 and "A100" in hw.critical_warnings[0]

    report = prerun.run_prerun_validation(
        tmp_path, expected_gpu_type="A100", skip_idle=True, skip_burn_in=True, skip_sampling=True
    )
    assert not report.all_checks_passed and report.critical_warnings == [
        "hardware: GPU type mismatch: expected 'A100', found NVIDIA H100 80GB HBM3"
    ]


def test_matching_hardware_passes(simulate: Simulate) -> None:
    simulate(constant(70.0))
    # "80 GB" is what the label says; NVML shows 79.6 GiB after the driver's reservation.
    hw = prerun.validate_hardware(expected_gpu_type="h100", min_vram_gb=80.0, expected_gpu_count=1)
    assert hw.gpu_type_matches and hw.vram_sufficient and hw.gpu_count_matches and hw.critical_warnings == []
    assert hw.gpu_source == "nvml"
    assert prerun.validate_hardware().critical_warnings == []  # no expectations: nothing to mismatch


# --- burn-in ----------------------------------------------------------------------------------------------
def test_burn_in_on_cpu_writes_the_stage_log_but_without_any_meter_it_is_not_valid(
    tmp_path: Path, no_gpu: None
) -> None:
    result = prerun.run_burn_in_test(tmp_path, num_steps=10, device="cpu", energy_cfg=FAST, **SMALL)
    stage = json.loads((tmp_path / "energy_logs" / "stage_burn_in.json").read_text())
    assert stage["tokens_processed"] == result.tokens_processed == 10 * 4 * 32
    assert stage["tokens_per_second"] > 0 and stage["device"] == "cpu"
    # CodeCarbon off and no RAPL: the file is there but holds no energy figure, so the logs do not prove
    # the energy path works. Not critical on a CPU-only machine: there is no GPU to measure.
    assert result.energy_logs_valid is False and result.critical_warnings == []
    assert result.gpu_energy_joules is None and result.cpu_energy_joules is None
    assert any("GPU energy unavailable" in w for w in result.warnings)
    assert any("no energy component measured" in w for w in result.warnings)


def test_burn_in_gets_gpu_energy_and_utilisation_from_the_simulated_gpu(
    tmp_path: Path, simulate: Simulate
) -> None:
    simulate(constant(250.0), utilization_pct=97.0)
    # Enough steps for a window of several counter updates (0.1 s each): a shorter one may read 0 J.
    result = prerun.run_burn_in_test(tmp_path, num_steps=150, energy_cfg=FAST, **SMALL)
    assert result.device == "cpu"  # the work runs on CPU; the counter is the simulated GPU's
    assert result.energy_logs_valid and result.critical_warnings == []
    assert result.gpu_energy_joules > 0 and result.avg_gpu_utilization_pct == 97.0
    stage = json.loads((tmp_path / "energy_logs" / "stage_burn_in.json").read_text())
    assert stage["energy_sources"]["gpu"] == "nvml_counter" and stage["gpu_energy_joules"] > 0
    assert (tmp_path / "energy_logs" / "power_timeline.csv").exists()


# --- the whole run, the seed's call shapes, the command line -------------------------------------------------
def test_quick_run_on_cpu_writes_the_seed_tree_and_the_report_round_trips(
    tmp_path: Path, no_gpu: None
) -> None:
    report = prerun.run_prerun_validation(output_dir=tmp_path / "pv", quick=True)
    for relative in SEED_TREE:
        assert (tmp_path / "pv" / relative).is_file(), relative
    assert json.loads((tmp_path / "pv" / prerun.REPORT_FILE).read_text()) == report.to_dict()
    assert report.all_checks_passed and report.critical_warnings == []  # CPU-only is not a failure
    assert report.settings["burn_in_steps"] == 50 and report.settings["sampling_intervals_ms"] == [
        100,
        1000,
        5000,
    ]
    # CodeCarbon on (the default): its CPU estimate is the one measured component, so the logs are valid.
    assert report.burn_in.energy_logs_valid and report.burn_in.cpu_energy_joules > 0
    assert report.environment["cpu"]["model"] == report.hardware_validation.actual_cpu


def test_quick_validation_returns_a_bool(
    tmp_path: Path, no_gpu: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation, "QUICK_BURN_IN_STEPS", 5)
    success = prerun.quick_validation(output_dir=tmp_path / "prerun_validation")
    assert success is True
    assert (tmp_path / "prerun_validation" / prerun.REPORT_FILE).exists()


def test_the_seeds_full_call_reports_the_gpu_mismatch_on_a_simulated_h100(
    tmp_path: Path, simulate: Simulate, monkeypatch: pytest.MonkeyPatch
) -> None:
    simulate(constant(70.0))
    monkeypatch.setattr(validation, "SAMPLING_DURATION_S", 2.0)  # the full 60 s is for real runs
    report = prerun.run_prerun_validation(
        output_dir=str(tmp_path / "prerun_validation"),
        idle_duration_minutes=0.02,
        burn_in_steps=20,
        expected_gpu_type="A100",
        expected_vram_gb=80.0,
    )
    assert not report.all_checks_passed
    assert report.critical_warnings == [
        "hardware: GPU type mismatch: expected 'A100', found NVIDIA H100 80GB HBM3"
    ]
    assert report.hardware_validation.vram_sufficient  # 79.6 GiB is an 80 GB card
    assert report.idle_baseline.gpu_avg_power_watts == pytest.approx(70.0, rel=0.12)
    assert report.burn_in.energy_logs_valid and report.burn_in.gpu_energy_joules > 0
    assert report.sampling_validation.converged is True  # a constant trace: every interval agrees
    assert report.environment["nvidia_driver"] == "simulated"  # a simulated run never passes for a real one
    for warning in report.critical_warnings:
        print(f"  - {warning}")  # the seed's loop over the findings


def test_command_line_quick_run_exits_0_on_cpu_and_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "validation"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "dist_bench.prerun", "--quick", "--output-dir", str(out), "--skip-sampling"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pre-run validation: PASSED" in done.stdout
    report = json.loads((out / prerun.REPORT_FILE).read_text())
    assert report["all_checks_passed"] and report["skipped"] == ["sampling_validation"]
    assert report["sampling_validation"] is None and report["burn_in"]["num_steps"] == 50


def test_a_gpu_sized_burn_in_on_a_cpu_machine_uses_the_small_model_and_says_so(tmp_path: Path) -> None:
    # The seed's custom workflow asks for 2048 x 24 (1.2 B parameters): hours and ~20 GB here.
    result = prerun.run_burn_in_test(tmp_path, num_steps=2, model_dim=2048, num_layers=24)
    assert result.model["model_dim"] == 128 and result.model["parameters"] < 1_000_000
    assert any("instead of 2048 x 24" in w for w in result.warnings)
