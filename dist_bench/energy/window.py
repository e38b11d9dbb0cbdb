"""Energy of one stage: a context manager around its work, its figures, and their MLflow names.

    with EnergyWindow(cfg.energy, stage_dir, "logit_caching") as window:
        ...                      # window.read() at checkpoints: figures so far
    reading = window.reading     # set on exit, also when the work raised

A value that could not be measured is None and `notes[component]` says why; it is never 0. Measurement
problems never escape the window: the stage's own work decides whether the stage fails.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bench.config import EnergyConfig
from dist_bench.energy.cpu import J_PER_KWH, CodeCarbonMeter, HostEnergy
from dist_bench.energy.gpu import GpuEnergy, GpuEnergyCounter

COMPONENTS = ("gpu", "cpu", "ram", "co2e")
# Strength of each provenance; a sum of windows keeps the weakest (an unknown source counts as weakest).
SOURCE_RANK = {"unavailable": 0, "estimated": 1, "power_integration": 1, "rapl": 2, "nvml_counter": 2}


@dataclass(frozen=True)
class EnergyReading:
    """Figures of one window, or the sum of several windows (a resumed stage)."""

    duration_s: float
    gpu_energy_j: float | None = None  # None = not measured (never 0 for "unknown")
    cpu_energy_j: float | None = None
    ram_energy_j: float | None = None
    co2e_kg: float | None = None
    gpu_source: str = "unavailable"  # nvml_counter | unavailable
    cpu_source: str = "unavailable"  # rapl | estimated | unavailable
    ram_source: str = "unavailable"  # estimated | unavailable
    notes: dict[str, str] = field(default_factory=dict)  # component -> why absent / caveat
    gpus: tuple[str, ...] = ()  # measured GPUs, "name (uuid)"

    @property
    def total_energy_j(self) -> float | None:
        present = [v for v in (self.gpu_energy_j, self.cpu_energy_j, self.ram_energy_j) if v is not None]
        return sum(present) if present else None

    def __add__(self, other: EnergyReading) -> EnergyReading:
        """Sum of two windows: a component measured in only one of them is not known for the sum."""
        if not isinstance(other, EnergyReading):
            return NotImplemented
        notes = _merge_notes(self.notes, other.notes)
        values: dict[str, float | None] = {}
        for component, name in [("gpu", "gpu_energy_j"), ("cpu", "cpu_energy_j"), ("ram", "ram_energy_j")]:
            values[name] = _add_component(getattr(self, name), getattr(other, name), component, notes)
        values["co2e_kg"] = _add_component(self.co2e_kg, other.co2e_kg, "co2e", notes)
        return EnergyReading(
            duration_s=self.duration_s + other.duration_s,
            gpu_source=_weaker(self.gpu_source, other.gpu_source),
            cpu_source=_weaker(self.cpu_source, other.cpu_source),
            ram_source=_weaker(self.ram_source, other.ram_source),
            notes=notes,
            gpus=tuple(dict.fromkeys(self.gpus + other.gpus)),
            **values,  # type: ignore[arg-type]
        )

    def __radd__(self, other: object) -> EnergyReading:
        # Lets sum(readings) start from 0.
        if other == 0:
            return self
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["gpus"] = list(self.gpus)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyReading:
        # Unknown keys are ignored so a file written by a newer version (more fields) still loads.
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["gpus"] = tuple(values.get("gpus", ()))
        values["notes"] = dict(values.get("notes", {}))
        return cls(**values)


def _add_component(a: float | None, b: float | None, component: str, notes: dict[str, str]) -> float | None:
    if a is not None and b is not None:
        return a + b
    if a is not None or b is not None:
        partial = "partial: measured in only some of the summed windows"
        notes[component] = _join(partial, notes.get(component))
    return None


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


class EnergyWindow:
    """Context manager around one stage's work; `output_dir/codecarbon/` receives CodeCarbon's CSV.

    `nvml` replaces the NVML module (default pynvml), e.g. with a simulated device.
    """

    def __init__(self, cfg: EnergyConfig, output_dir: Path, name: str, *, nvml: Any = None) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.name = name
        self.reading: EnergyReading | None = None
        self.started_at: float | None = None  # epoch seconds, for the stage's start/end timestamps
        self.ended_at: float | None = None
        self._gpu = GpuEnergyCounter(nvml) if cfg.enabled else None
        uses_codecarbon = cfg.enabled and cfg.codecarbon
        self._host = CodeCarbonMeter(cfg.country_iso_code, self.output_dir, name) if uses_codecarbon else None
        self._t0: float | None = None

    def __enter__(self) -> EnergyWindow:
        # CodeCarbon first: its hardware setup takes a second or so and must not count as the stage's work.
        if self._host:
            self._host.start()
        if self._gpu:
            self._gpu.start()
        self.started_at = time.time()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            gpu = self._gpu.stop() if self._gpu else None
            duration = self._elapsed()  # after the GPU synchronised: queued kernels are part of the work
            host = self._host.stop() if self._host else None
            self.reading = self._combine(duration, gpu, host)
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
        return self._combine(self._elapsed(), gpu, host)

    def _combine(self, duration: float, gpu: GpuEnergy | None, host: HostEnergy | None) -> EnergyReading:
        if not self.cfg.enabled:
            return EnergyReading(duration_s=duration, notes=dict.fromkeys(COMPONENTS, "energy.enabled=false"))
        notes: dict[str, str] = {}
        if gpu is not None and gpu.note:
            notes["gpu"] = gpu.note
        if host is None:
            host = HostEnergy(note="energy.codecarbon=false")
        if host.note:
            notes["cpu"] = notes["ram"] = host.note
        reading = EnergyReading(
            duration_s=duration,
            gpu_energy_j=gpu.energy_j if gpu else None,
            cpu_energy_j=host.cpu_energy_j,
            ram_energy_j=host.ram_energy_j,
            gpu_source="nvml_counter" if gpu and gpu.energy_j is not None else "unavailable",
            cpu_source=host.source,
            ram_source=host.source if host.ram_energy_j is not None else "unavailable",
            notes=notes,
            gpus=gpu.gpus if gpu else (),
        )
        return self._with_co2e(reading)

    def _with_co2e(self, reading: EnergyReading) -> EnergyReading:
        """CO2e of all the energy measured, at the grid intensity CodeCarbon uses for the country."""
        notes = dict(reading.notes)
        grid = self._host.grid if self._host else None
        total = reading.total_energy_j
        if self._host is None:
            notes["co2e"] = "energy.codecarbon=false"
        elif grid is None:
            notes["co2e"] = self._host.grid_note or "no grid carbon intensity"
        elif total is None:
            notes["co2e"] = "no energy measured"
        else:
            values = (reading.gpu_energy_j, reading.cpu_energy_j, reading.ram_energy_j)
            measured = "+".join(
                c for c, v in zip(("gpu", "cpu", "ram"), values, strict=True) if v is not None
            )
            notes["co2e"] = f"{grid.description} applied to {measured} energy"
            return dataclasses.replace(reading, co2e_kg=total / J_PER_KWH * grid.kg_per_kwh, notes=notes)
        return dataclasses.replace(reading, notes=notes)


def stage_metrics(reading: EnergyReading, tokens: int) -> dict[str, float]:
    """MLflow metrics of a stage (DESIGN.md names). An absent value is omitted, never logged as 0."""
    metrics: dict[str, float] = {"duration_s": reading.duration_s, "tokens": float(tokens)}
    if tokens > 0 and reading.duration_s > 0:
        metrics["tokens_per_s"] = tokens / reading.duration_s
    for name in ("gpu_energy_j", "cpu_energy_j", "ram_energy_j", "co2e_kg"):
        value = getattr(reading, name)
        if value is not None:
            metrics[name] = value
    total = reading.total_energy_j
    if total is not None:
        metrics["total_energy_j"] = total
        metrics["total_energy_kwh"] = total / J_PER_KWH
        if tokens > 0:
            metrics["j_per_token"] = total / tokens
    return metrics


def stage_tags(reading: EnergyReading) -> dict[str, str]:
    """Provenance tags: energy.<component>.source, and energy.<component>.note for every note."""
    tags = {
        "energy.gpu.source": reading.gpu_source,
        "energy.cpu.source": reading.cpu_source,
        "energy.ram.source": reading.ram_source,
    }
    tags.update({f"energy.{component}.note": text for component, text in reading.notes.items()})
    return tags
