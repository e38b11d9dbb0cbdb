"""The energy of interrupted attempts of a stage, kept in its folder so that the resumed attempt counts it.

    <stage dir>/energy_progress.json          {"attempt": id, "prior": reading of the attempts before it}
    <stage dir>/energy_progress.rank-<r>.json {"attempt": id, "host": ..., "reading": rank r's own energy
                                               up to its last committed work unit, this attempt}

Each rank writes its own file when it commits work (StageContext.commit_energy), with no collective: ranks
commit at their own pace. The next attempt (rank 0, before any work) folds the files of the attempt named in
energy_progress.json into its prior: the ranks of one attempt combine as a finished stage's do (a GPU
counted once, a host's CPU/RAM once: distributed.merge), attempts add up. Files of any other attempt are
stale (an attempt killed between writing its prior and removing them) and are ignored, so a kill at any
instant neither loses nor double-counts committed energy.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
from pathlib import Path

from dist_bench.energy.distributed import merge
from dist_bench.energy.window import EnergyReading

ENERGY_PROGRESS = "energy_progress.json"


def start_attempt(stage_dir: Path) -> tuple[EnergyReading | None, str]:
    """(The energy committed by earlier attempts, or None; this attempt's id), recorded before it works."""
    from dist_bench.rollup import write_json_atomic

    state = stage_dir / ENERGY_PROGRESS
    prior, last = None, None
    if state.exists():
        data = json.loads(state.read_text())
        prior = EnergyReading.from_dict(data["prior"]) if data.get("prior") else None
        last = data.get("attempt")
    rank_files = sorted(stage_dir.glob("energy_progress.rank-*.json"))
    parts = []
    for path in rank_files:
        data = json.loads(path.read_text())
        if data.get("attempt") == last:
            parts.append((data["host"], EnergyReading.from_dict(data["reading"])))
    if parts:
        committed = parts[0][1] if len(parts) == 1 else _merged_with_co2e(parts)
        prior = prior + committed if prior else committed
    attempt = uuid.uuid4().hex
    write_json_atomic(state, {"attempt": attempt, "prior": prior.to_dict() if prior else None})
    for path in rank_files:
        path.unlink(missing_ok=True)
    return prior, attempt


def commit(stage_dir: Path, attempt: str, rank: int, reading: EnergyReading) -> None:
    """Rank `rank`'s own energy so far in this attempt, right after it committed work to disk."""
    from dist_bench.rollup import write_json_atomic

    write_json_atomic(
        stage_dir / f"energy_progress.rank-{rank}.json",
        {"attempt": attempt, "host": socket.gethostname(), "reading": reading.to_dict()},
    )


def _merged_with_co2e(parts: list[tuple[str, EnergyReading]]) -> EnergyReading:
    """merge() leaves CO2e to the window; here it is the ranks' own carbon intensity (one grid for a job)
    applied to the merged energy."""
    merged = merge(parts)
    for _, reading in parts:
        if reading.co2e_kg is not None and reading.total_energy_j:
            intensity = reading.co2e_kg / reading.total_energy_j
            total = merged.total_energy_j
            return dataclasses.replace(merged, co2e_kg=total * intensity if total else None)
    return merged
