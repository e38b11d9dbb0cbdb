"""Energy windows: NVML counter arithmetic and failure paths (fake NVML), CodeCarbon on this CPU machine,
the sum of windows, and the MLflow metric/tag names."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_bench.config import EnergyConfig
from dist_bench.energy import EnergyReading, EnergyWindow, stage_metrics, stage_tags

NO_CODECARBON = EnergyConfig(codecarbon=False)  # fast: only the GPU path runs


class FakeDevice:
    def __init__(self, uuid: str, name: str, energy_mj: int = 1_000_000) -> None:
        self.uuid, self.name, self.energy_mj = uuid, name, energy_mj
        self.failure: str | None = None  # set to make every energy read raise
        self.reads = 0


class FakeNvml:
    """The NVML functions the energy module uses, over in-memory devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, *devices: FakeDevice, init_error: str | None = None) -> None:
        self.devices = list(devices)
        self.init_error = init_error
        self.initialized = 0  # NVML reference count: every init must be matched by a shutdown

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.NVMLError(self.init_error)
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> bytes:
        return handle.name.encode()  # old nvidia-ml-py returned bytes

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeDevice) -> int:
        if handle.failure:
            raise self.NVMLError(handle.failure)
        handle.reads += 1
        return handle.energy_mj


class TorchUuid:
    """Stands in for torch's _CUuuid, which prints without NVML's "GPU-" prefix."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


@pytest.fixture
def cuda_sees(monkeypatch: pytest.MonkeyPatch):
    """Make torch report CUDA devices with the given (unprefixed) UUIDs."""

    def see(*uuids: str) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(uuids))
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=TorchUuid(uuids[i]))
        )

    return see


def test_gpu_energy_is_the_counter_difference_of_the_visible_device(tmp_path: Path, cuda_sees) -> None:
    other = FakeDevice("GPU-aaaa-1111", "Fake GPU A", energy_mj=9_000_000)
    mine = FakeDevice("GPU-bbbb-2222", "Fake GPU B", energy_mj=5_000_000)
    nvml = FakeNvml(other, mine)
    cuda_sees("bbbb-2222")  # CUDA_VISIBLE_DEVICES=1: torch's device 0 is NVML's device 1

    with EnergyWindow(NO_CODECARBON, tmp_path, "logit_caching", nvml=nvml) as window:
        other.energy_mj += 777_000
        mine.energy_mj += 12_345
        so_far = window.read()
        mine.energy_mj += 100_000

    assert so_far.gpu_energy_j == pytest.approx(12.345)
    reading = window.reading
    assert reading is not None
    assert reading.gpu_energy_j == pytest.approx(112.345)
    assert reading.gpu_source == "nvml_counter"
    assert reading.gpus == ("Fake GPU B (GPU-bbbb-2222)",)
    assert "gpu" not in reading.notes
    assert other.reads == 0  # the device this process does not use is never read
    assert nvml.initialized == 0  # NVML released on exit
    assert window.read() is reading  # after exit, read() is the final reading


def test_gpu_devices_names_the_gpus_another_process_uses(tmp_path: Path, cuda_sees) -> None:
    """energy.gpu_devices: a teacher served on this node (a local vLLM) runs on GPUs this process does
    not use; they are measured by NVML index, whatever torch sees."""
    mine, server = FakeDevice("GPU-aaaa", "A"), FakeDevice("GPU-bbbb", "B")
    cuda_sees("aaaa")
    cfg = EnergyConfig(codecarbon=False, gpu_devices=[1])
    with EnergyWindow(cfg, tmp_path, "teacher_generation", nvml=FakeNvml(mine, server)) as window:
        mine.energy_mj += 1_000
        server.energy_mj += 250_000
    assert window.reading.gpu_energy_j == pytest.approx(250.0)
    assert window.reading.gpus == ("B (GPU-bbbb)",) and mine.reads == 0
    with EnergyWindow(
        EnergyConfig(codecarbon=False, gpu_devices=[7]), tmp_path, "x", nvml=FakeNvml(mine)
    ) as window:
        pass
    assert window.reading.gpu_energy_j is None and "no NVML device 7" in window.reading.notes["gpu"]


def test_two_visible_gpus_are_summed(tmp_path: Path, cuda_sees) -> None:
    a, b = FakeDevice("GPU-aaaa", "A"), FakeDevice("GPU-bbbb", "B")
    cuda_sees("bbbb", "aaaa")
    with EnergyWindow(NO_CODECARBON, tmp_path, "student_train", nvml=FakeNvml(a, b)) as window:
        a.energy_mj += 1_000
        b.energy_mj += 2_000
    assert window.reading.gpu_energy_j == pytest.approx(3.0)
    assert window.reading.gpus == ("B (GPU-bbbb)", "A (GPU-aaaa)")


def test_nvml_failing_at_init_gives_none_and_a_note(tmp_path: Path, cuda_sees) -> None:
    cuda_sees("aaaa")
    nvml = FakeNvml(FakeDevice("GPU-aaaa", "A"), init_error="Driver Not Loaded")
    with EnergyWindow(NO_CODECARBON, tmp_path, "eval", nvml=nvml) as window:
        assert window.read().gpu_energy_j is None
    reading = window.reading
    assert reading.gpu_energy_j is None
    assert reading.gpu_source == "unavailable"
    assert reading.notes["gpu"] == "NVML unavailable: Driver Not Loaded"
    assert reading.total_energy_j is None


def test_nvml_failing_mid_window_gives_none_and_the_window_completes(tmp_path: Path, cuda_sees) -> None:
    device = FakeDevice("GPU-aaaa", "A")
    nvml = FakeNvml(device)
    cuda_sees("aaaa")
    with EnergyWindow(NO_CODECARBON, tmp_path, "student_train", nvml=nvml) as window:
        device.energy_mj += 5_000
        device.failure = "GPU is lost"
        assert window.read().notes["gpu"] == "NVML energy read failed: GPU is lost"
    assert window.reading.gpu_energy_j is None
    assert window.reading.gpu_source == "unavailable"
    assert "GPU is lost" in window.reading.notes["gpu"]
    assert nvml.initialized == 0


def test_a_transient_read_failure_does_not_lose_the_window(tmp_path: Path, cuda_sees) -> None:
    device = FakeDevice("GPU-aaaa", "A")
    cuda_sees("aaaa")
    with EnergyWindow(NO_CODECARBON, tmp_path, "student_train", nvml=FakeNvml(device)) as window:
        device.energy_mj += 5_000
        device.failure = "Timeout"
        assert window.read().gpu_energy_j is None
        device.failure = None
    assert window.reading.gpu_energy_j == pytest.approx(5.0)  # the counter is cumulative


def test_counter_not_supported_and_unknown_device(tmp_path: Path, cuda_sees) -> None:
    old = FakeDevice("GPU-aaaa", "Tesla P100")
    old.failure = "Not Supported"
    cuda_sees("aaaa")
    with EnergyWindow(NO_CODECARBON, tmp_path, "eval", nvml=FakeNvml(old)) as window:
        pass
    assert window.reading.notes["gpu"] == "energy counter unavailable on Tesla P100 (GPU-aaaa): Not Supported"

    cuda_sees("MIG-cccc")
    with EnergyWindow(NO_CODECARBON, tmp_path, "eval", nvml=FakeNvml(FakeDevice("GPU-aaaa", "A"))) as window:
        pass
    assert window.reading.gpu_energy_j is None
    assert "not found among NVML devices" in window.reading.notes["gpu"]


def test_a_failing_body_still_gets_a_reading_and_its_exception(tmp_path: Path) -> None:
    window = EnergyWindow(NO_CODECARBON, tmp_path, "eval")
    with pytest.raises(ValueError, match="work failed"), window:
        raise ValueError("work failed")
    assert window.reading is not None and window.reading.duration_s >= 0


def test_read_before_enter_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="before the window was entered"):
        EnergyWindow(NO_CODECARBON, tmp_path, "eval").read()


def test_disabled_starts_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda_sees) -> None:
    def no_tracker(*args: object, **kwargs: object) -> None:
        raise AssertionError("CodeCarbon must not start when energy.enabled=false")

    monkeypatch.setattr("codecarbon.OfflineEmissionsTracker", no_tracker)
    nvml = FakeNvml(FakeDevice("GPU-aaaa", "A"), init_error="must not be called")
    cuda_sees("aaaa")
    with EnergyWindow(EnergyConfig(enabled=False), tmp_path, "eval", nvml=nvml) as window:
        time.sleep(0.01)
        inside = window.read()
    reading = window.reading
    for r in (inside, reading):
        assert r.total_energy_j is None and r.co2e_kg is None
        assert (r.gpu_source, r.cpu_source, r.ram_source) == ("unavailable",) * 3
        assert r.notes == dict.fromkeys(["gpu", "cpu", "ram", "co2e"], "energy.enabled=false")
    assert reading.duration_s >= 0.01  # time is still measured
    assert not (tmp_path / "codecarbon").exists()


def test_codecarbon_false_leaves_cpu_and_ram_unavailable(tmp_path: Path) -> None:
    with EnergyWindow(NO_CODECARBON, tmp_path, "eval") as window:
        pass
    reading = window.reading
    assert reading.cpu_energy_j is None and reading.ram_energy_j is None and reading.co2e_kg is None
    # Neither RAPL (not on this machine) nor the estimate: absent, and the note says both.
    assert (
        reading.notes["cpu"]
        == reading.notes["ram"]
        == "no RAPL: /sys/class/powercap not present; energy.codecarbon=false"
    )
    assert reading.notes["co2e"].startswith("energy.codecarbon=false")
    assert not (tmp_path / "codecarbon").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_real_window_on_this_cpu_machine(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with EnergyWindow(EnergyConfig(), tmp_path, "student_train") as window:
        busy(0.6)
        started = time.perf_counter()
        so_far = window.read()
        read_s = time.perf_counter() - started
        busy(0.4)

    # read() is called at checkpoints: it must not measure or sleep (CodeCarbon's own measurement takes
    # about a second). A loose bound: a loaded CI machine must not make this test flaky.
    assert read_s < 0.5
    assert so_far.cpu_energy_j > 0 and so_far.ram_energy_j > 0
    reading = window.reading
    assert 1.0 <= reading.duration_s < 5.0  # the busy work, without CodeCarbon's start-up
    # RAM power is a constant in CodeCarbon's estimate, so its energy only grows. CPU power follows the
    # machine's load, and read() extrapolates at the last measured power: so far can exceed the final
    # figure when the load drops (seen on a loaded CI machine), so only positivity holds for CPU.
    assert reading.cpu_energy_j > 0 and so_far.cpu_energy_j > 0
    assert reading.ram_energy_j > so_far.ram_energy_j > 0
    assert (reading.cpu_source, reading.ram_source) == ("estimated", "estimated")
    assert reading.gpu_energy_j is None and reading.gpu_source == "unavailable"
    assert reading.notes["gpu"] == "no CUDA device visible to torch"
    # The estimate says why it is one.
    assert (
        reading.notes["cpu"]
        == reading.notes["ram"]
        == "CodeCarbon estimate (no RAPL: /sys/class/powercap not present)"
    )

    # CodeCarbon's CSV row is the same window: same energy, and its emissions are our CO2e (no GPU here).
    rows = list(csv.DictReader((tmp_path / "codecarbon" / "emissions.csv").open()))
    assert [r["project_name"] for r in rows] == ["student_train"]
    assert float(rows[0]["cpu_energy"]) * 3.6e6 == pytest.approx(reading.cpu_energy_j)
    assert reading.co2e_kg == pytest.approx(float(rows[0]["emissions"]), rel=1e-6)
    assert "USA grid" in reading.notes["co2e"] and "cpu+ram" in reading.notes["co2e"]

    captured = capfd.readouterr()
    assert "codecarbon" not in (captured.out + captured.err).lower()  # its console noise is silenced


def test_codecarbon_failing_at_start_gives_none_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from codecarbon.emissions_tracker import BaseEmissionsTracker

    def broken(self: object) -> None:
        raise RuntimeError("no hardware found")

    # CodeCarbon's start() swallows its exceptions: the window must notice and say why.
    monkeypatch.setattr(BaseEmissionsTracker, "_ensure_hardware_ready", broken)
    with EnergyWindow(EnergyConfig(), tmp_path, "eval") as window:
        pass
    reading = window.reading
    assert reading.cpu_energy_j is None and reading.ram_energy_j is None
    assert reading.cpu_source == reading.ram_source == "unavailable"
    assert reading.notes["cpu"] == "CodeCarbon failed to start: RuntimeError: no hardware found"


def test_codecarbon_failing_at_stop_gives_none_and_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from codecarbon.emissions_tracker import BaseEmissionsTracker

    def broken(self: object) -> None:
        raise OSError("disk full")

    with EnergyWindow(EnergyConfig(), tmp_path, "eval") as window:
        monkeypatch.setattr(BaseEmissionsTracker, "_prepare_emissions_data", broken)
    assert window.reading.cpu_energy_j is None
    assert window.reading.notes["cpu"] == "CodeCarbon stop failed: OSError: disk full"


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


FULL = EnergyReading(
    duration_s=10.0,
    gpu_energy_j=1000.0,
    cpu_energy_j=200.0,
    ram_energy_j=50.0,
    co2e_kg=1e-4,
    gpu_source="nvml_counter",
    cpu_source="estimated",
    ram_source="estimated",
    notes={"co2e": "USA grid 369 gCO2e/kWh (CodeCarbon offline data) applied to gpu+cpu+ram energy"},
    gpus=("NVIDIA H100 80GB HBM3 (GPU-1)",),
)
NO_GPU = EnergyReading(
    duration_s=5.0,
    cpu_energy_j=100.0,
    ram_energy_j=25.0,
    co2e_kg=2e-5,
    cpu_source="estimated",
    ram_source="estimated",
    notes={"gpu": "NVML unavailable: Driver Not Loaded"},
)


def test_stage_metrics_use_design_names_and_omit_absent_values() -> None:
    metrics = stage_metrics(FULL, tokens=1250)
    assert set(metrics) == {
        "duration_s",
        "tokens",
        "tokens_per_s",
        "gpu_energy_j",
        "cpu_energy_j",
        "ram_energy_j",
        "total_energy_j",
        "total_energy_kwh",
        "j_per_token",
        "energy_per_10k_tokens_j",
        "co2e_kg",
    }
    assert metrics["total_energy_j"] == 1250.0
    assert metrics["energy_per_10k_tokens_j"] == 10_000.0
    assert metrics["total_energy_kwh"] == pytest.approx(1250 / 3.6e6)
    assert metrics["j_per_token"] == 1.0
    assert metrics["tokens_per_s"] == 125.0

    partial = stage_metrics(NO_GPU, tokens=0)
    assert "gpu_energy_j" not in partial
    assert "j_per_token" not in partial and "tokens_per_s" not in partial
    assert partial["total_energy_j"] == 125.0
    assert partial["tokens"] == 0.0  # a count the stage reported, not an unknown

    nothing = stage_metrics(EnergyReading(duration_s=3.0), tokens=10)
    assert set(nothing) == {"duration_s", "tokens", "tokens_per_s"}
    assert all(v != 0 for k, v in {**metrics, **nothing}.items() if k != "tokens")


def test_stage_tags_carry_sources_and_every_note() -> None:
    tags = stage_tags(NO_GPU)
    assert tags == {
        "energy.gpu.source": "unavailable",
        "energy.cpu.source": "estimated",
        "energy.ram.source": "estimated",
        "energy.idle.source": "none",
        "energy.gpu.note": "NVML unavailable: Driver Not Loaded",
    }


def test_sum_of_windows() -> None:
    both = FULL + FULL
    assert both.duration_s == 20.0
    assert both.gpu_energy_j == 2000.0 and both.total_energy_j == 2500.0
    assert both.co2e_kg == pytest.approx(2e-4)
    assert both.gpu_source == "nvml_counter"
    assert both.notes == FULL.notes and both.gpus == FULL.gpus

    mixed = FULL + NO_GPU  # e.g. a stage resumed on a machine whose driver failed
    assert mixed.duration_s == 15.0
    assert mixed.gpu_energy_j is None and mixed.gpu_source == "unavailable"
    assert mixed.notes["gpu"].startswith("partial: ")
    assert "Driver Not Loaded" in mixed.notes["gpu"]
    assert mixed.cpu_energy_j == 300.0 and mixed.cpu_source == "estimated"
    assert mixed.total_energy_j == 375.0
    assert sum([FULL, NO_GPU]) == mixed

    estimated_gpu = EnergyReading(duration_s=1.0, gpu_energy_j=5.0, gpu_source="power_integration")
    assert (FULL + estimated_gpu).gpu_source == "power_integration"


def test_json_round_trip_is_exact() -> None:
    for reading in (FULL, NO_GPU, FULL + NO_GPU, EnergyReading(duration_s=0.1 + 0.2)):
        data = json.loads(json.dumps(reading.to_dict()))
        assert EnergyReading.from_dict(data) == reading
    assert FULL.to_dict()["gpus"] == ["NVIDIA H100 80GB HBM3 (GPU-1)"]
