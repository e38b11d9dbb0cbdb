"""Energy of one stage: a context manager around its work, its figures, and their MLflow names.

    with EnergyWindow(cfg.energy, stage_dir, "logit_caching") as window:
        ...                      # window.read() at checkpoints: figures so far
    reading = window.reading     # set on exit, also when the work raised

GPU energy is the difference of NVML's energy counter over the window (CUDA synchronised at the two
boundaries only). A sampler thread polls instant power, memory, utilisation, temperature and SM clock
every `energy.sample_interval_ms` for the timeline, peaks, VRAM and a cross-check: integrating the samples
must agree with the counter within 5% on windows of 10 s or more, else the reading is flagged. GPUs
without the counter (pre-Volta) fall back to that integration, labelled `power_integration`. CPU/RAM come
from RAPL when readable, else CodeCarbon's estimate (`estimated`).

A value that could not be measured is None and `notes[component]` says why; it is never 0. Measurement
problems never escape the window: the stage's own work decides whether the stage fails.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bench.config import EnergyConfig
from dist_bench.energy import rapl
from dist_bench.energy.cpu import J_PER_KWH, CodeCarbonMeter, GridIntensity, HostEnergy, grid_intensity
from dist_bench.energy.distributed import align_ranks, combine_ranks
from dist_bench.energy.gpu import GpuEnergy, GpuEnergyCounter
from dist_bench.energy.sampler import PowerSampler, Sample, integrate_energy_j, power_stats, vram_stats

COMPONENTS = ("gpu", "cpu", "ram", "co2e")
# Strength of each provenance; a sum of windows keeps the weakest (an unknown source counts as weakest).
SOURCE_RANK = {"unavailable": 0, "estimated": 1, "power_integration": 1, "rapl": 2, "nvml_counter": 2}
SENSOR_ACCURACY = 0.05  # NVML's documented power accuracy on recent GPUs: +-5%
COUNTER_UPDATE_S = 0.1  # the counter advances about every 100 ms (shared/measurements/README.md)
CROSS_CHECK_TOLERANCE = 0.05
CROSS_CHECK_MIN_S = 10.0  # shorter windows hold too few samples for the comparison to mean anything
RESOLUTION_S = 1.0  # below this a window spans a handful of counter updates: flagged, not precise


@dataclass(frozen=True)
class EnergyReading:
    """Figures of one window, or the sum of several windows (a resumed stage)."""

    duration_s: float
    gpu_energy_j: float | None = None  # None = not measured (never 0 for "unknown")
    cpu_energy_j: float | None = None
    ram_energy_j: float | None = None
    co2e_kg: float | None = None
    gpu_source: str = "unavailable"  # nvml_counter | power_integration | unavailable
    cpu_source: str = "unavailable"  # rapl | estimated | unavailable
    ram_source: str = "unavailable"  # rapl | estimated | unavailable
    notes: dict[str, str] = field(default_factory=dict)  # component -> why absent / caveat
    gpus: tuple[str, ...] = ()  # measured GPUs, "name (uuid)"
    per_gpu_j: dict[str, float] = field(default_factory=dict)  # uuid -> joules (ranks count a GPU once)
    gpu_integrated_j: float | None = None  # the sampler's cross-check of gpu_energy_j
    gpu_uncertainty_j: float | None = None  # half-width of the interval around gpu_energy_j
    avg_power_w: float | None = None  # GPU power, summed over the measured GPUs, time-weighted
    peak_power_w: float | None = None
    vram_peak_mb: float | None = None  # NVML memory used, summed over GPUs
    vram_avg_mb: float | None = None
    torch_vram_peak_mb: float | None = None  # torch's allocator peak: what tensors needed
    torch_vram_avg_mb: float | None = None  # torch's allocator, time-weighted over the samples
    idle_power_w: float | None = None  # idle draw of the measured GPUs, for net energy
    idle_source: str = "none"  # config | prerun | measured | none
    warmup_s: float = 0.0
    warmup_energy_j: float | None = None  # total energy in the first warmup_s seconds
    power_method: str | None = None  # instant | average: which NVML power reading the sampler used
    flags: tuple[str, ...] = ()  # below_resolution, counter_integration_mismatch

    @property
    def total_energy_j(self) -> float | None:
        present = [v for v in (self.gpu_energy_j, self.cpu_energy_j, self.ram_energy_j) if v is not None]
        return sum(present) if present else None

    @property
    def net_energy_j(self) -> float | None:
        """Total minus what the GPUs would have drawn idle over the same time."""
        total = self.total_energy_j
        if total is None or self.idle_power_w is None or self.gpu_energy_j is None:
            return None
        return total - self.idle_power_w * self.duration_s

    def __add__(self, other: EnergyReading) -> EnergyReading:
        """Sum of two windows: a component measured in only one of them is not known for the sum."""
        if not isinstance(other, EnergyReading):
            return NotImplemented
        notes = _merge_notes(self.notes, other.notes)
        values: dict[str, Any] = {}
        for component, name in [("gpu", "gpu_energy_j"), ("cpu", "cpu_energy_j"), ("ram", "ram_energy_j")]:
            values[name] = _add_component(getattr(self, name), getattr(other, name), component, notes)
        values["co2e_kg"] = _add_component(self.co2e_kg, other.co2e_kg, "co2e", notes)
        for name in ("gpu_integrated_j", "gpu_uncertainty_j"):  # errors of parts add up (conservative)
            values[name] = _add_component(getattr(self, name), getattr(other, name), "gpu", notes)
        duration = self.duration_s + other.duration_s
        return EnergyReading(
            duration_s=duration,
            gpu_source=_weaker(self.gpu_source, other.gpu_source),
            cpu_source=_weaker(self.cpu_source, other.cpu_source),
            ram_source=_weaker(self.ram_source, other.ram_source),
            notes=notes,
            gpus=tuple(dict.fromkeys(self.gpus + other.gpus)),
            per_gpu_j=_sum_dicts(self.per_gpu_j, other.per_gpu_j),
            avg_power_w=_weighted(self.avg_power_w, self.duration_s, other.avg_power_w, other.duration_s),
            peak_power_w=_max(self.peak_power_w, other.peak_power_w),
            vram_peak_mb=_max(self.vram_peak_mb, other.vram_peak_mb),
            vram_avg_mb=_weighted(self.vram_avg_mb, self.duration_s, other.vram_avg_mb, other.duration_s),
            torch_vram_peak_mb=_max(self.torch_vram_peak_mb, other.torch_vram_peak_mb),
            torch_vram_avg_mb=_weighted(
                self.torch_vram_avg_mb, self.duration_s, other.torch_vram_avg_mb, other.duration_s
            ),
            idle_power_w=self.idle_power_w if self.idle_power_w is not None else other.idle_power_w,
            idle_source=self.idle_source if self.idle_power_w is not None else other.idle_source,
            warmup_s=self.warmup_s,  # the warmup is the first attempt's
            warmup_energy_j=self.warmup_energy_j,
            power_method=self.power_method or other.power_method,
            flags=tuple(dict.fromkeys(self.flags + other.flags)),
            **values,
        )

    def __radd__(self, other: object) -> EnergyReading:
        # Lets sum(readings) start from 0.
        if other == 0:
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gpus"] = list(self.gpus)
        data["flags"] = list(self.flags)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyReading:
        # Unknown keys are ignored so a file written by a newer version (more fields) still loads.
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["gpus"] = tuple(values.get("gpus", ()))
        values["flags"] = tuple(values.get("flags", ()))
        values["notes"] = dict(values.get("notes", {}))
        values["per_gpu_j"] = dict(values.get("per_gpu_j", {}))
        return cls(**values)


class EnergyWindow:
    """Context manager around one stage's work; `output_dir/codecarbon/` receives CodeCarbon's CSV.

    `nvml` replaces the NVML module (default pynvml), e.g. with a simulated device; `idle_power_w` and
    `idle_source` come from the pipeline (prerun baseline, config or a short measurement).
    """

    def __init__(
        self,
        cfg: EnergyConfig,
        output_dir: Path,
        name: str,
        *,
        nvml: Any = None,
        idle_power_w: float | None = None,
        idle_source: str = "none",
        rapl_root: Path = rapl.DEFAULT_ROOT,
        gpu_unmeasured: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.name = name
        self.reading: EnergyReading | None = None
        self.started_at: float | None = None  # epoch seconds, for the stage's start/end timestamps
        self.ended_at: float | None = None
        self.samples: list[Sample] = []  # the power timeline, after exit
        self._idle = (idle_power_w, idle_source)
        # gpu_unmeasured: why this stage's GPU work cannot be measured here (a remote teacher); the
        # local GPUs are then not counted either, since they are not where the work runs
        self._gpu_unmeasured = gpu_unmeasured
        self._gpu = (
            GpuEnergyCounter(nvml, nvml_indices=cfg.gpu_devices)
            if cfg.enabled and gpu_unmeasured is None
            else None
        )
        self._sampler: PowerSampler | None = None
        self._host: rapl.RaplMeter | CodeCarbonMeter | None = None
        self._host_note: str | None = None
        self._estimate_caveat: str | None = None
        self._grid: GridIntensity | None = None
        self._grid_note: str | None = None
        if cfg.enabled:
            self._choose_host_meter(rapl_root)
        self._t0: float | None = None
        self._warmup_timer: threading.Timer | None = None
        self._warmup_reading: EnergyReading | None = None

    def _choose_host_meter(self, rapl_root: Path) -> None:
        usable, why_not = rapl.available(rapl_root)
        if usable:
            self._host = rapl.RaplMeter(rapl_root)
        elif self.cfg.codecarbon:
            self._host = CodeCarbonMeter(self.cfg.country_iso_code, self.output_dir, self.name)
            self._estimate_caveat = f"CodeCarbon estimate ({why_not})"
        else:
            self._host_note = f"{why_not}; energy.codecarbon=false"

    def __enter__(self) -> EnergyWindow:
        # Host meter first: CodeCarbon's hardware set-up takes a second or so and is not the stage's work.
        if self._host:
            self._host.start()
        if self.cfg.enabled and self.cfg.codecarbon:
            try:
                self._grid = grid_intensity(self.cfg.country_iso_code)
            except Exception as err:
                self._grid_note = f"no grid carbon intensity for {self.cfg.country_iso_code}: {err}"
        align_ranks()  # every rank's GPU counters start at the same instant
        if self._gpu:
            self._gpu.start()
            nvml, handles, names = self._gpu.devices
            if handles:
                self._sampler = PowerSampler(
                    nvml, handles, list(names), self.cfg.sample_interval_ms / 1000, self._gpu.torch_indices
                )
                self._sampler.start()
            _reset_torch_peak()
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        if self.cfg.enabled and self.cfg.warmup_s > 0:
            self._warmup_timer = threading.Timer(self.cfg.warmup_s, self._snapshot_warmup)
            self._warmup_timer.daemon = True
            self._warmup_timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._warmup_timer:
                self._warmup_timer.cancel()
            if exc[0] is None:  # after a failure the launcher stops the job: no rank waits for the others
                align_ranks()  # ... and stop together: a rank done first still holds its GPU for the stage
            gpu = self._gpu.stop() if self._gpu else None
            duration = self._elapsed()  # after the GPU synchronised: queued kernels are part of the work
            self.samples = self._sampler.stop() if self._sampler else []
            host = self._host.stop() if self._host else None
            reading = self._combine(duration, gpu, host, final=True)
            # Under torchrun/accelerate every rank gets here; rank 0 ends up with the whole stage's figure.
            combined = combine_ranks(reading)
            self.reading = reading if combined is reading else self.with_co2e(combined)
        except Exception as err:  # a bug in measuring must not turn finished work into a failed stage
            why = f"energy measurement failed: {type(err).__name__}: {err}"
            self.reading = EnergyReading(duration_s=self._elapsed(), notes=dict.fromkeys(COMPONENTS, why))
        self.ended_at = time.time()

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0 if self._t0 is not None else 0.0

    def read(self) -> EnergyReading:
        """Figures so far (cheap: no synchronisation, no measurement); the final reading after exit."""
        if self.reading is not None:
            return self.reading
        if self._t0 is None:
            raise RuntimeError(f"EnergyWindow({self.name!r}).read() called before the window was entered")
        gpu = self._gpu.read() if self._gpu else None
        host = self._host.read() if self._host else None
        return self._combine(self._elapsed(), gpu, host, final=False)

    def _snapshot_warmup(self) -> None:
        try:
            self._warmup_reading = self.read()
        except Exception:  # the timer thread must not die noisily; no warmup figure then
            self._warmup_reading = None

    def _combine(
        self, duration: float, gpu: GpuEnergy | None, host: HostEnergy | None, final: bool
    ) -> EnergyReading:
        if not self.cfg.enabled:
            return EnergyReading(duration_s=duration, notes=dict.fromkeys(COMPONENTS, "energy.enabled=false"))
        notes: dict[str, str] = {}
        if host is None:
            host = HostEnergy(note=self._host_note or "no CPU/RAM meter")
        for component, value in (("cpu", host.cpu_energy_j), ("ram", host.ram_energy_j)):
            if value is None and host.note:
                notes[component] = host.note
            elif value is not None and self._estimate_caveat:
                notes[component] = self._estimate_caveat  # why an estimate and not a measurement
        reading = EnergyReading(
            duration_s=duration,
            cpu_energy_j=host.cpu_energy_j,
            ram_energy_j=host.ram_energy_j,
            cpu_source=host.source,
            ram_source=host.source if host.ram_energy_j is not None else "unavailable",
            notes=notes,
            idle_power_w=self._idle_total_w(gpu),
            idle_source=self._idle[1],
            warmup_s=self.cfg.warmup_s,
        )
        reading = self._with_gpu(reading, gpu, final)
        if final:
            reading = self._with_warmup(reading)
        return self.with_co2e(reading)

    def _with_gpu(self, reading: EnergyReading, gpu: GpuEnergy | None, final: bool) -> EnergyReading:
        """Counter energy, and (at the end) what the sampler adds: integration, power, VRAM, flags."""
        notes = dict(reading.notes)
        samples = self.samples if final else []
        gpu_indices = sorted({s.gpu for s in samples})
        integrated = sum(integrate_energy_j(samples, g) for g in gpu_indices) if gpu_indices else None
        energy, source = (
            (gpu.energy_j, "nvml_counter") if gpu and gpu.energy_j is not None else (None, "unavailable")
        )
        if (
            energy is None
            and integrated is not None
            and gpu is not None
            and "counter unavailable" in (gpu.note or "")
        ):
            energy, source = integrated, "power_integration"  # pre-Volta: no counter, integration is all
        if gpu is not None and gpu.note and source != "power_integration":
            notes["gpu"] = gpu.note
        if self._gpu_unmeasured:
            notes["gpu"] = self._gpu_unmeasured
        if self._sampler is not None and self._sampler.notes:
            notes["gpu_sampler"] = "; ".join(self._sampler.notes.values())
        flags: list[str] = []
        if energy is not None and reading.duration_s < RESOLUTION_S:
            flags.append("below_resolution")
            notes["gpu_resolution"] = (
                f"window of {reading.duration_s:.2f} s spans few counter updates (~{COUNTER_UPDATE_S:.1f} s each)"
            )
        if (
            source == "nvml_counter" and integrated is not None and energy
            and reading.duration_s >= CROSS_CHECK_MIN_S
            and abs(integrated - energy) / energy > CROSS_CHECK_TOLERANCE
        ):  # fmt: skip
            flags.append("counter_integration_mismatch")
            notes["gpu_cross_check"] = (
                f"counter {energy:.1f} J vs integrated power {integrated:.1f} J ({(integrated / energy - 1):+.1%})"
            )
        stats = [power_stats(samples, g) for g in gpu_indices]
        vram = [_or_none(vram_stats, samples, g) for g in gpu_indices]
        vram = [v for v in vram if v is not None] if all(v is not None for v in vram) else []
        torch_vram = [_or_none(vram_stats, samples, g, "torch_allocated_mb") for g in gpu_indices]
        torch_avg = sum(v[1] for v in torch_vram if v) if torch_vram and all(torch_vram) else None
        return dataclasses.replace(
            reading,
            gpu_energy_j=energy,
            gpu_source=source,
            gpus=gpu.gpus if gpu else (),
            per_gpu_j=dict(gpu.per_gpu_j) if gpu and source == "nvml_counter" else {},
            gpu_integrated_j=integrated,
            gpu_uncertainty_j=_uncertainty(energy, integrated, reading.duration_s)
            if energy is not None
            else None,
            avg_power_w=sum(a for a, _ in stats) if stats else None,
            # Peaks of different GPUs need not coincide: the sum of peaks bounds the peak of the sum.
            peak_power_w=sum(p for _, p in stats) if stats else None,
            vram_peak_mb=sum(p for p, _ in vram) if vram else None,
            vram_avg_mb=sum(a for _, a in vram) if vram else None,
            torch_vram_peak_mb=_torch_peak_mb() if final else None,
            torch_vram_avg_mb=torch_avg,
            power_method=self._sampler.power_method if self._sampler else None,
            notes=notes,
            flags=tuple(flags),
        )

    def _with_warmup(self, reading: EnergyReading) -> EnergyReading:
        if self.cfg.warmup_s <= 0:
            return reading
        if self._warmup_reading is None or reading.duration_s <= self.cfg.warmup_s:
            notes = {**reading.notes, "warmup": f"stage shorter than energy.warmup_s={self.cfg.warmup_s:g}"}
            return dataclasses.replace(reading, notes=notes)
        return dataclasses.replace(reading, warmup_energy_j=self._warmup_reading.total_energy_j)

    def _idle_total_w(self, gpu: GpuEnergy | None) -> float | None:
        per_gpu, _ = self._idle
        if per_gpu is None or gpu is None or not gpu.gpus:
            return None
        return per_gpu * len(gpu.gpus)

    def with_co2e(self, reading: EnergyReading) -> EnergyReading:
        """CO2e of all the energy measured, at the grid intensity CodeCarbon uses for the country."""
        notes = dict(reading.notes)
        total = reading.total_energy_j
        if not self.cfg.codecarbon:
            notes["co2e"] = "energy.codecarbon=false (CodeCarbon's grid data gives the carbon intensity)"
        elif self._grid is None:
            notes["co2e"] = self._grid_note or "no grid carbon intensity"
        elif total is None:
            notes["co2e"] = "no energy measured"
        else:
            values = (reading.gpu_energy_j, reading.cpu_energy_j, reading.ram_energy_j)
            measured = "+".join(
                c for c, v in zip(("gpu", "cpu", "ram"), values, strict=True) if v is not None
            )
            notes["co2e"] = f"{self._grid.description} applied to {measured} energy"
            return dataclasses.replace(
                reading, co2e_kg=total / J_PER_KWH * self._grid.kg_per_kwh, notes=notes
            )
        return dataclasses.replace(reading, notes=notes)


def _or_none(stat: Any, samples: list[Sample], gpu: int, *metric: str) -> tuple[float, float] | None:
    """A GPU that never reported memory has no VRAM figure (the stats raise rather than return 0)."""
    try:
        return stat(samples, gpu, *metric)
    except ValueError:
        return None


def _uncertainty(energy: float, integrated: float | None, duration: float) -> float:
    """Half-width of the GPU energy interval: counter time resolution at both boundaries (the counter is
    up to one update stale at each read), the sensor's documented +-5%, and the counter-vs-integration gap.
    Added linearly: the terms are not independent, and an interval too wide beats one too narrow."""
    power = energy / duration if duration > 0 else 0.0
    resolution = 2 * COUNTER_UPDATE_S * power
    gap = abs(integrated - energy) if integrated is not None else 0.0
    return resolution + SENSOR_ACCURACY * energy + gap


def _reset_torch_peak() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # a measurement aid only
        pass


def _torch_peak_mb() -> float | None:
    try:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        return sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    except Exception:
        return None


def _add_component(a: float | None, b: float | None, component: str, notes: dict[str, str]) -> float | None:
    if a is not None and b is not None:
        return a + b
    if a is not None or b is not None:
        partial = "partial: measured in only some of the summed windows"
        notes[component] = _join(partial, notes.get(component))
    return None


def _weighted(a: float | None, wa: float, b: float | None, wb: float) -> float | None:
    if a is None or b is None or wa + wb <= 0:
        return a if b is None else b if a is None else None
    return (a * wa + b * wb) / (wa + wb)


def _sum_dicts(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {key: a.get(key, 0.0) + b.get(key, 0.0) for key in dict.fromkeys([*a, *b])}


def _max(a: float | None, b: float | None) -> float | None:
    present = [v for v in (a, b) if v is not None]
    return max(present) if present else None


def _merge_notes(a: dict[str, str], b: dict[str, str]) -> dict[str, str]:
    return {key: _join(a.get(key), b.get(key)) for key in dict.fromkeys([*a, *b])}


def _join(*texts: str | None) -> str:
    parts: list[str] = []
    for text in texts:
        for part in (text or "").split("; "):
            if part and part not in parts:
                parts.append(part)
    return "; ".join(parts)


def _weaker(a: str, b: str) -> str:
    return a if a == b else min(a, b, key=lambda source: SOURCE_RANK.get(source, -1))


def stage_metrics(reading: EnergyReading, tokens: int) -> dict[str, float]:
    """MLflow metrics of a stage (DESIGN.md names). An absent value is omitted, never logged as 0."""
    metrics: dict[str, float] = {"duration_s": reading.duration_s, "tokens": float(tokens)}
    if tokens > 0 and reading.duration_s > 0:
        metrics["tokens_per_s"] = tokens / reading.duration_s
    optional = {
        "gpu_energy_j": reading.gpu_energy_j,
        "cpu_energy_j": reading.cpu_energy_j,
        "ram_energy_j": reading.ram_energy_j,
        "co2e_kg": reading.co2e_kg,
        "gpu_energy_integrated_j": reading.gpu_integrated_j,
        "gpu_energy_uncertainty_j": reading.gpu_uncertainty_j,
        "avg_power_w": reading.avg_power_w,
        "peak_power_w": reading.peak_power_w,
        "vram_peak_mb": reading.vram_peak_mb,
        "vram_avg_mb": reading.vram_avg_mb,
        "torch_vram_peak_mb": reading.torch_vram_peak_mb,
        "torch_vram_avg_mb": reading.torch_vram_avg_mb,
        "idle_power_w": reading.idle_power_w,
        "net_energy_j": reading.net_energy_j,
        "warmup_energy_j": reading.warmup_energy_j,
    }
    metrics.update({name: value for name, value in optional.items() if value is not None})
    total = reading.total_energy_j
    if total is not None:
        metrics["total_energy_j"] = total
        metrics["total_energy_kwh"] = total / J_PER_KWH
        if tokens > 0:
            metrics["j_per_token"] = total / tokens
            metrics["energy_per_10k_tokens_j"] = total / tokens * 10_000
    if reading.warmup_energy_j is not None and total is not None:
        metrics["warmup_s"] = reading.warmup_s
        metrics["post_warmup_energy_j"] = total - reading.warmup_energy_j
    return metrics


def stage_tags(reading: EnergyReading) -> dict[str, str]:
    """Provenance tags: energy.<component>.source, energy.<component>.note, power method, idle source, flags."""
    tags = {
        "energy.gpu.source": reading.gpu_source,
        "energy.cpu.source": reading.cpu_source,
        "energy.ram.source": reading.ram_source,
        "energy.idle.source": reading.idle_source,
    }
    if reading.power_method:
        tags["energy.gpu.power_method"] = reading.power_method
    if reading.flags:
        tags["energy.flags"] = ",".join(reading.flags)
    if reading.gpu_energy_j is not None and reading.net_energy_j is None:
        tags["energy.net.note"] = (
            "no idle baseline: set energy.idle_power_w or energy.idle_measure_s, or run prerun"
        )
    tags.update({f"energy.{component}.note": text for component, text in reading.notes.items()})
    return tags
