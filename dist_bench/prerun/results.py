"""Shared parts of the pre-run checks: the constants more than one check reads, the burn-in model sizes,
PrerunFailed, the result dataclasses and PrerunReport, and the NVML and JSON helpers the checks share."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bench.energy import gpu as gpu_module

# --- thresholds -------------------------------------------------------------------------------------------
# Per GPU. An H100 idles at ~70 W with no process on it, but at ~120 W once a process holds a CUDA context
# (measured 2026-11-21, docs/benchmarks.md), as this one does while measuring: 150 W leaves that alone and
# still catches real background work.
MAX_IDLE_W = 150.0
CONVERGENCE_TOLERANCE = 0.10  # the seed: estimates should agree within 10%

# --- durations ----------------------------------------------------------------------------------------------
IDLE_POLL_INTERVAL_MS = 500  # the seed's default; idle power is steady, no need for 100 ms
SAMPLING_DURATION_S = 60.0  # four periods of the seed's 15 s interval
SAMPLING_INTERVALS_MS = (100, 1000, 15000)  # the project's default, then the seed's 1 s vs 15 s


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
