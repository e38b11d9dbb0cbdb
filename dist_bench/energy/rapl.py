"""CPU package and DRAM energy of one window from RAPL counters, read through Linux's powercap interface.

Layout (`/sys/class/powercap`, every zone and subzone listed there as a symlink; each zone also holds its
subzones as directories):

    intel-rapl:0      name "package-0"   counted as CPU (it already includes its core/uncore subzones)
    intel-rapl:0:0    name "core"        not counted: part of package-0
    intel-rapl:0:1    name "dram"        counted as RAM
    intel-rapl:1      name "psys"        not counted: the whole platform, overlapping everything else

AMD exposes the same tree under `intel-rapl` names on recent kernels, sometimes under `amd-rapl`: both are
read. `intel-rapl-mmio:*` is the same package energy through another interface on some Intel parts and is
not read (it would count the package twice). Domains are classified by their `name` file, not their index.

Each zone's `energy_uj` is a cumulative microjoule counter that wraps to 0 at `max_energy_range_uj` (e.g.
262 kJ: about every 15 min at 300 W). A background thread polls every `poll_interval_s` (read() and stop()
poll too) and accumulates per-domain deltas, so a long window can wrap any number of times. Assumption: no
domain wraps twice within one poll interval (at 10 s that takes over 26 kW on a 262 kJ range); a second
wrap within one interval would go unseen and its energy be lost.

Since Linux 5.10 (CVE-2020-8694, a power side channel) `energy_uj` is readable by root only: unprivileged
runs get "not available" with that reason, never 0. Never raises: every failure becomes a note.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from dist_bench.energy.cpu import HostEnergy

DEFAULT_ROOT = Path("/sys/class/powercap")
SOURCE = "rapl"
THREAD_NAME = "dist-bench-rapl"
UJ_PER_J = 1e6

# Zone directory names: intel-rapl:0, intel-rapl:0:1, amd-rapl:0. Not the `intel-rapl` control-type
# directory, nor intel-rapl-mmio:* (a second interface to the same package counters).
_ZONE = re.compile(r"(?:intel|amd)-rapl(?::\d+)+")
_PERMISSION = "Permission denied; root-only since Linux 5.10, CVE-2020-8694"


class RaplEnergy(HostEnergy):
    """HostEnergy whose figures are RAPL measurements: its source reads "rapl", not "estimated"."""

    @property
    def source(self) -> str:
        return SOURCE if self.cpu_energy_j is not None else "unavailable"


@dataclass(frozen=True)
class Domain:
    """One counted RAPL domain."""

    zone: str  # directory name, e.g. "intel-rapl:0:1"
    name: str  # its `name` file, e.g. "dram"
    kind: str  # "package" (CPU) or "dram" (RAM)
    path: Path
    max_range_uj: int

    @property
    def label(self) -> str:
        return f"{self.zone} ({self.name})"


class RaplUnavailable(Exception):
    """RAPL cannot be used here; the message is the note the user sees."""


def available(root: Path = DEFAULT_ROOT) -> tuple[bool, str]:
    """Whether RAPL energy can be measured under `root`, and a description of the domains or why not."""
    try:
        domains = discover(root)
        for domain in domains:
            _read_energy_uj(domain)
    except RaplUnavailable as err:
        return False, str(err)
    counted = ", ".join(d.label for d in domains)
    if not any(d.kind == "dram" for d in domains):
        return True, f"RAPL: {counted}; {_no_dram(root)}"
    return True, f"RAPL: {counted}"


def discover(root: Path = DEFAULT_ROOT) -> list[Domain]:
    """The package and dram domains under `root`; raises RaplUnavailable with the reason if none is usable."""
    root = Path(root)
    if not root.is_dir():
        raise RaplUnavailable(f"no RAPL: {root} not present")
    try:
        zones = _zone_dirs(root)
    except OSError as err:
        raise RaplUnavailable(f"no RAPL: cannot list {root}: {_describe(err)}") from err
    if not zones:
        raise RaplUnavailable(f"no RAPL: no intel-rapl/amd-rapl zones under {root}")
    named = {zone: _read_name(zone, path) for zone, path in zones.items()}
    domains = [
        _domain(zone, name, zones[zone]) for zone, name in sorted(named.items()) if _kind(name) is not None
    ]
    if not any(d.kind == "package" for d in domains):
        found = ", ".join(f"{z} ({n})" for z, n in sorted(named.items()))
        raise RaplUnavailable(f"no RAPL package domain under {root} (zones: {found})")
    return domains


def _zone_dirs(root: Path) -> dict[str, Path]:
    """Zone directories by name; both the flat symlinks and the nested subzones are walked, each zone once."""
    found: dict[str, Path] = {}
    pending = [root]
    while pending:
        for entry in sorted(pending.pop().iterdir()):
            # Only zone names are followed: sysfs zones also hold links such as `subsystem` back to the class.
            if _ZONE.fullmatch(entry.name) and entry.name not in found and entry.is_dir():
                found[entry.name] = entry
                pending.append(entry)
    return found


def _kind(name: str) -> str | None:
    """What a domain counts as, or None when counting it would double count (core, uncore, psys)."""
    if name.startswith("package"):
        return "package"
    if name == "dram":
        return "dram"
    return None


def _read_name(zone: str, path: Path) -> str:
    try:
        return _read_text(path / "name").strip()
    except OSError as err:
        raise RaplUnavailable(_read_error(zone, "name", err)) from err


def _domain(zone: str, name: str, path: Path) -> Domain:
    try:
        max_range = int(_read_text(path / "max_energy_range_uj"))
    except (OSError, ValueError) as err:
        # Without the range a wrap could not be undone, so the domain cannot be measured.
        raise RaplUnavailable(_read_error(f"{zone} ({name})", "max_energy_range_uj", err)) from err
    return Domain(zone, name, _kind(name) or "", path, max_range)


def _read_text(path: Path) -> str:
    return path.read_text()


def _read_energy_uj(domain: Domain) -> int:
    try:
        return int(_read_text(domain.path / "energy_uj"))
    except (OSError, ValueError) as err:
        raise RaplUnavailable(_read_error(domain.label, "energy_uj", err)) from err


def _read_error(where: str, file: str, err: Exception) -> str:
    if isinstance(err, PermissionError):
        return f"RAPL {file} not readable ({_PERMISSION}): {where}"
    return f"RAPL {file} not readable: {where}: {_describe(err)}"


def _describe(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err) or type(err).__name__


def _no_dram(root: Path) -> str:
    return f"no RAPL dram domain under {root}: RAM energy not measured"


def _delta_uj(previous: int, now: int, max_range_uj: int) -> int:
    """Energy between two reads of one counter that wrapped at most once in between."""
    return now - previous if now >= previous else now + max_range_uj - previous


class RaplMeter:
    """Package (CPU) and dram (RAM) energy since `start()`, summed over sockets. Never raises.

    A read that fails mid-window (a zone gone, permission lost) makes the window's figures None with the
    reason, for good: a wrap or a counter reset could have gone unseen across the gap.
    """

    def __init__(self, root: Path = DEFAULT_ROOT, poll_interval_s: float = 10.0) -> None:
        self.root = Path(root)
        self.poll_interval_s = poll_interval_s
        self.domains: list[Domain] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_uj: list[int] = []
        self._total_uj: list[int] = []
        self._polls = 0
        self._note: str | None = "RAPL not started"  # why there are no figures; None while measuring
        self._final: RaplEnergy | None = None

    @property
    def polls(self) -> int:
        """Successful polls so far (background thread, read() and stop() together)."""
        return self._polls

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Find the domains, read every counter, and start polling; does nothing while already running."""
        if self.running:
            return
        try:
            domains = discover(self.root)
            first = [_read_energy_uj(d) for d in domains]
        except RaplUnavailable as err:
            self._note = str(err)
            return
        with self._lock:
            self.domains, self._last_uj, self._total_uj = domains, first, [0] * len(domains)
            self._note, self._final, self._polls = None, None, 0
        self._stopping = threading.Event()
        # Daemon: a window that is never stopped must not keep the interpreter alive.
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        try:
            self._thread.start()
        except RuntimeError as err:  # no thread to spare: a long window could miss wraps
            self._thread = None
            self._note = f"RAPL poll thread could not start: {_describe(err)}"

    def read(self) -> RaplEnergy:
        """Energy so far (one small sysfs read per domain); the final figures after stop()."""
        if self._final is not None:
            return self._final
        self._poll()
        return self._figures()

    def stop(self) -> RaplEnergy:
        """Stop the poll thread, read the counters a last time; later calls return the same figures."""
        if self._final is not None:
            return self._final
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # it only waits on the event between polls
            self._thread = None
        self._poll()
        self._final = self._figures()
        return self._final

    def _run(self) -> None:
        # wait() returns True once stop() sets the event, ending the loop without another poll here.
        while not self._stopping.wait(self.poll_interval_s):
            self._poll()
            if self._note is not None:
                return  # the failure is final; nothing left to poll

    def _poll(self) -> None:
        """Add every domain's delta since the last poll; a failure becomes the note. Never raises."""
        with self._lock:
            if self._note is not None:
                return
            try:
                now = [_read_energy_uj(d) for d in self.domains]
            except RaplUnavailable as err:
                self._note = f"RAPL read failed mid-window: {err}"
                return
            except Exception as err:  # the poll thread must never raise
                self._note = f"RAPL read failed mid-window: {type(err).__name__}: {_describe(err)}"
                return
            for i, (domain, value) in enumerate(zip(self.domains, now, strict=True)):
                self._total_uj[i] += _delta_uj(self._last_uj[i], value, domain.max_range_uj)
            self._last_uj = now
            self._polls += 1

    def _figures(self) -> RaplEnergy:
        with self._lock:
            if self._note is not None:
                return RaplEnergy(note=self._note)
            cpu = self._sum_j("package")
            ram = self._sum_j("dram")
        if ram is None:
            return RaplEnergy(cpu, None, _no_dram(self.root))
        return RaplEnergy(cpu, ram)

    def _sum_j(self, kind: str) -> float | None:
        totals = [t for d, t in zip(self.domains, self._total_uj, strict=True) if d.kind == kind]
        return sum(totals) / UJ_PER_J if totals else None
