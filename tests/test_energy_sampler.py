"""The simulated NVML (exact counter, 100 ms sensor updates, trailing-average power, failures) and the power
sampler thread run against it: integration error by polling interval, fallbacks, failures, statistics.

Simulation-only tests use a hand-driven clock and take no time; sampler tests run the real thread for
0.3-1.5 s, with bursts, steps and failures placed mid-plateau so every reading is deterministic as long as
a tick is late by less than the 100 ms sensor update."""

from __future__ import annotations

import threading
import time

import pytest

from dist_bench.energy.gpu import GpuEnergyCounter, uuid_key
from dist_bench.energy.nvml_sim import (
    PowerTrace,
    SimulatedGpu,
    SimulatedNvml,
    constant,
    square_wave,
    steps,
)
from dist_bench.energy.sampler import (
    MAX_CONSECUTIVE_FAILURES,
    THREAD_NAME,
    PowerSampler,
    Sample,
    integrate_energy_j,
    power_stats,
    timeline_rows,
    vram_stats,
)

BURSTS = square_wave(700, 70, period_s=0.6, duty=0.5)  # the measurements' load: 0.3 s on, 0.3 s off


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sim_gpu(uuid: str, power: PowerTrace | object, **kwargs: object) -> SimulatedGpu:
    return SimulatedGpu(uuid=uuid, name=f"Sim H100 {uuid}", memory_total_mb=81559, power_w=power, **kwargs)  # type: ignore[arg-type]


def started(*gpus: SimulatedGpu, clock: ManualClock | None = None) -> tuple[SimulatedNvml, list[object]]:
    nvml = SimulatedNvml(*gpus, clock=clock) if clock else SimulatedNvml(*gpus)
    nvml.nvmlInit()
    return nvml, [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(len(gpus))]


def sample_window(
    *gpus: SimulatedGpu, seconds: float, interval_s: float
) -> tuple[PowerSampler, list[Sample], list[float | None]]:
    """Sample for `seconds`; also returns each GPU's counter energy over the same window (None if lost)."""
    nvml, handles = started(*gpus)

    def counter_mj() -> list[int | None]:
        values: list[int | None] = []
        for handle in handles:
            try:
                values.append(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
            except nvml.NVMLError:
                values.append(None)
        return values

    before = counter_mj()
    sampler = PowerSampler(nvml, handles, [g.name for g in gpus], interval_s=interval_s)
    sampler.start()
    time.sleep(seconds)
    samples = sampler.stop()
    after = counter_mj()
    nvml.nvmlShutdown()
    energy = [
        (b - a) / 1000 if a is not None and b is not None else None
        for a, b in zip(before, after, strict=True)
    ]
    return sampler, samples, energy


# --- the simulation ---------------------------------------------------------------------------------------
def test_traces_integrate_exactly() -> None:
    assert constant(250).joules(10.0) == 2500.0
    assert BURSTS.joules(6.0) == pytest.approx(10 * (700 * 0.3 + 70 * 0.3))
    assert BURSTS.joules(0.45) == pytest.approx(700 * 0.3 + 70 * 0.15)
    late = square_wave(700, 70, 0.6, 0.5, phase_s=0.05)  # on during [0.05, 0.35), [0.65, 0.95), ...
    assert late.joules(1.0) == pytest.approx(700 * 0.6 + 70 * 0.4)
    stepped = steps([(0.0, 100), (1.0, 300), (1.5, 50)])
    assert [stepped(t) for t in (0.0, 0.99, 1.0, 1.49, 1.5, 9.0)] == [100, 100, 300, 300, 50, 50]
    assert stepped.joules(2.0) == pytest.approx(100 + 150 + 25)


@pytest.mark.parametrize("trace", [constant(250), BURSTS], ids=["constant", "square_wave"])
def test_counter_is_the_integral_of_power_quantised_to_100ms(trace: PowerTrace) -> None:
    clock = ManualClock()
    # The same trace twice: exact integral, and as a plain callable integrated numerically by the sim.
    nvml, (exact, numeric) = started(
        sim_gpu("GPU-a", trace), sim_gpu("GPU-b", lambda t: trace(t)), clock=clock
    )
    for now, grid in [
        (0.0, 0.0),
        (0.05, 0.0),
        (0.1, 0.1),
        (0.299, 0.2),
        (0.45, 0.4),
        (6.0, 6.0),
        (6.099, 6.0),
    ]:
        clock.now = now
        expected_mj = trace.joules(grid) * 1000
        assert nvml.nvmlDeviceGetTotalEnergyConsumption(exact) == int(expected_mj)
        assert nvml.nvmlDeviceGetTotalEnergyConsumption(numeric) == pytest.approx(
            expected_mj, rel=1e-4, abs=1
        )
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 14


def test_instant_power_and_the_trailing_one_second_average() -> None:
    clock = ManualClock()
    nvml, (handle,) = started(sim_gpu("GPU-a", steps([(0.0, 100), (1.0, 300)])), clock=clock)

    def instant_w() -> float:
        field = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        assert (field.nvmlReturn, field.valueType) == (nvml.NVML_SUCCESS, nvml.NVML_VALUE_TYPE_UNSIGNED_INT)
        return field.value.uiVal / 1000

    clock.now = 1.05
    assert instant_w() == 300 and nvml.nvmlDeviceGetPowerUsage(handle) == 100_000  # the average lags
    clock.now = 1.099
    assert instant_w() == 300  # no new sensor value before 1.1 s
    clock.now = 1.5
    assert instant_w() == 300 and nvml.nvmlDeviceGetPowerUsage(handle) == 200_000
    clock.now = 2.0
    assert nvml.nvmlDeviceGetPowerUsage(handle) == 300_000


def test_device_capabilities_failures_and_init() -> None:
    clock = ManualClock()
    old = sim_gpu("GPU-old", constant(100), has_energy_counter=False, has_instant_power=False)
    lost = sim_gpu("GPU-lost", constant(100), fail_after_s=1.0)
    nvml = SimulatedNvml(old, lost, clock=clock)
    with pytest.raises(nvml.NVMLError) as uninitialized:
        nvml.nvmlDeviceGetCount()
    assert uninitialized.value.value == nvml.NVML_ERROR_UNINITIALIZED

    nvml.nvmlInit()
    old_h, lost_h = nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlDeviceGetHandleByIndex(1)
    with pytest.raises(nvml.NVMLError) as not_supported:
        nvml.nvmlDeviceGetTotalEnergyConsumption(old_h)
    assert not_supported.value.value == nvml.NVML_ERROR_NOT_SUPPORTED
    fields = nvml.nvmlDeviceGetFieldValues(old_h, [nvml.NVML_FI_DEV_POWER_INSTANT])
    assert fields[0].nvmlReturn == nvml.NVML_ERROR_NOT_SUPPORTED  # the call succeeds, the entry fails
    assert nvml.nvmlDeviceGetPowerUsage(old_h) == 100_000

    assert nvml.nvmlDeviceGetMemoryInfo(lost_h).total == 81559 * 2**20
    clock.now = 1.0
    for call in (
        lambda: nvml.nvmlDeviceGetTotalEnergyConsumption(lost_h),
        lambda: nvml.nvmlDeviceGetMemoryInfo(lost_h),
        lambda: nvml.nvmlDeviceGetUUID(lost_h),
    ):
        with pytest.raises(nvml.NVMLError, match="GPU is lost"):
            call()
    assert nvml.nvmlDeviceGetPowerUsage(old_h) == 100_000  # the other GPU is unaffected

    nvml.nvmlInit()  # reference counted: the second shutdown is the one that closes
    nvml.nvmlShutdown()
    assert nvml.nvmlSystemGetDriverVersion() == "simulated"
    nvml.nvmlShutdown()
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetCount()


def test_gpu_energy_counter_runs_unchanged_on_the_simulation() -> None:
    clock = ManualClock()
    gpu = sim_gpu("GPU-5f2c9a10-sim", BURSTS)
    nvml = SimulatedNvml(sim_gpu("GPU-other", constant(400)), gpu, clock=clock)
    # The counter matches NVML's UUIDs against torch's form (no "GPU-" prefix), as torch_cuda_uuids returns.
    counter = GpuEnergyCounter(nvml=nvml, cuda_uuids=lambda: [uuid_key(gpu.uuid)])
    clock.now = 0.55
    counter.start()
    clock.now = 4.25
    so_far = counter.read()
    clock.now = 6.03
    final = counter.stop()

    assert so_far.energy_j == pytest.approx(BURSTS.joules(4.2) - BURSTS.joules(0.5), abs=0.002)
    assert final.note is None and final.gpus == ("Sim H100 GPU-5f2c9a10-sim (GPU-5f2c9a10-sim)",)
    assert final.energy_j == pytest.approx(BURSTS.joules(6.0) - BURSTS.joules(0.5), abs=0.002)
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 3  # start, read, stop: one read per GPU each
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 1


# --- the sampler ------------------------------------------------------------------------------------------
def test_10ms_instant_power_integrates_bursts_within_2pct_of_the_counter() -> None:
    # 1.5 s = 2.5 bursts, ending mid-idle so a late stop adds little either side.
    sampler, samples, (counter_j,) = sample_window(sim_gpu("GPU-a", BURSTS), seconds=1.5, interval_s=0.01)
    assert sampler.power_method == "instant"
    assert counter_j == pytest.approx(700 * 0.9 + 70 * 0.6, rel=0.02)
    assert integrate_energy_j(samples, 0) == pytest.approx(counter_j, rel=0.02)
    assert samples[0].t_s == pytest.approx(0.0, abs=1e-3)  # the series spans the whole window
    assert samples[-1].t_s >= 1.5
    assert len(samples) > 100


@pytest.mark.parametrize("interval_s", [0.5, 1.0])
def test_slow_polling_in_step_with_the_bursts_misses_most_of_them(interval_s: float) -> None:
    # Bursts during [0.05, 0.35) and [0.65, 0.95): every tick (0, 0.5, 1.0 s) and the stop land in the idle
    # gaps, so the series sees only 70 W while the GPU averaged 448 W.
    late_bursts = square_wave(700, 70, 0.6, 0.5, phase_s=0.05)
    _, samples, (counter_j,) = sample_window(
        sim_gpu("GPU-a", late_bursts), seconds=1.0, interval_s=interval_s
    )
    assert {s.power_w for s in samples} == {70.0}
    assert integrate_energy_j(samples, 0) / counter_j < 0.25  # over 75% missed (-84% at a prompt stop)


def test_without_the_instant_field_power_is_the_trailing_average() -> None:
    gpus = (sim_gpu("GPU-a", constant(250)), sim_gpu("GPU-b", constant(90), has_instant_power=False))
    sampler, samples, _ = sample_window(*gpus, seconds=0.3, interval_s=0.02)
    assert sampler.power_method == "average"  # one method for all GPUs, so the series are comparable
    assert {s.power_w for s in samples if s.gpu == 0} == {250.0}
    assert {s.power_w for s in samples if s.gpu == 1} == {90.0}
    assert sampler.notes == {} and sampler.failures == {0: 0, 1: 0}


def test_a_gpu_lost_mid_window_is_dropped_with_a_note_while_the_other_continues() -> None:
    gpus = (sim_gpu("GPU-a", constant(100)), sim_gpu("GPU-b", constant(200), fail_after_s=0.3))
    sampler, samples, _ = sample_window(*gpus, seconds=0.8, interval_s=0.02)
    lost = [s.t_s for s in samples if s.gpu == 1]
    kept = [s.t_s for s in samples if s.gpu == 0]
    assert max(lost) < 0.3 < 0.75 < max(kept)
    assert sampler.failures == {0: 0, 1: MAX_CONSECUTIVE_FAILURES}  # then no more polling
    assert list(sampler.notes) == [1]
    assert "consecutive failed reads: GPU is lost" in sampler.notes[1]
    assert integrate_energy_j(samples, 0) == pytest.approx(100 * (max(kept) - min(kept)), rel=1e-9)


def test_two_gpus_are_sampled_independently() -> None:
    gpus = (
        sim_gpu("GPU-a", BURSTS, memory_used_mb=1000, temperature_c=60),
        sim_gpu("GPU-b", constant(300), memory_used_mb=2000, utilization_pct=lambda t: 50, sm_clock_mhz=1410),
    )
    _, samples, counter_j = sample_window(*gpus, seconds=0.6, interval_s=0.02)
    a = [s for s in samples if s.gpu == 0]
    b = [s for s in samples if s.gpu == 1]
    assert {s.power_w for s in a} == {700.0, 70.0}
    assert {(s.power_w, s.memory_used_mb, s.utilization_pct, s.sm_clock_mhz) for s in b} == {
        (300.0, 2000, 50, 1410)
    }
    assert {(s.memory_used_mb, s.temperature_c, s.utilization_pct) for s in a} == {(1000, 60, 0)}
    assert integrate_energy_j(samples, 1) == pytest.approx(counter_j[1], rel=0.05)
    assert abs(len(a) - len(b)) <= 1


def test_stats_of_a_known_series() -> None:
    samples = [
        Sample(t, 0, w, mem, None, None, None)
        for t, w, mem in [(0, 100, 1000), (1, 100, 1000), (2, 300, 5000), (3, 300, 5000)]
    ] + [Sample(0.5, 1, 999, None, None, None, None)]  # another GPU, without memory readings
    assert integrate_energy_j(samples, 0) == 600.0  # 100 + 200 + 300
    assert power_stats(samples, 0) == (200.0, 300.0)
    assert vram_stats(samples, 0) == (5000.0, 3000.0)
    assert power_stats(samples, 1) == (999.0, 999.0)
    with pytest.raises(ValueError, match="no memory_used_mb samples for GPU 1"):
        vram_stats(samples, 1)
    rows = timeline_rows(samples)
    assert [r["t_s"] for r in rows] == [0, 0.5, 1, 2, 3]
    assert rows[0] == {
        "t_s": 0,
        "gpu": 0,
        "power_w": 100,
        "memory_used_mb": 1000,
        "utilization_pct": None,
        "temperature_c": None,
        "sm_clock_mhz": None,
        "torch_allocated_mb": None,
    }


def test_stats_of_a_sampled_stepped_trace() -> None:
    power = steps([(0.0, 100), (0.5, 300)])
    memory = steps([(0.0, 1000), (0.5, 5000)])
    _, samples, _ = sample_window(
        sim_gpu("GPU-a", power, memory_used_mb=memory), seconds=1.0, interval_s=0.01
    )
    first, last = samples[0].t_s, samples[-1].t_s
    avg_w, peak_w = power_stats(samples, 0)
    assert peak_w == 300.0
    assert avg_w == pytest.approx((power.joules(last) - power.joules(first)) / (last - first), rel=0.02)
    peak_mb, avg_mb = vram_stats(samples, 0)
    assert peak_mb == 5000.0
    assert avg_mb == pytest.approx((memory.joules(last) - memory.joules(first)) / (last - first), rel=0.02)


def test_the_thread_never_raises_and_is_gone_after_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    escaped: list[object] = []
    monkeypatch.setattr(threading, "excepthook", escaped.append)

    def broken(t: float) -> float:
        if t >= 0.1:
            raise ZeroDivisionError("trace bug")
        return 100.0

    nvml, handles = started(sim_gpu("GPU-a", broken), sim_gpu("GPU-b", constant(50)))
    sampler = PowerSampler(nvml, handles, ["A", "B"], interval_s=0.01)
    sampler.start()
    assert any(t.name == THREAD_NAME for t in threading.enumerate())
    time.sleep(0.25)
    samples = sampler.stop()

    assert not any(t.name == THREAD_NAME for t in threading.enumerate())
    assert escaped == []
    assert sampler.notes[0].startswith("A: sampling stopped") and "trace bug" in sampler.notes[0]
    assert sampler.stop() == samples  # idempotent, and nothing was added after stop
    time.sleep(0.03)
    assert sampler.samples() == samples


def test_the_sampler_holds_its_own_nvml_reference() -> None:
    # A stage may release NVML (GpuEnergyCounter.stop) before stopping the sampler: the last sample must
    # still be read, and every init still matched by a shutdown.
    nvml, handles = started(sim_gpu("GPU-a", constant(100)))
    sampler = PowerSampler(nvml, handles, ["A"], interval_s=0.02)
    sampler.start()
    time.sleep(0.1)
    nvml.nvmlShutdown()
    samples = sampler.stop()
    assert sampler.failures == {0: 0} and sampler.notes == {}
    assert samples[-1].t_s >= 0.1
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 2
    with pytest.raises(nvml.NVMLError):
        nvml.nvmlDeviceGetCount()  # released for good
