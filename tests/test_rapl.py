"""RAPL energy over fake powercap trees: domain selection, wrap-around, the poll thread, failure notes."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from dist_bench.energy import rapl
from dist_bench.energy.rapl import RaplMeter, available

MAX_UJ = 262_143_328_850  # a real package's max_energy_range_uj
LONG = 3600.0  # poll interval for tests that must not see the thread poll
J = 1_000_000  # µJ


class FakePowercap:
    """A powercap tree laid out like sysfs: zone directories nested under a device directory, and every
    zone and subzone also linked flat from the class directory (`root`)."""

    def __init__(self, base: Path) -> None:
        self.root = base / "class" / "powercap"
        self.devices = base / "devices"
        self.root.mkdir(parents=True)
        self.dirs: dict[str, Path] = {}

    def zone(self, zone: str, name: str, energy_uj: int = 0, max_uj: int = MAX_UJ) -> Path:
        parent = zone.rsplit(":", 1)[0]
        where = self.dirs[parent] if parent in self.dirs else self.devices / zone.split(":")[0]
        path = where / zone
        path.mkdir(parents=True)
        (path / "name").write_text(f"{name}\n")
        (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
        (path / "enabled").write_text("1\n")
        (path / "subsystem").symlink_to(self.root)  # like sysfs: a loop the walk must not follow
        self.dirs[zone] = path
        (self.root / zone).symlink_to(path)
        self.set(zone, energy_uj)
        return path

    def set(self, zone: str, energy_uj: int) -> None:
        # Atomic, as sysfs reads are: the poll thread must never see a half-written value.
        tmp = self.dirs[zone] / ".energy_uj.tmp"
        tmp.write_text(f"{energy_uj}\n")
        os.replace(tmp, self.dirs[zone] / "energy_uj")

    def get(self, zone: str) -> int:
        return int((self.dirs[zone] / "energy_uj").read_text())

    def add(self, zone: str, energy_uj: int) -> None:
        max_uj = int((self.dirs[zone] / "max_energy_range_uj").read_text())
        self.set(zone, (self.get(zone) + energy_uj) % max_uj)


def server(base: Path, dram: bool = True) -> FakePowercap:
    """Two sockets with dram subzones, a core subzone, psys, and the MMIO duplicate of package-0."""
    tree = FakePowercap(base)
    (tree.devices / "intel-rapl").mkdir(parents=True)
    (tree.devices / "intel-rapl" / "enabled").write_text("1\n")
    (tree.root / "intel-rapl").symlink_to(tree.devices / "intel-rapl")  # control type, not a zone
    tree.zone("intel-rapl:0", "package-0", 5_000 * J)
    tree.zone("intel-rapl:0:0", "core", 1_000 * J)
    tree.zone("intel-rapl:1", "package-1", 7_000 * J)
    if dram:
        tree.zone("intel-rapl:0:1", "dram", 300 * J)
        tree.zone("intel-rapl:1:0", "dram", 400 * J)
    tree.zone("intel-rapl:2", "psys", 90_000 * J)
    tree.zone("intel-rapl-mmio:0", "package-0", 5_000 * J)
    return tree


def add_load(tree: FakePowercap, dram: bool = True) -> None:
    """package 12 J and dram 5 J; core, psys and the MMIO package advance too and must not count."""
    tree.add("intel-rapl:0", 5 * J)
    tree.add("intel-rapl:1", 7 * J)
    tree.add("intel-rapl:0:0", 4 * J)
    tree.add("intel-rapl:2", 50 * J)
    tree.add("intel-rapl-mmio:0", 5 * J)
    if dram:
        tree.add("intel-rapl:0:1", 2 * J)
        tree.add("intel-rapl:1:0", 3 * J)


def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def wait_for_thread_poll(meter: RaplMeter) -> None:
    # Two more polls: the first may have read its values before the test's last write.
    target = meter.polls + 2
    wait_for(lambda: meter.polls >= target)


def rapl_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == rapl.THREAD_NAME]


def test_packages_and_dram_summed_separately_core_psys_mmio_not_counted(tmp_path: Path) -> None:
    tree = server(tmp_path)
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    assert {(d.zone, d.kind) for d in meter.domains} == {
        ("intel-rapl:0", "package"),
        ("intel-rapl:1", "package"),
        ("intel-rapl:0:1", "dram"),
        ("intel-rapl:1:0", "dram"),
    }
    add_load(tree)
    so_far = meter.read()
    assert (so_far.cpu_energy_j, so_far.ram_energy_j, so_far.note) == (12.0, 5.0, None)
    add_load(tree)
    final = meter.stop()
    assert (final.cpu_energy_j, final.ram_energy_j, final.note) == (24.0, 10.0, None)
    assert final.source == rapl.SOURCE == "rapl"
    add_load(tree)
    assert meter.read() == final  # frozen after stop()
    assert available(tree.root)[0] is True


def test_wrap_around(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    tree.zone("intel-rapl:0", "package-0", MAX_UJ - 2 * J)
    tree.zone("intel-rapl:0:0", "dram", 10 * J, max_uj=65_712_999_613)
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    tree.set("intel-rapl:0", 3 * J)  # wrapped: 2 J up to the range, then 3 J
    tree.add("intel-rapl:0:0", 1 * J)
    figures = meter.stop()
    assert figures.cpu_energy_j == pytest.approx(5.0)
    assert figures.ram_energy_j == pytest.approx(1.0)


def test_poll_thread_catches_a_double_wrap(tmp_path: Path) -> None:
    max_uj = 100 * J
    tree = FakePowercap(tmp_path)
    tree.zone("intel-rapl:0", "package-0", 90 * J, max_uj=max_uj)
    tree.zone("intel-rapl:0:0", "dram", 0)
    meter = RaplMeter(tree.root, poll_interval_s=0.005)
    meter.start()
    for step in (60, 60, 60, 60):  # 240 J through a 100 J counter: wraps twice, polled between steps
        tree.add("intel-rapl:0", step * J)
        wait_for_thread_poll(meter)
    assert meter.stop().cpu_energy_j == pytest.approx(240.0)


def test_without_polls_in_between_a_double_wrap_is_lost(tmp_path: Path) -> None:
    # The documented limit: at most one wrap per poll interval.
    tree = FakePowercap(tmp_path)
    tree.zone("intel-rapl:0", "package-0", 90 * J, max_uj=100 * J)
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    for _ in range(4):
        tree.add("intel-rapl:0", 60 * J)
    assert meter.stop().cpu_energy_j == pytest.approx(40.0)  # 240 J less two ranges


def deny_energy_reads(tree: FakePowercap, monkeypatch: pytest.MonkeyPatch) -> None:
    """energy_uj mode 0400 as on Linux >= 5.10; as root chmod does not stop reads, so refuse them too."""
    for path in tree.dirs.values():
        (path / "energy_uj").chmod(0o400 if os.geteuid() == 0 else 0o000)
    if os.geteuid() == 0:
        real = rapl._read_text

        def read_text(path: Path) -> str:
            if path.name == "energy_uj":
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(rapl, "_read_text", read_text)


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tree = server(tmp_path)
    deny_energy_reads(tree, monkeypatch)
    ok, why = available(tree.root)
    assert not ok
    assert "Permission denied" in why and "root-only since Linux 5.10" in why
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    assert not meter.running
    figures = meter.stop()
    assert (figures.cpu_energy_j, figures.ram_energy_j) == (None, None)
    assert "permission" in (figures.note or "").lower()
    assert figures.source == "unavailable"


def test_missing_root_and_no_zones(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert available(missing) == (False, f"no RAPL: {missing} not present")
    meter = RaplMeter(missing)
    meter.start()
    figures = meter.read()
    assert figures.cpu_energy_j is None and figures.note == f"no RAPL: {missing} not present"
    assert meter.stop().source == "unavailable"

    empty = tmp_path / "empty"
    (empty / "dtpm").mkdir(parents=True)  # another powercap control type, no RAPL zones
    ok, why = available(empty)
    assert not ok and "no intel-rapl/amd-rapl zones" in why
    assert "rapl" in rapl.available(rapl.DEFAULT_ROOT)[1].lower()  # no RAPL on this machine: says why


def test_amd_rapl_names_accepted(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    tree.zone("amd-rapl:0", "package-0", 0)
    tree.zone("amd-rapl:0:0", "core", 0)
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    tree.add("amd-rapl:0", 8 * J)
    tree.add("amd-rapl:0:0", 6 * J)
    assert meter.stop().cpu_energy_j == pytest.approx(8.0)


def test_zone_disappearing_mid_window(tmp_path: Path) -> None:
    tree = server(tmp_path)
    meter = RaplMeter(tree.root, poll_interval_s=0.005)
    meter.start()
    add_load(tree)
    wait_for_thread_poll(meter)
    shutil.rmtree(tree.dirs["intel-rapl:1"])  # e.g. the driver unloaded
    wait_for(lambda: not meter.running)  # the thread records the failure and ends, without raising
    figures = meter.read()
    assert (figures.cpu_energy_j, figures.ram_energy_j) == (None, None)
    assert "mid-window" in (figures.note or "") and "intel-rapl:1" in (figures.note or "")
    assert meter.stop() == figures


def test_no_dram_domain(tmp_path: Path) -> None:
    tree = server(tmp_path, dram=False)
    ok, why = available(tree.root)
    assert ok and "no RAPL dram domain" in why
    meter = RaplMeter(tree.root, poll_interval_s=LONG)
    meter.start()
    add_load(tree, dram=False)
    figures = meter.stop()
    assert figures.cpu_energy_j == pytest.approx(12.0)
    assert figures.ram_energy_j is None
    assert "no RAPL dram domain" in (figures.note or "")


def test_no_package_domain(tmp_path: Path) -> None:
    tree = FakePowercap(tmp_path)
    tree.zone("intel-rapl:0", "psys", 0)
    ok, why = available(tree.root)
    assert not ok and "no RAPL package domain" in why and "psys" in why


def test_thread_gone_after_stop(tmp_path: Path) -> None:
    tree = server(tmp_path)
    meter = RaplMeter(tree.root, poll_interval_s=0.005)
    meter.start()
    assert meter.running and len(rapl_threads()) == 1
    wait_for_thread_poll(meter)
    meter.stop()
    assert not meter.running
    assert rapl_threads() == []
    polls = meter.polls
    time.sleep(0.05)
    assert meter.polls == polls  # nothing polls after stop()
