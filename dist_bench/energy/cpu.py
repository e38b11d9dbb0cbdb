"""CPU and RAM energy of one window, and the grid's carbon intensity, from CodeCarbon's offline tracker.

Without RAPL (absent on the machines this project targets) CodeCarbon can only estimate: CPU power from
system-wide load and the CPU's TDP, RAM power from its size. Both are labelled "estimated".

CO2e: CodeCarbon's own `emissions` covers only the energy it tracked (CPU and RAM here: its GPU tracking is
off because the NVML counter measures the GPUs better), so the window applies the same grid intensity,
from CodeCarbon's offline data for `energy.country_iso_code`, to all the energy it measured.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

J_PER_KWH = 3.6e6
SOURCE = (
    "estimated"  # CodeCarbon's figures here are always estimates; measured RAPL figures come from rapl.py
)

_LOG = logging.getLogger("codecarbon")


@dataclass(frozen=True)
class HostEnergy:
    """CPU/RAM figures of a window so far; None = not measured and `note` says why."""

    cpu_energy_j: float | None = None
    ram_energy_j: float | None = None
    note: str | None = None

    @property
    def source(self) -> str:
        return SOURCE if self.cpu_energy_j is not None else "unavailable"


@dataclass(frozen=True)
class GridIntensity:
    kg_per_kwh: float
    description: str  # provenance, e.g. "USA grid 369 gCO2e/kWh (CodeCarbon offline data)"


class _Recorder(logging.Handler):
    """Keeps CodeCarbon's log records instead of printing them: failures reach the user as notes."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: deque[tuple[int, logging.LogRecord]] = deque(maxlen=100)
        self._seq = itertools.count(1)
        self.last = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.last = next(self._seq)
        self.records.append((self.last, record))

    def problem_since(self, mark: int) -> str:
        """The clearest reason among records after `mark`: a swallowed exception, else the last error."""
        new = [r for seq, r in self.records if seq > mark]
        for record in reversed(new):
            if record.exc_info and record.exc_info[1] is not None:
                err = record.exc_info[1]
                return f"{type(err).__name__}: {err}"
        errors = [r for r in new if r.levelno >= logging.ERROR]
        return errors[-1].getMessage() if errors else "no reason logged by CodeCarbon"


_RECORDER = _Recorder()


def _quiet_codecarbon() -> None:
    """Route CodeCarbon's logger to the recorder only.

    Every tracker constructor re-adds a stderr handler, so this runs after each construction. WARNING, not
    ERROR: CodeCarbon's start()/stop() swallow exceptions and log them at WARNING, and we want the reason.
    """
    _LOG.handlers = [_RECORDER]
    _LOG.propagate = False
    _LOG.setLevel(logging.WARNING)


class CodeCarbonMeter:
    """One OfflineEmissionsTracker around a window; never raises: failures become notes."""

    def __init__(self, country_iso_code: str, output_dir: Path, project_name: str) -> None:
        self.country_iso_code = country_iso_code
        self.output_dir = Path(output_dir)
        self.project_name = project_name
        self._tracker: Any = None
        self._note: str | None = "CodeCarbon not started"

    def start(self) -> None:
        self._note = self._start_tracker()

    def read(self) -> HostEnergy:
        """Figures so far: CodeCarbon's running totals (cheap, no measurement on this thread)."""
        if self._note is not None:
            return HostEnergy(note=self._note)
        totals = _running_totals_j(self._tracker)
        if totals is None:
            return HostEnergy(note="CodeCarbon is not running")
        return HostEnergy(*totals)

    def stop(self) -> HostEnergy:
        if self._note is not None:
            return HostEnergy(note=self._note)
        mark = _RECORDER.last
        try:
            self._tracker.stop()
        except Exception as err:  # stop() swallows its own errors; this is for anything it lets through
            return HostEnergy(note=f"CodeCarbon stop failed: {type(err).__name__}: {err}")
        finally:
            _quiet_codecarbon()
        final = getattr(self._tracker, "final_emissions_data", None)
        if final is None:
            return HostEnergy(note=f"CodeCarbon stop failed: {_RECORDER.problem_since(mark)}")
        return HostEnergy(final.cpu_energy * J_PER_KWH, final.ram_energy * J_PER_KWH)

    def _start_tracker(self) -> str | None:
        """Start the tracker; the reason it could not start, or None."""
        mark = _RECORDER.last
        try:
            from codecarbon import OfflineEmissionsTracker

            out = self.output_dir / "codecarbon"
            out.mkdir(parents=True, exist_ok=True)
            _quiet_codecarbon()
            self._tracker = OfflineEmissionsTracker(
                country_iso_code=self.country_iso_code,
                output_dir=str(out),
                project_name=self.project_name,
                log_level="error",
                allow_multiple_runs=True,  # concurrent runs would otherwise collide on its lock file
                **_csv_output(),
                # CodeCarbon has no switch for GPU tracking; an empty id list makes it count no GPU.
                gpu_ids=[],
            )
            _quiet_codecarbon()
            self._tracker.start()
        except Exception as err:
            return f"CodeCarbon failed to start: {type(err).__name__}: {err}"
        finally:
            _quiet_codecarbon()
        if _running_totals_j(self._tracker) is None:  # start() logs and swallows its exceptions
            return f"CodeCarbon failed to start: {_RECORDER.problem_since(mark)}"
        return None


def _csv_output() -> dict[str, Any]:
    """CodeCarbon's CSV file as its only output."""
    # codecarbon 3.3 deprecated save_to_file (with a warning) for output_methods, which older 3.x lack.
    try:
        from codecarbon import OutputMethod
    except ImportError:
        return {"save_to_file": True}
    return {"output_methods": [OutputMethod.CSV]}


def grid_intensity(country_iso_code: str) -> GridIntensity:
    """kg CO2e per kWh for a country, from the data CodeCarbon's offline tracker uses."""
    from codecarbon.core.emissions import Emissions
    from codecarbon.core.units import Energy
    from codecarbon.external.geography import GeoMetadata
    from codecarbon.input import DataSource

    data = DataSource()
    code = country_iso_code.upper()
    kg = Emissions(data).get_private_infra_emissions(Energy(kWh=1.0), GeoMetadata(country_iso_code=code))
    known = code in data.get_global_energy_mix_data()
    where = f"{code} grid" if known else f"world average (no CodeCarbon data for {code})"
    return GridIntensity(kg, f"{where} {kg * 1000:.0f} gCO2e/kWh (CodeCarbon offline data)")


def _running_totals_j(tracker: Any) -> tuple[float, float] | None:
    """CPU and RAM joules since start() from CodeCarbon's private running totals; None if not running.

    CodeCarbon 3.3 has no public "figures so far": flush() measures on the caller's thread (racing its
    scheduler thread, which can count the same interval twice) and appends a CSV row; stop_task() pauses the
    scheduler. Its scheduler adds to these totals every measure_power_secs (15 s); the time since its last
    measurement is extrapolated at the power it last measured (so a figure read while the load falls can
    exceed what stop() later reports for the same span: an estimate, not a counter). Private attributes of codecarbon 3.3's
    BaseEmissionsTracker: if they change, this reads as "not available" rather than crashing.
    """
    try:
        if tracker._start_time is None:
            return None
        since_h = (time.perf_counter() - tracker._last_measured_time) / 3600
        cpu_kwh = tracker._total_cpu_energy.kWh + tracker._cpu_power.kW * since_h
        ram_kwh = tracker._total_ram_energy.kWh + tracker._ram_power.kW * since_h
    except (AttributeError, TypeError):
        return None
    return cpu_kwh * J_PER_KWH, ram_kwh * J_PER_KWH
