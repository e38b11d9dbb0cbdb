"""Stage energy windows on a simulated GPU (same NVML interface as the real bindings): counter energy and
its interval, the sampler's cross-check and its warning, provenance for pre-Volta GPUs, scope by UUID,
failure mid-stage, idle-net and warmup figures, the timeline and results files, and several ranks adding
up to one stage figure."""

from __future__ import annotations

import csv
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from dist_bench.config import EnergyConfig
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy import window as window_module
from dist_bench.energy.distributed import combine_ranks, merge
from dist_bench.energy.nvml_sim import SimulatedGpu, SimulatedHandle, SimulatedNvml, constant, steps
from dist_bench.energy.outputs import StageSeries, append_results_row, plot_timeline, write_timeline_csv
from dist_bench.energy.window import EnergyReading, EnergyWindow, stage_metrics, stage_tags

FAST = EnergyConfig(codecarbon=False, sample_interval_ms=20)
SetVisible = Callable[..., None]


def h100(uuid: str = "GPU-aaaa", watts: float = 300.0, **kw: object) -> SimulatedGpu:
    return SimulatedGpu(uuid, "NVIDIA H100 80GB HBM3", 81559, constant(watts), memory_used_mb=4096.0, **kw)  # type: ignore[arg-type]


@pytest.fixture
def visible(monkeypatch: pytest.MonkeyPatch) -> SetVisible:
    """What torch would report as the CUDA devices of this process (by UUID)."""

    def set_visible(*uuids: str) -> None:
        monkeypatch.setattr(
            gpu_module, "torch_cuda_uuids", lambda: [u.lower().removeprefix("gpu-") for u in uuids]
        )

    return set_visible


def run_window(
    cfg: EnergyConfig, nvml: SimulatedNvml, tmp_path: Path, seconds: float, **kw: object
) -> EnergyWindow:
    window = EnergyWindow(cfg, tmp_path, "student_train", nvml=nvml, **kw)  # type: ignore[arg-type]
    with window:
        time.sleep(seconds)
    return window


def test_counter_energy_with_an_interval_that_contains_the_truth(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    window = run_window(FAST, SimulatedNvml(h100()), tmp_path, 1.5)
    reading = window.reading
    truth = 300.0 * reading.duration_s
    assert reading.gpu_source == "nvml_counter" and reading.power_method == "instant"
    assert abs(reading.gpu_energy_j - truth) <= reading.gpu_uncertainty_j
    # The interval: counter staleness at both ends + 5% sensor accuracy + the cross-check gap.
    assert reading.gpu_uncertainty_j >= 0.05 * reading.gpu_energy_j
    assert reading.gpu_integrated_j == pytest.approx(reading.gpu_energy_j, rel=0.05)
    assert reading.avg_power_w == pytest.approx(300.0, rel=0.01) and reading.peak_power_w == pytest.approx(
        300.0
    )
    assert reading.vram_peak_mb == 4096.0 and reading.vram_avg_mb == 4096.0
    assert reading.flags == () and "gpu" not in reading.notes
    metrics = stage_metrics(reading, tokens=1000)
    for name in ("gpu_energy_j", "gpu_energy_integrated_j", "gpu_energy_uncertainty_j", "avg_power_w",
                 "peak_power_w", "vram_peak_mb", "vram_avg_mb"):  # fmt: skip
        assert metrics[name] > 0, name
    assert stage_tags(reading)["energy.gpu.power_method"] == "instant"
    assert (
        len(window.samples) >= 20
    )  # 20 ms over 1.5 s: ~75, fewer on a loaded machine (late ticks are skipped)


class MiscalibratedNvml(SimulatedNvml):
    """The instant-power sensor reads 20% low while the energy counter is right: a real failure mode the
    cross-check exists to catch."""

    def nvmlDeviceGetFieldValues(self, handle: SimulatedHandle, field_ids: list[int]) -> list:
        values = super().nvmlDeviceGetFieldValues(handle, field_ids)
        for value in values:
            value.value.uiVal = int(value.value.uiVal * 0.8)
        return values


def test_counter_and_integration_disagreeing_raises_the_warning_flag(
    tmp_path: Path,
    visible: SetVisible,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    visible("GPU-aaaa")
    monkeypatch.setattr(window_module, "CROSS_CHECK_MIN_S", 1.0)  # the real rule needs 10 s windows
    reading = run_window(FAST, MiscalibratedNvml(h100()), tmp_path, 1.3).reading
    assert "counter_integration_mismatch" in reading.flags
    assert reading.gpu_integrated_j == pytest.approx(0.8 * reading.gpu_energy_j, rel=0.05)
    assert re.search(r"\((-1[5-9]|-2[0-5])\.\d%\)$", reading.notes["gpu_cross_check"])  # about -20%
    assert stage_tags(reading)["energy.flags"] == "counter_integration_mismatch"
    # The gap widens the interval: the counter is still the figure, but it is less certain.
    assert reading.gpu_uncertainty_j >= 0.25 * reading.gpu_energy_j


def test_the_same_disagreement_on_a_short_window_is_not_flagged(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    reading = run_window(FAST, MiscalibratedNvml(h100()), tmp_path, 1.3).reading
    assert "counter_integration_mismatch" not in reading.flags  # < 10 s: too few samples to judge


def test_short_windows_are_flagged_below_resolution(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    reading = run_window(FAST, SimulatedNvml(h100()), tmp_path, 0.3).reading
    assert "below_resolution" in reading.flags and "counter updates" in reading.notes["gpu_resolution"]


def test_gpu_without_counter_falls_back_to_integration(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    reading = run_window(FAST, SimulatedNvml(h100(has_energy_counter=False)), tmp_path, 1.0).reading
    assert reading.gpu_source == "power_integration"
    assert reading.gpu_energy_j == pytest.approx(300.0 * reading.duration_s, rel=0.05)


def test_power_usage_is_used_and_said_when_there_is_no_instant_field(
    tmp_path: Path, visible: SetVisible
) -> None:
    visible("GPU-aaaa")
    reading = run_window(FAST, SimulatedNvml(h100(has_instant_power=False)), tmp_path, 0.6).reading
    assert reading.power_method == "average"


def test_only_the_gpus_this_process_uses_are_counted(tmp_path: Path, visible: SetVisible) -> None:
    # Two GPUs in the box; CUDA_VISIBLE_DEVICES (or LOCAL_RANK) gives this process the second one only.
    nvml = SimulatedNvml(h100("GPU-aaaa", 100.0), h100("GPU-bbbb", 400.0))
    visible("GPU-bbbb")
    reading = run_window(FAST, nvml, tmp_path, 1.2).reading
    assert reading.gpus == ("NVIDIA H100 80GB HBM3 (GPU-bbbb)",)
    assert list(reading.per_gpu_j) == ["bbbb"]
    assert reading.avg_power_w == pytest.approx(400.0, rel=0.01)


def test_a_gpu_lost_mid_stage_leaves_the_work_done_and_the_energy_unknown(
    tmp_path: Path, visible: SetVisible
) -> None:
    visible("GPU-aaaa")
    device = h100()
    nvml = SimulatedNvml(device)
    window = EnergyWindow(FAST, tmp_path, "student_train", nvml=nvml)
    with window:
        device.fail_after_s = nvml.elapsed_s() + 0.3  # falls off the bus while the stage runs
        time.sleep(0.8)
        work_done = True
    reading = window.reading
    assert work_done and reading.gpu_energy_j is None and reading.gpu_source == "unavailable"
    assert (
        reading.notes["gpu"].startswith("NVML energy read failed") and "GPU is lost" in reading.notes["gpu"]
    )
    assert "sampling stopped" in reading.notes["gpu_sampler"]
    assert "gpu_energy_j" not in stage_metrics(reading, 10)  # never 0


def test_energy_disabled_touches_no_nvml(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    nvml = SimulatedNvml(h100())
    reading = run_window(EnergyConfig(enabled=False), nvml, tmp_path, 0.1).reading
    assert sum(nvml.calls.values()) == 0
    assert reading.gpu_energy_j is None and reading.notes["gpu"] == "energy.enabled=false"


def test_idle_power_gives_net_energy_beside_gross(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    reading = run_window(
        FAST, SimulatedNvml(h100()), tmp_path, 1.0, idle_power_w=70.0, idle_source="config"
    ).reading
    assert reading.net_energy_j == pytest.approx(reading.total_energy_j - 70.0 * reading.duration_s)
    metrics = stage_metrics(reading, 1)
    assert metrics["net_energy_j"] < metrics["total_energy_j"] and metrics["idle_power_w"] == 70.0
    assert stage_tags(reading)["energy.idle.source"] == "config"


def test_without_idle_baseline_net_energy_is_absent_and_explained(
    tmp_path: Path, visible: SetVisible
) -> None:
    visible("GPU-aaaa")
    reading = run_window(FAST, SimulatedNvml(h100()), tmp_path, 0.5).reading
    assert reading.net_energy_j is None and "net_energy_j" not in stage_metrics(reading, 1)
    assert "no idle baseline" in stage_tags(reading)["energy.net.note"]


def test_warmup_is_reported_separately(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    # 500 W during the first 0.5 s (loading, compiling), 200 W after.
    gpu = SimulatedGpu("GPU-aaaa", "H100", 81559, steps([(0.0, 500.0), (0.5, 200.0)]))
    cfg = EnergyConfig(codecarbon=False, sample_interval_ms=20, warmup_s=0.5)
    reading = run_window(cfg, SimulatedNvml(gpu), tmp_path, 1.5).reading
    metrics = stage_metrics(reading, 100)
    assert metrics["warmup_s"] == 0.5
    # 0.5 s at 500 W; the counter's 0.1 s updates and a late timer on a loaded machine move it a little.
    assert reading.warmup_energy_j == pytest.approx(250.0, abs=100.0)
    assert metrics["post_warmup_energy_j"] == pytest.approx(reading.gpu_energy_j - reading.warmup_energy_j)


def test_timeline_and_results_files(tmp_path: Path, visible: SetVisible) -> None:
    visible("GPU-aaaa")
    window = run_window(FAST, SimulatedNvml(h100()), tmp_path, 0.5)
    series = StageSeries("student_train", window.started_at, window.ended_at, window.samples)
    timeline = write_timeline_csv(series, tmp_path / "timeline.csv")
    rows = list(csv.DictReader(timeline.open()))
    assert len(rows) == len(window.samples) and float(rows[-1]["power_w"]) == pytest.approx(300.0)
    assert plot_timeline([series, series], tmp_path / "timeline.png").stat().st_size > 1000
    results = tmp_path / "results.csv"
    for stage in ("logit_caching", "student_train"):
        append_results_row(results, {"stage": stage, "energy_J": 12.5, "tokens_processed": 10})
    lines = results.read_text().splitlines()
    assert lines[0].startswith("tokens_processed,wall_s,warmup_s,energy_J,avg_power_W") and len(lines) == 3


def reading_of(rank: int) -> EnergyReading:
    # Each rank measured its own GPU; ranks 0 and 1 also report the same shared GPU (e.g. both bound to it).
    per_gpu = {f"gpu{rank}": 100.0 * (rank + 1), "shared": 50.0}
    return EnergyReading(
        duration_s=10.0 + rank, gpu_energy_j=sum(per_gpu.values()), per_gpu_j=per_gpu, cpu_energy_j=30.0,
        ram_energy_j=5.0, gpu_source="nvml_counter", cpu_source="rapl", ram_source="rapl",
        gpus=(f"gpu{rank}", "shared"),
    )  # fmt: skip


def test_merge_counts_each_gpu_and_each_host_once() -> None:
    merged = merge([("node-a", reading_of(0)), ("node-a", reading_of(1)), ("node-b", reading_of(2))])
    assert merged.gpu_energy_j == 100 + 200 + 300 + 50
    assert merged.cpu_energy_j == 60.0 and merged.ram_energy_j == 10.0  # two hosts
    assert merged.duration_s == 12.0


def test_merge_adds_the_ranks_integrated_gpu_energy() -> None:
    # GPUs without an energy counter: each rank's figure is integrated power, with no per-GPU split
    def integrated(rank: int, gpus: tuple[str, ...]) -> EnergyReading:
        return EnergyReading(duration_s=10.0, gpu_energy_j=100.0 * (rank + 1), gpu_source="power_integration",
                             gpus=gpus)  # fmt: skip

    merged = merge([("node-a", integrated(0, ("gpu0",))), ("node-a", integrated(1, ("gpu1",)))])
    assert merged.gpu_energy_j == 300.0
    same = merge([("node-a", integrated(0, ("gpu0",))), ("node-a", integrated(0, ("gpu0",)))])
    assert same.gpu_energy_j == 100.0  # two ranks bound to one GPU: counted once


def _rank_main(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    combined = combine_ranks(reading_of(rank))
    if rank == 0:
        Path(out).write_text(f"{combined.gpu_energy_j} {combined.cpu_energy_j} {combined.duration_s}")
    dist.destroy_process_group()


def test_two_processes_aggregate_to_one_stage_figure_on_rank_0(tmp_path: Path) -> None:
    out = tmp_path / "rank0.txt"
    mp.spawn(_rank_main, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    gpu_j, cpu_j, duration = (float(v) for v in out.read_text().split())
    assert gpu_j == 100 + 200 + 50  # the shared GPU once
    assert cpu_j == 30.0  # one host: its CPU energy once, not once per rank
    assert duration == 11.0


def test_rapl_is_preferred_over_the_estimate_when_readable(tmp_path: Path, visible: SetVisible) -> None:
    from test_rapl import add_load, server

    visible()  # no GPU: this is about the host
    tree = server(tmp_path / "sys")
    window = EnergyWindow(EnergyConfig(), tmp_path, "eval", rapl_root=tree.root)
    with window:
        add_load(tree)  # 12 J on the packages, 5 J on DRAM
    reading = window.reading
    assert (reading.cpu_source, reading.ram_source) == ("rapl", "rapl")
    assert reading.cpu_energy_j == pytest.approx(12.0) and reading.ram_energy_j == pytest.approx(5.0)
    assert "cpu" not in reading.notes and not (tmp_path / "codecarbon").exists()  # no estimate was made
    assert reading.co2e_kg > 0  # the grid intensity still applies to measured energy


def test_under_torchrun_each_rank_measures_only_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    uuids = ["aaaa-0", "bbbb-1", "cccc-2", "dddd-3"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: type("Props", (), {"uuid": uuids[i]})()
    )
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert gpu_module.torch_cuda_uuids() == uuids  # one process using every visible GPU
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert gpu_module.torch_cuda_uuids() == ["cccc-2"]


def test_torch_allocator_memory_is_sampled_beside_nvml(
    tmp_path: Path, visible: SetVisible, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    visible("GPU-aaaa")
    monkeypatch.setattr(gpu_module, "torch_cuda_index", lambda uuid: 0)  # torch's cuda:0 is that GPU
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 512 * 2**20)
    window = run_window(FAST, SimulatedNvml(h100()), tmp_path, 0.5)
    assert {s.torch_allocated_mb for s in window.samples} == {512.0}
    assert window.reading.torch_vram_avg_mb == 512.0 and window.reading.vram_avg_mb == 4096.0
    assert stage_metrics(window.reading, 1)["torch_vram_avg_mb"] == 512.0
