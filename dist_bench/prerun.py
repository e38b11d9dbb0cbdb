"""Pre-run validation (seed 000): cheap checks before an expensive energy experiment.

    from dist_bench.prerun import quick_validation, run_prerun_validation

    ok = quick_validation(output_dir="./prerun_validation")          # reduced durations, -> bool
    report = run_prerun_validation(
        output_dir="./prerun_validation", idle_duration_minutes=5.0, burn_in_steps=500,
        expected_gpu_type="A100", expected_vram_gb=80.0,
    )
    if not report.all_checks_passed:
        print(report.critical_warnings)

    python -m dist_bench.prerun --quick --output-dir ./validation   # exit 0 passed, 1 failed

Four checks, each also callable on its own, in the order run_prerun_validation runs them:
1. `validate_hardware`: GPU type (case-insensitive substring), VRAM per GPU (GiB), GPU count, CPU model.
2. `measure_idle_baseline`: GPU power while nothing runs, polled by a PowerSampler; the mean comes from the
   energy counter. Runs before any work so the GPUs are not still warm from it.
3. `run_burn_in_test`: a small transformer trained on random tokens inside an EnergyWindow, to prove the
   energy logs get written with non-zero figures and that throughput and utilisation are sane.
4. `validate_sampling_interval`: one bursty workload measured at once by the energy counter and by
   samplers at several intervals; polling every 0.5-1 s misses 10-20% of a bursty load on an H100
   (shared/measurements/README.md), so this shows on this machine what each interval would miss.

Output tree (run_prerun_validation):

    prerun_validation/
        prerun_validation_report.json
        idle_baseline/idle_baseline.json, idle_baseline_readings.json
        burn_in/energy_logs/stage_burn_in.json (+ power_timeline.csv, codecarbon/ when they apply)
        sampling_validation/sampling_validation.json, sampling_series.json

Critical (`all_checks_passed` is False): any hardware expectation not met; the burn-in's energy logs
invalid on a machine with a GPU; NVML failing on a machine with a GPU (no GPU energy or power at all); a
check that crashed. A CPU-only machine is not a failure: GPU figures are None and warnings say why.

Nothing here raises because NVML is missing. Every function takes `nvml` (default pynvml) so a simulated
device (energy/nvml_sim.py) can stand in for a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn
from torch.nn import functional as F

from dist_bench import environment
from dist_bench.config import EnergyConfig, flatten
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import GpuEnergyCounter, uuid_key
from dist_bench.energy.outputs import StageSeries, write_timeline_csv
from dist_bench.energy.sampler import PowerSampler, Sample, integrate_energy_j, power_stats, timeline_rows
from dist_bench.energy.window import EnergyWindow, stage_metrics
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

# --- thresholds -------------------------------------------------------------------------------------------
IDLE_STD_WARN_W = 5.0  # the seed's "std dev > 5 W: check for background workloads", per GPU
# Per GPU. An H100 idles at ~70 W with no process on it, but at ~120 W once a process holds a CUDA context
# (measured 2026-11-21, docs/benchmarks.md), as this one does while measuring: 150 W leaves that alone and
# still catches real background work.
MAX_IDLE_W = 150.0
CONVERGENCE_TOLERANCE = 0.10  # the seed: estimates should agree within 10%
PREFERRED_MAX_INTERVAL_MS = 500  # the seed recommends polling at 500 ms or faster
VRAM_TOLERANCE = 0.02  # NVML reports memory after the driver's reservation: an "80GB" H100 shows 79.6 GiB
LOW_UTILIZATION_PCT = 50.0

# Throughput sanity range of the burn-in, from its FLOPs per step. The floor is far below any healthy
# device (an H100 does ~989 dense bf16 TFLOP/s, plain PyTorch training reaches ~20% of it); the per-step
# overhead allowance keeps tiny models, which are launch/Python bound, above the floor. Above the ceiling
# the timing itself is wrong (e.g. asynchronous CUDA work not synchronised).
FLOOR_FLOPS = {"cuda": 5e12, "cpu": 1e9}
STEP_OVERHEAD_S = {"cuda": 0.05, "cpu": 0.25}
CEILING_FLOPS = {"cuda": 5e15, "cpu": 5e13}

# --- durations ----------------------------------------------------------------------------------------------
IDLE_POLL_INTERVAL_MS = 500  # the seed's default; idle power is steady, no need for 100 ms
SAMPLING_DURATION_S = 60.0  # four periods of the seed's 15 s interval
SAMPLING_INTERVALS_MS = (100, 1000, 15000)  # the project's default, then the seed's 1 s vs 15 s
# quick=True: 10 s idle, 50 burn-in steps (FULL_MODEL on a GPU, CPU_MODEL on CPU), 15 s of sampling with
# 5 s instead of 15 s as the long interval, so that it still gets three periods.
QUICK_IDLE_MINUTES = 10 / 60
QUICK_BURN_IN_STEPS = 50
QUICK_SAMPLING_DURATION_S = 15.0
QUICK_SAMPLING_INTERVALS_MS = (100, 1000, 5000)

BURN_IN_STAGE = "burn_in"
BURN_IN_WARMUP_STEPS = 2  # allocator, cuBLAS handles, optimizer state: not part of the measured window
BURN_IN_LR = 1e-4
REPORT_FILE = "prerun_validation_report.json"


@dataclass(frozen=True)
class ModelSize:
    """Shape of the burn-in model and its batches."""

    model_dim: int
    num_layers: int
    seq_len: int
    batch_size: int
    vocab_size: int


FULL_MODEL = ModelSize(model_dim=1024, num_layers=12, seq_len=512, batch_size=8, vocab_size=32_000)
# On CPU the burn-in only proves the logging path: a full-size model would take hours on a few cores.
CPU_MODEL = ModelSize(model_dim=128, num_layers=2, seq_len=64, batch_size=8, vocab_size=1024)


class PrerunFailed(RuntimeError):
    """A critical pre-run check failed; `report` holds every finding. For the pipeline's gate to raise."""

    def __init__(self, report: PrerunReport) -> None:
        super().__init__("; ".join(report.critical_warnings) or "pre-run validation failed")
        self.report = report


# --- results --------------------------------------------------------------------------------------------
class _Result:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what json.load gives back for the written file, key for key."""
        return _jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]  # subclasses are dataclasses


@dataclass
class IdleBaseline(_Result):
    """GPU power with nothing running, all GPUs summed per reading; None (never 0) where not measured."""

    gpu_avg_power_watts: float | None  # energy counter / duration when the counter works
    gpu_min_power_watts: float | None
    gpu_max_power_watts: float | None
    gpu_std_power_watts: float | None
    per_gpu: list[dict[str, Any]]
    duration_s: float
    poll_interval_ms: int
    readings_count: int
    gpu_names: list[str]
    warnings: list[str] = field(default_factory=list)
    critical_warnings: list[str] = field(default_factory=list)
    idle_power_w_per_gpu: float | None = None  # what EnergyWindow(idle_power_w=...) takes
    avg_source: str = "unavailable"  # nvml_counter | power_samples | unavailable
    sampled_avg_power_watts: float | None = None  # time-weighted mean of the readings, a cross-check
    counter_energy_joules: float | None = None
    power_method: str | None = None  # instant | average (sampler.py)
    max_idle_watts: float = MAX_IDLE_W


@dataclass
class BurnInResult(_Result):
    energy_logs_valid: bool  # stage JSON written, >= 1 energy component measured, none measured as 0
    gpu_energy_joules: float | None
    cpu_energy_joules: float | None
    tokens_processed: int
    tokens_per_second: float | None
    avg_gpu_utilization_pct: float | None
    num_steps: int
    device: str
    warnings: list[str] = field(default_factory=list)
    critical_warnings: list[str] = field(default_factory=list)
    ram_energy_joules: float | None = None
    duration_s: float = 0.0
    expected_tokens_per_second: dict[str, float] = field(default_factory=dict)  # {"min": .., "max": ..}
    model: dict[str, int] = field(default_factory=dict)
    final_loss: float | None = None
    energy_log: str | None = None


@dataclass
class SamplingValidation(_Result):
    counter_energy_joules: float | None  # the reference; None without a GPU energy counter
    estimates: dict[int, dict[str, Any]]  # interval_ms -> energy_joules, deviation_pct, samples
    converged: bool | None  # every estimate within 10% of the counter; None when nothing to compare
    recommended_interval_ms: int | None
    warnings: list[str] = field(default_factory=list)
    critical_warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    tolerance_pct: float = CONVERGENCE_TOLERANCE * 100
    gpu_names: list[str] = field(default_factory=list)
    power_method: str | None = None


@dataclass
class HardwareValidation(_Result):
    actual_gpu_type: str | None
    actual_vram_gb: float | None  # GiB, the smallest GPU's: it bounds what fits on each
    actual_gpu_count: int
    actual_cpu: str | None
    gpu_type_matches: bool  # True where nothing was expected: there is nothing to mismatch
    vram_sufficient: bool
    gpu_count_matches: bool
    cpu_matches: bool
    critical_warnings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    expected: dict[str, Any] = field(default_factory=dict)
    gpu_source: str | None = None  # nvml | torch | None


@dataclass
class PrerunReport(_Result):
    all_checks_passed: bool
    critical_warnings: list[str]
    warnings: list[str]
    hardware_validation: HardwareValidation | None
    idle_baseline: IdleBaseline | None
    burn_in: BurnInResult | None
    sampling_validation: SamplingValidation | None
    timestamp: str
    environment: dict[str, Any]
    output_dir: str
    settings: dict[str, Any] = field(default_factory=dict)  # the durations and sizes actually used
    skipped: list[str] = field(default_factory=list)


# --- 1. hardware ----------------------------------------------------------------------------------------
def validate_hardware(
    expected_gpu_type: str | None = None,
    min_vram_gb: float | None = None,
    expected_gpu_count: int | None = None,
    expected_cpu: str | None = None,
    *,
    nvml: Any = None,
) -> HardwareValidation:
    """Compare the GPUs this process uses (one per rank under torchrun) and the CPU with expectations.

    Every expectation not met is a critical warning; with none given, it passes.
    """
    gpus, source, warnings = _process_gpus(nvml)
    cpu = environment.cpu_info().get("model")
    names = [name for name, _ in gpus if name]
    actual_type = ", ".join(dict.fromkeys(names)) or None
    vrams = [vram for _, vram in gpus if vram is not None]
    actual_vram = round(min(vrams), 2) if vrams else None
    critical: list[str] = []

    type_ok = True
    if expected_gpu_type:
        type_ok = bool(gpus) and len(names) == len(gpus)
        type_ok = type_ok and all(expected_gpu_type.lower() in name.lower() for name in names)
        if not type_ok:
            critical.append(
                f"GPU type mismatch: expected {expected_gpu_type!r}, found {actual_type or 'no GPU'}"
            )
    vram_ok = True
    if min_vram_gb is not None:
        vram_ok = actual_vram is not None and actual_vram >= min_vram_gb * (1 - VRAM_TOLERANCE)
        if not vram_ok:
            found = f"{actual_vram:.1f} GiB per GPU" if actual_vram is not None else "no GPU memory figure"
            critical.append(
                f"insufficient VRAM: expected at least {min_vram_gb:g} GiB per GPU, found {found}"
            )
    count_ok = expected_gpu_count is None or len(gpus) == expected_gpu_count
    if not count_ok:
        critical.append(f"GPU count mismatch: expected {expected_gpu_count}, found {len(gpus)}")
    cpu_ok = expected_cpu is None or (cpu is not None and expected_cpu.lower() in cpu.lower())
    if not cpu_ok:
        critical.append(f"CPU mismatch: expected {expected_cpu!r}, found {cpu or 'unknown CPU'}")

    return HardwareValidation(
        actual_gpu_type=actual_type,
        actual_vram_gb=actual_vram,
        actual_gpu_count=len(gpus),
        actual_cpu=cpu,
        gpu_type_matches=type_ok,
        vram_sufficient=vram_ok,
        gpu_count_matches=count_ok,
        cpu_matches=cpu_ok,
        critical_warnings=critical,
        warnings=warnings,
        expected={
            "gpu_type": expected_gpu_type,
            "min_vram_gb": min_vram_gb,
            "gpu_count": expected_gpu_count,
            "cpu": expected_cpu,
        },
        gpu_source=source,
    )


def _process_gpus(nvml: Any) -> tuple[list[tuple[str | None, float | None]], str | None, list[str]]:
    """(name, GiB) of each CUDA device of this process, from NVML, else torch.cuda; where from; warnings."""
    try:
        wanted = [uuid_key(u) for u in gpu_module.torch_cuda_uuids()]
    except Exception as err:
        return [], None, [f"could not list CUDA devices: {_describe(err)}"]
    module, why = _nvml_module(nvml)
    info = environment.gpu_info(module) if module is not None else {"gpus": [], "gpu_note": why}
    by_uuid = {uuid_key(g["uuid"]): g for g in info["gpus"]}
    if not wanted:
        if by_uuid:
            return (
                [],
                None,
                [
                    f"NVML sees {len(by_uuid)} GPU(s) but torch sees none: a CPU-only torch build, "
                    "or CUDA_VISIBLE_DEVICES hides them"
                ],
            )
        return [], None, []
    if all(u in by_uuid for u in wanted):
        found = [by_uuid[u] for u in wanted]
        return [(g["name"], _gib(g["memory_total_mb"])) for g in found], "nvml", []
    warnings = [
        f"NVML could not describe the GPUs ({info.get('gpu_note') or 'UUIDs not found'}): used torch.cuda"
    ]
    try:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        by_torch = {uuid_key(p.uuid): (p.name, p.total_memory / 2**30) for p in props}
        return [by_torch.get(u, (None, None)) for u in wanted], "torch", warnings
    except Exception as err:
        return [(None, None)] * len(wanted), None, [*warnings, f"torch.cuda failed too: {_describe(err)}"]


def _gib(mib: float | None) -> float | None:
    return mib / 1024 if mib is not None else None


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


# --- 3. burn-in -----------------------------------------------------------------------------------------
class BurnInModel(nn.Module):
    """Embedding, a causal stack of nn.TransformerEncoderLayer, LM head: the shape of a small LM."""

    def __init__(self, vocab_size: int, model_dim: int, num_layers: int) -> None:
        super().__init__()
        heads = model_dim // 64 if model_dim % 64 == 0 else 1
        layer = nn.TransformerEncoderLayer(
            model_dim, heads, 4 * model_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(self.embed(tokens), mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def run_burn_in_test(
    output_dir: str | Path,
    num_steps: int = 500,
    batch_size: int = FULL_MODEL.batch_size,
    model_dim: int = FULL_MODEL.model_dim,
    num_layers: int = FULL_MODEL.num_layers,
    seq_len: int = FULL_MODEL.seq_len,
    device: str | None = None,
    *,
    vocab_size: int = FULL_MODEL.vocab_size,
    energy_cfg: EnergyConfig | None = None,
    nvml: Any = None,
) -> BurnInResult:
    """Train a dummy model on random tokens (nothing is learnt) inside an EnergyWindow and check its logs.

    Writes `output_dir/energy_logs/stage_burn_in.json`. `device` None: cuda when available, else cpu.
    `energy_cfg` None: EnergyConfig() (CodeCarbon on: the only CPU figure where RAPL is unreadable).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    logs = Path(output_dir) / "energy_logs"
    logs.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shrunk = None
    if dev.type == "cpu" and model_dim * num_layers > CPU_MODEL.model_dim * CPU_MODEL.num_layers:
        # A GPU-sized burn-in (the seed's 2048 x 24 is 1.2 B parameters) would take hours and most of the
        # memory of a CPU-only machine: check the logging path with the small model instead, and say so.
        shrunk = f"no GPU: burn-in used the CPU model {_size_text(CPU_MODEL)} instead of {model_dim} x {num_layers}"
        model_dim, num_layers, seq_len, vocab_size = (
            CPU_MODEL.model_dim,
            CPU_MODEL.num_layers,
            CPU_MODEL.seq_len,
            CPU_MODEL.vocab_size,
        )
    size = ModelSize(model_dim, num_layers, seq_len, batch_size, vocab_size)
    model = BurnInModel(vocab_size, model_dim, num_layers).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BURN_IN_LR)
    mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=dev)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> torch.Tensor:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1], mask)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()  # no .item(): a sync per step would change what is being measured

    for _ in range(BURN_IN_WARMUP_STEPS):
        step()
    window = EnergyWindow(energy_cfg or EnergyConfig(), logs, BURN_IN_STAGE, nvml=nvml)
    with window:
        for _ in range(num_steps):
            loss = step()
    reading = window.reading
    assert reading is not None  # set by the window's exit, also when measuring failed
    final_loss = float(loss)
    tokens = num_steps * batch_size * seq_len
    metrics = stage_metrics(reading, tokens)
    avg_util = _utilization(window.samples, _sampler_index(dev))
    params = sum(p.numel() for p in model.parameters())
    model_info = {**dataclasses.asdict(size), "parameters": params}

    path = logs / f"stage_{BURN_IN_STAGE}.json"
    _write_json(
        path,
        {
            "stage": BURN_IN_STAGE,
            "started_at": _iso(window.started_at),
            "ended_at": _iso(window.ended_at),
            "duration_seconds": reading.duration_s,
            "device": str(dev),
            "num_steps": num_steps,
            "model": model_info,
            "tokens_processed": tokens,
            "tokens_per_second": metrics.get("tokens_per_s"),
            "gpu_energy_joules": reading.gpu_energy_j,
            "cpu_energy_joules": reading.cpu_energy_j,
            "ram_energy_joules": reading.ram_energy_j,
            "total_energy_joules": reading.total_energy_j,
            "total_energy_kwh": metrics.get("total_energy_kwh"),
            "joules_per_token": metrics.get("j_per_token"),
            "co2e_kg": reading.co2e_kg,
            "avg_gpu_utilization_pct": avg_util,
            "final_loss": final_loss if math.isfinite(final_loss) else None,
            "energy_sources": {
                "gpu": reading.gpu_source,
                "cpu": reading.cpu_source,
                "ram": reading.ram_source,
            },
            "energy_notes": reading.notes,
            "energy": reading.to_dict(),
            "metrics": metrics,
        },
    )
    if window.samples and window.started_at is not None and window.ended_at is not None:
        series = StageSeries(BURN_IN_STAGE, window.started_at, window.ended_at, window.samples)
        write_timeline_csv(series, logs / "power_timeline.csv")

    # Judge what was logged, read back from the file, not what is in memory: that is what later runs use.
    logged = _read_json(path)
    valid, warnings = _check_energy_log(logged, path)
    critical: list[str] = []
    gpu_present = _gpu_visible()
    if reading.gpu_energy_j is None:
        why = reading.notes.get("gpu", "not measured")
        if gpu_present:
            critical.append(_nvml_failure(why))
        else:
            warnings.append(
                f"GPU energy unavailable ({why}): the burn-in ran on {dev} and checks the logging path only"
            )
    if not valid and gpu_present:
        critical.append(f"energy logs invalid: {path}")
    if shrunk:
        warnings.append(shrunk)
    if reading.cpu_source == "estimated":
        warnings.append(f"CPU/RAM energy is an estimate: {reading.notes.get('cpu', 'CodeCarbon')}")
    if reading.flags:
        flagged = [f"{flag} ({_flag_note(reading.notes, flag)})" for flag in reading.flags]
        warnings.append(f"energy flags: {', '.join(flagged)}")

    expected = _expected_throughput(params, size, dev.type)
    tokens_per_s = metrics.get("tokens_per_s")
    if tokens_per_s is not None and tokens_per_s < expected["min"]:
        warnings.append(
            f"low throughput: {tokens_per_s:,.0f} tokens/s below the floor of {expected['min']:,.0f} "
            f"({FLOOR_FLOPS[dev.type]:.0e} FLOP/s plus {STEP_OVERHEAD_S[dev.type]:g} s per step on {dev.type}): "
            "device not used properly? check CUDA installation and GPU availability"
        )
    if tokens_per_s is not None and tokens_per_s > expected["max"]:
        warnings.append(
            f"implausible throughput: {tokens_per_s:,.0f} tokens/s above {expected['max']:,.0f} "
            f"({CEILING_FLOPS[dev.type]:.0e} FLOP/s): the timing misses work (unsynchronised CUDA?)"
        )
    if dev.type == "cuda" and avg_util is not None and avg_util < LOW_UTILIZATION_PCT:
        warnings.append(
            f"GPU utilisation {avg_util:.0f}% < {LOW_UTILIZATION_PCT:g}%: the GPU waits on the host "
            "(Python overhead, a model too small) or shares with another process"
        )
    if not math.isfinite(final_loss):
        warnings.append(f"loss is {final_loss}: broken numerics on {dev}")

    return BurnInResult(
        energy_logs_valid=valid,
        gpu_energy_joules=reading.gpu_energy_j,
        cpu_energy_joules=reading.cpu_energy_j,
        tokens_processed=tokens,
        tokens_per_second=tokens_per_s,
        avg_gpu_utilization_pct=avg_util,
        num_steps=num_steps,
        device=str(dev),
        warnings=warnings,
        critical_warnings=critical,
        ram_energy_joules=reading.ram_energy_j,
        duration_s=reading.duration_s,
        expected_tokens_per_second=expected,
        model=model_info,
        final_loss=final_loss if math.isfinite(final_loss) else None,
        energy_log=str(path),
    )


def _sampler_index(dev: torch.device) -> int | None:
    """Which of the measured GPUs is `dev`: the window samples every GPU of this process, in the order of
    torch_cuda_uuids, and the other GPUs of a multi-GPU machine idle through a one-device burn-in."""
    if dev.type != "cuda":
        return None
    try:
        uuids = [uuid_key(u) for u in gpu_module.torch_cuda_uuids()]
        return uuids.index(uuid_key(torch.cuda.get_device_properties(dev).uuid))
    except Exception:  # not found (a device outside the measured set): average over all of them
        return None


def _utilization(samples: list[Sample], gpu: int | None) -> float | None:
    values = [s.utilization_pct for s in samples if s.utilization_pct is not None and gpu in (None, s.gpu)]
    return sum(values) / len(values) if values else None


def _check_energy_log(logged: dict[str, Any] | None, path: Path) -> tuple[bool, list[str]]:
    """Valid: the file reads back, at least one energy component is in it, and none measured is <= 0."""
    if logged is None:
        return False, [f"energy log {path} missing or unreadable"]
    components = {c: logged.get(f"{c}_energy_joules") for c in ("gpu", "cpu", "ram")}
    measured = {c: v for c, v in components.items() if v is not None}
    if not measured:
        notes = logged.get("energy_notes", {})
        why = "; ".join(f"{c}: {notes[c]}" for c in ("gpu", "cpu") if c in notes) or "no meter"
        return False, [f"no energy component measured ({why})"]
    zero = [f"{c} {v} J" for c, v in measured.items() if v <= 0]
    if zero:
        return False, [
            f"energy logged as zero ({', '.join(zero)}): NVML may lack permission to read power "
            "(check nvidia-smi -q -d POWER)"
        ]
    return True, []


def _expected_throughput(params: int, size: ModelSize, device_type: str) -> dict[str, float]:
    """Tokens/s range: training costs ~6 FLOPs per parameter per token, plus attention's 12 L T d."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    tokens_per_step = size.batch_size * size.seq_len
    flops_per_step = (6 * params + 12 * size.num_layers * size.seq_len * size.model_dim) * tokens_per_step
    floor_s = flops_per_step / FLOOR_FLOPS[kind] + STEP_OVERHEAD_S[kind]
    return {"min": tokens_per_step / floor_s, "max": tokens_per_step * CEILING_FLOPS[kind] / flops_per_step}


def _flag_note(notes: dict[str, str], flag: str) -> str:
    key = {"below_resolution": "gpu_resolution", "counter_integration_mismatch": "gpu_cross_check"}.get(flag)
    return notes.get(key or "", "see the stage log")


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


# --- all together ---------------------------------------------------------------------------------------
def run_prerun_validation(
    output_dir: str | Path = "./prerun_validation",
    idle_duration_minutes: float = 5.0,
    burn_in_steps: int = 500,
    expected_gpu_type: str | None = None,
    expected_vram_gb: float | None = None,
    expected_gpu_count: int | None = None,
    expected_cpu: str | None = None,
    skip_idle: bool = False,
    skip_burn_in: bool = False,
    skip_sampling: bool = False,
    quick: bool = False,
    *,
    energy_cfg: EnergyConfig | None = None,
    nvml: Any = None,
) -> PrerunReport:
    """Run the checks (hardware, idle, burn-in, sampling), write prerun_validation_report.json, return it.

    quick=True replaces the durations (idle_duration_minutes and burn_in_steps are then ignored): idle
    QUICK_IDLE_MINUTES (10 s), QUICK_BURN_IN_STEPS (50) steps, QUICK_SAMPLING_DURATION_S (15 s) at
    QUICK_SAMPLING_INTERVALS_MS (100 ms, 1 s, 5 s). Otherwise sampling runs SAMPLING_DURATION_S (60 s) at
    SAMPLING_INTERVALS_MS (100 ms, 1 s, 15 s). The burn-in model is FULL_MODEL (the seed's 1024 x 12) on a
    GPU and CPU_MODEL (128 x 2) without CUDA, quick or not. A check that crashes is a critical
    finding, not an exception: the report is always written.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Quick keeps the full-size model on a GPU: 50 steps of it last ~1.4 s on an H200, so the window spans
    # enough counter updates; a smaller model finished in 0.5 s there (flagged below_resolution, 10% busy).
    size = CPU_MODEL if device == "cpu" else FULL_MODEL
    settings: dict[str, Any] = {
        "quick": quick,
        "idle_duration_minutes": QUICK_IDLE_MINUTES if quick else idle_duration_minutes,
        "idle_poll_interval_ms": IDLE_POLL_INTERVAL_MS,
        "burn_in_steps": QUICK_BURN_IN_STEPS if quick else burn_in_steps,
        "burn_in_device": device,
        "burn_in_model": dataclasses.asdict(size),
        "sampling_duration_s": QUICK_SAMPLING_DURATION_S if quick else SAMPLING_DURATION_S,
        "sampling_intervals_ms": list(QUICK_SAMPLING_INTERVALS_MS if quick else SAMPLING_INTERVALS_MS),
    }
    findings: list[tuple[str, str]] = []  # (check, critical warning)
    warnings: list[str] = []
    skips = {"idle_baseline": skip_idle, "burn_in": skip_burn_in, "sampling_validation": skip_sampling}
    skipped = [name for name, skip in skips.items() if skip]

    def attempt(name: str, check: Callable[[], Any]) -> Any:
        try:
            result = check()
        except Exception as err:  # a check that breaks must fail the gate, not hide the other checks
            findings.append((name, f"check crashed: {type(err).__name__}: {err}"))
            return None
        findings.extend((name, text) for text in result.critical_warnings)
        warnings.extend(f"{name}: {text}" for text in result.warnings)
        return result

    hardware = attempt(
        "hardware",
        lambda: validate_hardware(
            expected_gpu_type, expected_vram_gb, expected_gpu_count, expected_cpu, nvml=nvml
        ),
    )
    # Idle before any work of ours: a GPU still warm from the burn-in would read high.
    idle = None
    if not skip_idle:
        idle = attempt(
            "idle_baseline",
            lambda: measure_idle_baseline(
                settings["idle_duration_minutes"], IDLE_POLL_INTERVAL_MS, root / "idle_baseline", nvml=nvml
            ),
        )
    burn_in = None
    if not skip_burn_in:
        if device == "cpu" and not quick:
            warnings.append(f"burn_in: no CUDA device: the small CPU model ({_size_text(size)}) stands in")
        burn_in = attempt(
            "burn_in",
            lambda: run_burn_in_test(
                root / "burn_in",
                settings["burn_in_steps"],
                size.batch_size,
                size.model_dim,
                size.num_layers,
                size.seq_len,
                device,
                vocab_size=size.vocab_size,
                energy_cfg=energy_cfg,
                nvml=nvml,
            ),
        )
    sampling = None
    if not skip_sampling:
        sampling = attempt(
            "sampling_validation",
            lambda: validate_sampling_interval(
                root / "sampling_validation",
                settings["sampling_duration_s"],
                settings["sampling_intervals_ms"],
                nvml=nvml,
            ),
        )

    critical = _merge_findings(findings)
    module, _ = _nvml_module(nvml)
    report = PrerunReport(
        all_checks_passed=not critical,
        critical_warnings=critical,
        warnings=warnings,
        hardware_validation=hardware,
        idle_baseline=idle,
        burn_in=burn_in,
        sampling_validation=sampling,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment.snapshot(module),
        output_dir=str(root),
        settings=settings,
        skipped=skipped,
    )
    _write_json(root / REPORT_FILE, report.to_dict())
    return report


def quick_validation(output_dir: str | Path = "./prerun_validation", *, nvml: Any = None) -> bool:
    """run_prerun_validation(quick=True): True when no check found anything critical."""
    return run_prerun_validation(output_dir=output_dir, quick=True, nvml=nvml).all_checks_passed


def _merge_findings(findings: list[tuple[str, str]]) -> list[str]:
    # One NVML failure breaks several checks with the same message: say it once, naming them all.
    checks: dict[str, list[str]] = {}
    for check, text in findings:
        checks.setdefault(text, []).append(check)
    return [f"{', '.join(dict.fromkeys(names))}: {text}" for text, names in checks.items()]


def summary_text(report: PrerunReport) -> str:
    """A few lines for the terminal: the verdict, one line per check, then every warning."""
    lines = [f"Pre-run validation: {'PASSED' if report.all_checks_passed else 'FAILED'}"]
    hw = report.hardware_validation
    if hw is not None:
        vram = f", {hw.actual_vram_gb:.1f} GiB" if hw.actual_vram_gb is not None else ""
        lines.append(
            f"  hardware: {hw.actual_gpu_count} x {hw.actual_gpu_type or 'no GPU'}{vram}; CPU {hw.actual_cpu}"
        )
    idle = report.idle_baseline
    if idle is not None:
        if idle.gpu_avg_power_watts is None:
            lines.append("  idle baseline: not measured (no GPU)")
        else:
            std = f", std {idle.gpu_std_power_watts:.1f} W" if idle.gpu_std_power_watts is not None else ""
            lines.append(
                f"  idle baseline: {idle.gpu_avg_power_watts:.1f} W{std} over {idle.duration_s:.0f} s"
            )
    burn = report.burn_in
    if burn is not None:
        rate = f"{burn.tokens_per_second:,.0f} tokens/s" if burn.tokens_per_second else "no throughput"
        lines.append(
            f"  burn-in: {burn.num_steps} steps on {burn.device}, {rate}, "
            f"energy logs {'valid' if burn.energy_logs_valid else 'INVALID'}"
        )
    sampling = report.sampling_validation
    if sampling is not None:
        if sampling.converged is None:
            lines.append("  sampling: not validated (no GPU energy counter)")
        else:
            verdict = "converged" if sampling.converged else "NOT converged"
            lines.append(f"  sampling: {verdict}; recommended interval {sampling.recommended_interval_ms} ms")
    if report.skipped:
        lines.append(f"  skipped: {', '.join(report.skipped)}")
    lines += [f"CRITICAL: {text}" for text in report.critical_warnings]
    lines += [f"warning: {text}" for text in report.warnings]
    lines.append(f"report: {Path(report.output_dir) / REPORT_FILE}")
    return "\n".join(lines)


# --- helpers --------------------------------------------------------------------------------------------
def _nvml_module(nvml: Any) -> tuple[Any, str | None]:
    """The NVML module to use (looked up through gpu.py so tests can replace it), or (None, why)."""
    if nvml is not None:
        return nvml, None
    try:
        return gpu_module.load_nvml(), None
    except Exception as err:
        return None, f"NVML unavailable: {_describe(err)}"


def _gpu_visible() -> bool:
    """Whether this process has a CUDA device: then failing to measure it is a failure, not a CPU machine."""
    try:
        return bool(gpu_module.torch_cuda_uuids())
    except Exception:
        return False


def _nvml_failure(why: str) -> str:
    return f"NVML failure on a machine with a GPU: {why}"


def _size_text(size: ModelSize) -> str:
    return f"dim {size.model_dim}, {size.num_layers} layers, seq {size.seq_len}, vocab {size.vocab_size}"


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(value: Any) -> Any:
    # JSON keys are strings and it has no tuples or NaN: convert here so to_dict() equals the file read back.
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(data), indent=2) + "\n")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- command line ---------------------------------------------------------------------------------------

# --- as a pipeline stage ----------------------------------------------------------------------------------
STAGE = "prerun"


def run_stage(parent: ParentRun, output_dir: Path | None = None) -> tuple[StageResult, PrerunReport]:
    """Pre-run validation as the `prerun` stage: an energy-tracked child run whose idle baseline feeds the
    net energy of the stages after it. Never reused: it measures the machine as it is now."""
    cfg = parent.cfg.prerun
    params = flatten(cfg.model_dump(), "prerun.")
    outcome: dict[str, PrerunReport] = {}

    def work(ctx: StageContext) -> StageWork:
        out = Path(output_dir) if output_dir else ctx.stage_dir / "prerun_validation"
        report = run_prerun_validation(
            output_dir=str(out),
            idle_duration_minutes=cfg.idle_duration_minutes,
            burn_in_steps=cfg.burn_in_steps,
            expected_gpu_type=cfg.expected_gpu,
            expected_vram_gb=cfg.expected_vram_gb,
            expected_gpu_count=cfg.expected_gpu_count,
            expected_cpu=cfg.expected_cpu,
            skip_idle=cfg.skip_idle,
            skip_burn_in=cfg.skip_burn_in,
            skip_sampling=cfg.skip_sampling,
            quick=cfg.quick,
            energy_cfg=parent.cfg.energy,  # the pipeline's own energy settings, for the burn-in too
        )
        outcome["report"] = report
        return StageWork(
            tokens=report.burn_in.tokens_processed if report.burn_in else 0,
            outputs={"prerun_validation": out},
            fingerprints={},
            metrics=_report_metrics(report),
            details={
                "all_checks_passed": report.all_checks_passed,
                "critical_warnings": report.critical_warnings,
            },
        )

    result = execute_stage(parent, STAGE, params, work, reusable=False)
    report = outcome["report"]
    mlflow.set_tag("dist_bench.prerun.passed", str(report.all_checks_passed).lower())
    idle = report.idle_baseline
    if idle is not None and idle.idle_power_w_per_gpu is not None:
        parent.idle_power_w = idle.idle_power_w_per_gpu
        parent.idle_source = "prerun"
        mlflow.set_tag("energy.idle.source", "prerun")
    if cfg.required and not report.all_checks_passed:
        raise PrerunFailed(report)
    return result, report


def _report_metrics(report: PrerunReport) -> dict[str, float]:
    """The report's key figures (the parent shows them as prerun/<name>)."""
    figures: dict[str, float | None] = {"all_checks_passed": float(report.all_checks_passed)}
    if report.idle_baseline:
        figures["idle_gpu_avg_power_w"] = report.idle_baseline.gpu_avg_power_watts
        figures["idle_gpu_std_power_w"] = report.idle_baseline.gpu_std_power_watts
    if report.burn_in:
        figures["burn_in_tokens_per_s"] = report.burn_in.tokens_per_second
        figures["burn_in_gpu_energy_j"] = report.burn_in.gpu_energy_joules
    if report.sampling_validation:
        for interval, estimate in report.sampling_validation.estimates.items():
            figures[f"sampling_deviation_pct_{interval}ms"] = estimate.get("deviation_pct")
    return {k: float(v) for k, v in figures.items() if v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dist_bench.prerun",
        description="Pre-run validation: idle baseline, burn-in, sampling interval, hardware. "
        "Exit 0 when every check passed, 1 when one found something critical.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced durations (~10 s idle, 50 steps, 15 s)")
    parser.add_argument("--output-dir", default="./prerun_validation", help="where the report tree goes")
    parser.add_argument("--idle-duration", type=float, default=5.0, help="idle baseline minutes")
    parser.add_argument("--burn-in-steps", type=int, default=500, help="burn-in training steps")
    parser.add_argument("--expected-gpu", default=None, help="substring of the GPU name, e.g. A100")
    parser.add_argument("--expected-vram", type=float, default=None, help="minimum GiB of VRAM per GPU")
    parser.add_argument("--expected-gpu-count", type=int, default=None, help="GPUs this process must see")
    parser.add_argument("--expected-cpu", default=None, help="substring of the CPU model")
    parser.add_argument("--skip-idle", action="store_true", help="skip the idle baseline")
    parser.add_argument("--skip-burn-in", action="store_true", help="skip the burn-in test")
    parser.add_argument("--skip-sampling", action="store_true", help="skip the sampling-interval check")
    args = parser.parse_args(argv)
    report = run_prerun_validation(
        output_dir=args.output_dir,
        idle_duration_minutes=args.idle_duration,
        burn_in_steps=args.burn_in_steps,
        expected_gpu_type=args.expected_gpu,
        expected_vram_gb=args.expected_vram,
        expected_gpu_count=args.expected_gpu_count,
        expected_cpu=args.expected_cpu,
        skip_idle=args.skip_idle,
        skip_burn_in=args.skip_burn_in,
        skip_sampling=args.skip_sampling,
        quick=args.quick,
    )
    print(summary_text(report))
    return 0 if report.all_checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
