"""2. Idle baseline: GPU power while nothing runs (for net energy), with variance and background-load
warnings."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import GpuEnergyCounter
from dist_bench.energy.sampler import PowerSampler, Sample, power_stats, timeline_rows
from dist_bench.prerun.results import (
    IDLE_POLL_INTERVAL_MS,
    MAX_IDLE_W,
    IdleBaseline,
    _gpu_visible,
    _nvml_failure,
    _write_json,
)

# --- thresholds -------------------------------------------------------------------------------------------
IDLE_STD_WARN_W = 5.0  # the seed's "std dev > 5 W: check for background workloads", per GPU


# --- 2. idle baseline -----------------------------------------------------------------------------------
def measure_idle_baseline(
    duration_minutes: float = 5.0,
    poll_interval_ms: int = IDLE_POLL_INTERVAL_MS,
    output_dir: str | Path | None = None,
    *,
    max_idle_watts: float = MAX_IDLE_W,
    nvml: Any = None,
) -> IdleBaseline:
    """GPU power while this process does nothing, for net energy (`net = total - idle W x seconds`).

    Without a GPU to measure it returns at once (nothing to wait for) with None figures and a warning.
    Writes idle_baseline.json and idle_baseline_readings.json into `output_dir` when given.
    """
    counter = GpuEnergyCounter(nvml)
    counter.start()
    nvml_module, handles, names = counter.devices
    sampler: PowerSampler | None = None
    t0 = time.perf_counter()
    if handles:
        sampler = PowerSampler(nvml_module, handles, list(names), poll_interval_ms / 1000)
        sampler.start()
        time.sleep(duration_minutes * 60)
    elapsed = time.perf_counter() - t0
    figures = counter.stop()
    samples = sampler.stop() if sampler else []
    warnings = list(sampler.notes.values()) if sampler else []
    critical: list[str] = []
    readings = _readings(samples, len(handles))

    if not handles:
        why = figures.note or "no GPU measured"
        warnings.append(f"no GPU power measured ({why}): idle power figures are None")
        if _gpu_visible():
            critical.append(_nvml_failure(why))
        result = IdleBaseline(None, None, None, None, [], 0.0, poll_interval_ms, 0, [], warnings, critical)
    else:
        result = _idle_figures(samples, readings, list(names), figures, elapsed, poll_interval_ms, warnings)
        result.power_method = sampler.power_method if sampler else None
        result.max_idle_watts = max_idle_watts
        result.warnings += _idle_warnings(result, max_idle_watts)

    if output_dir is not None:
        out = Path(output_dir)
        _write_json(out / "idle_baseline.json", result.to_dict())
        _write_json(
            out / "idle_baseline_readings.json",
            {
                "poll_interval_ms": poll_interval_ms,
                "power_method": result.power_method,
                "gpus": list(names),
                "readings": readings,  # one per tick with every GPU: total and per-GPU watts
                "samples": timeline_rows(samples),  # every GPU read as taken, with memory, util, temp
            },
        )
    return result


def _readings(samples: list[Sample], n_gpus: int) -> list[dict[str, Any]]:
    """One reading per sampler tick that has every GPU: the sampler reads GPUs 0..n-1 in turn and appends
    in time order, so a GPU index not above the previous one starts the next tick."""
    ticks: list[list[Sample]] = []
    for sample in samples:
        if not ticks or sample.gpu <= ticks[-1][-1].gpu:
            ticks.append([])
        ticks[-1].append(sample)
    return [
        {
            "t_s": tick[0].t_s,
            "total_power_w": sum(s.power_w for s in tick),
            "per_gpu_w": [s.power_w for s in tick],
        }
        for tick in ticks
        if len(tick) == n_gpus  # a tick missing a GPU would read low, not idle
    ]


def _idle_figures(
    samples: list[Sample],
    readings: list[dict[str, Any]],
    names: list[str],
    figures: gpu_module.GpuEnergy,
    elapsed: float,
    poll_interval_ms: int,
    warnings: list[str],
) -> IdleBaseline:
    totals = [r["total_power_w"] for r in readings]
    per_gpu_counter = list(figures.per_gpu_j.values()) if figures.energy_j is not None else []
    per_gpu = []
    for index, name in enumerate(names):
        watts = [s.power_w for s in samples if s.gpu == index]
        sampled = power_stats(samples, index)[0] if watts else None
        counted = per_gpu_counter[index] / elapsed if per_gpu_counter and elapsed > 0 else None
        per_gpu.append(
            {
                "gpu": name,
                "avg_power_watts": counted if counted is not None else sampled,
                "sampled_avg_power_watts": sampled,
                "min_power_watts": min(watts) if watts else None,
                "max_power_watts": max(watts) if watts else None,
                "std_power_watts": statistics.pstdev(watts) if len(watts) >= 2 else None,
                "readings_count": len(watts),
            }
        )
    sampled_avg = (
        sum(g["sampled_avg_power_watts"] for g in per_gpu)
        if all(g["sampled_avg_power_watts"] is not None for g in per_gpu)
        else None
    )
    if figures.energy_j is not None and elapsed > 0:
        # The counter integrates every update the sensor made; polled readings only see their instants.
        average, source = figures.energy_j / elapsed, "nvml_counter"
    else:
        average, source = sampled_avg, "power_samples" if sampled_avg is not None else "unavailable"
        warnings.append(f"energy counter unavailable ({figures.note}): average from polled power")
    if len(totals) < 2:
        warnings.append(f"only {len(totals)} complete reading(s): no spread figures; measure longer")
    return IdleBaseline(
        gpu_avg_power_watts=average,
        gpu_min_power_watts=min(totals) if totals else None,
        gpu_max_power_watts=max(totals) if totals else None,
        gpu_std_power_watts=statistics.pstdev(totals) if len(totals) >= 2 else None,
        per_gpu=per_gpu,
        duration_s=elapsed,
        poll_interval_ms=poll_interval_ms,
        readings_count=len(readings),
        gpu_names=names,
        warnings=warnings,
        idle_power_w_per_gpu=average / len(names) if average is not None else None,
        avg_source=source,
        sampled_avg_power_watts=sampled_avg,
        counter_energy_joules=figures.energy_j,
    )


def _idle_warnings(result: IdleBaseline, max_idle_watts: float) -> list[str]:
    # Per GPU: noise of independent GPUs adds up in the sum, so 5 W on the sum of eight would be too strict.
    warnings = []
    for gpu in result.per_gpu:
        std, avg = gpu["std_power_watts"], gpu["avg_power_watts"]
        if std is not None and std > IDLE_STD_WARN_W:
            warnings.append(
                f"{gpu['gpu']}: high idle power variance (std {std:.1f} W > {IDLE_STD_WARN_W:g} W): "
                "check for background workloads"
            )
        if avg is not None and avg > max_idle_watts:
            warnings.append(
                f"{gpu['gpu']}: idle power {avg:.1f} W above {max_idle_watts:g} W per GPU: background load? "
                "check nvidia-smi for other processes (a CUDA context, this process's too, also raises idle "
                "draw: an H200 read ~119 W with one, ~80 W without)"
            )
    return warnings
