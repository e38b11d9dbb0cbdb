"""4. Sampling interval: one bursty workload measured at once by the energy counter and by samplers at
several intervals, to show what each polling interval would miss on this machine."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import GpuEnergyCounter
from dist_bench.energy.sampler import PowerSampler, integrate_energy_j, timeline_rows
from dist_bench.prerun.results import (
    CONVERGENCE_TOLERANCE,
    SAMPLING_DURATION_S,
    SAMPLING_INTERVALS_MS,
    SamplingValidation,
    _gpu_visible,
    _nvml_failure,
    _write_json,
)

# --- thresholds -------------------------------------------------------------------------------------------
PREFERRED_MAX_INTERVAL_MS = 500  # the seed recommends polling at 500 ms or faster


# --- 4. sampling interval -------------------------------------------------------------------------------
def bursty_workload(
    duration_s: float, on_s: float = 0.3, off_s: float = 0.3, device: str | None = None
) -> None:
    """The measurements' bursty load: `on_s` of matmuls (bf16 8192^3 on a GPU, fp32 on CPU), `off_s` idle."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        n, dtype = 8192, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        n, dtype = 256, torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    product = torch.empty(n, n, device=dev, dtype=dtype)  # reused: the burst is compute, not allocation
    end = time.perf_counter() + duration_s
    while (now := time.perf_counter()) < end:
        burst_end = min(now + on_s, end)
        while time.perf_counter() < burst_end:
            torch.matmul(a, b, out=product)
            if dev.type == "cuda":
                torch.cuda.synchronize()  # the burst must end when it says, not when the queue drains
        time.sleep(max(0.0, min(off_s, end - time.perf_counter())))


def validate_sampling_interval(
    output_dir: str | Path,
    duration_s: float = SAMPLING_DURATION_S,
    intervals_ms: Sequence[int] = SAMPLING_INTERVALS_MS,
    workload: Callable[[float], None] | None = None,
    *,
    tolerance: float = CONVERGENCE_TOLERANCE,
    nvml: Any = None,
) -> SamplingValidation:
    """Integrate one workload's power at each interval and compare with the energy counter over the same span.

    `workload(duration_s)` runs the load (default: bursty_workload). Without a GPU energy counter there is
    no reference: the workload is not run and the result says why (not critical on a CPU-only machine).
    Writes sampling_validation.json and sampling_series.json (every sample of every interval) into output_dir.
    """
    out = Path(output_dir)
    intervals = sorted({int(ms) for ms in intervals_ms})
    counter = GpuEnergyCounter(nvml)
    counter.start()
    nvml_module, handles, names = counter.devices
    reference = counter.read()
    if reference.energy_j is None:
        counter.stop()
        why = reference.note or "no GPU measured"
        result = SamplingValidation(
            None,
            {},
            None,
            None,
            [f"no GPU energy counter to compare against ({why}): sampling not validated"],
        )
        # Pre-Volta GPUs lack the counter by design (stages fall back to integrated power): not a failure.
        if _gpu_visible() and "counter unavailable" not in why:
            result.critical_warnings.append(_nvml_failure(why))
        _write_json(out / "sampling_validation.json", result.to_dict())
        _write_json(out / "sampling_series.json", {"counter_energy_joules": None, "series": {}})
        return result

    samplers = [PowerSampler(nvml_module, handles, list(names), ms / 1000) for ms in intervals]
    for sampler in samplers:
        sampler.start()
    t0 = time.perf_counter()
    try:
        (workload or bursty_workload)(duration_s)
    finally:
        gpu_module.synchronize_cuda()  # queued kernels belong to the span both methods measure
        elapsed = time.perf_counter() - t0
        series = [sampler.stop() for sampler in samplers]
        figures = counter.stop()

    warnings = [note for sampler in samplers for note in sampler.notes.values()]
    counter_j = figures.energy_j
    if counter_j is None or counter_j <= 0:
        warnings.append(f"energy counter gave {counter_j} J ({figures.note}): no deviation figures")
    estimates: dict[int, dict[str, Any]] = {}
    for ms, samples in zip(intervals, series, strict=True):
        gpus = {s.gpu for s in samples}
        energy = sum(integrate_energy_j(samples, g) for g in gpus) if len(gpus) == len(handles) else None
        deviation = (energy / counter_j - 1) * 100 if energy is not None and counter_j else None
        estimates[ms] = {"energy_joules": energy, "deviation_pct": deviation, "samples": len(samples)}
        if ms / 1000 > elapsed / 2:
            warnings.append(
                f"{ms} ms gives only {len(samples)} samples over {elapsed:.1f} s: a coarse estimate"
            )

    within = [ms for ms, e in estimates.items() if _within(e["deviation_pct"], tolerance)]
    converged = len(within) == len(estimates) if counter_j else None
    preferred = [ms for ms in within if ms <= PREFERRED_MAX_INTERVAL_MS]
    recommended = max(preferred) if preferred else max(within) if within else min(intervals)
    for ms, estimate in estimates.items():
        deviation = estimate["deviation_pct"]
        if deviation is not None and not _within(deviation, tolerance):
            warnings.append(
                f"{ms} ms polling deviates {deviation:+.1f}% from the energy counter (> {tolerance:.0%}): "
                f"it misses bursts; poll every {recommended} ms or faster"
            )
    if counter_j and not within:
        warnings.append(f"no interval within {tolerance:.0%} of the counter, not even {min(intervals)} ms")
    method = samplers[0].power_method if samplers else None
    if method == "average":
        warnings.append("no instant-power field: samples are NVML's trailing 1 s average, which lags bursts")

    result = SamplingValidation(
        counter_energy_joules=counter_j,
        estimates=estimates,
        converged=converged,
        recommended_interval_ms=recommended if counter_j else None,
        warnings=warnings,
        duration_s=elapsed,
        tolerance_pct=tolerance * 100,
        gpu_names=list(names),
        power_method=method,
    )
    _write_json(out / "sampling_validation.json", result.to_dict())
    _write_json(
        out / "sampling_series.json",
        {
            "counter_energy_joules": counter_j,
            "duration_s": elapsed,
            "gpus": list(names),
            "series": {str(ms): timeline_rows(s) for ms, s in zip(intervals, series, strict=True)},
        },
    )
    return result


def _within(deviation_pct: float | None, tolerance: float) -> bool:
    return deviation_pct is not None and abs(deviation_pct) <= tolerance * 100
