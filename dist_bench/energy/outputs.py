"""Files the energy measurement leaves behind: the power timeline (CSV + PNG with stage boundaries) and
one row per stage appended to a results CSV with seed 004's columns, for analysis outside MLflow."""

from __future__ import annotations

import csv
import dataclasses
import fcntl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_bench.energy.sampler import Sample

TIMELINE_COLUMNS = ["time_unix_s", "t_s", "gpu", "power_w", "memory_used_mb", "utilization_pct",
                    "temperature_c", "sm_clock_mhz", "torch_allocated_mb"]  # fmt: skip
# Seed 004's columns, then run metadata.
RESULTS_COLUMNS = [
    "tokens_processed", "wall_s", "warmup_s", "energy_J", "avg_power_W", "peak_power_W", "tok_per_s",
    "J_per_token", "E10k_J", "vram_peak_MB", "vram_avg_MB",
    "run_id", "parent_run_id", "pipeline", "stage", "model", "dataset", "backend", "optimizer", "batch_size",
    "grad_accum", "seq_len", "precision", "seed", "gpu_source", "cpu_source", "notes",
]  # fmt: skip


@dataclass(frozen=True)
class StageSeries:
    """One stage's samples with its wall-clock span, for the pipeline-wide plot."""

    stage: str
    started_at: float  # unix seconds
    ended_at: float
    samples: Sequence[Sample]


def write_timeline_csv(series: StageSeries, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TIMELINE_COLUMNS)
        for sample in series.samples:
            row = dataclasses.asdict(sample)
            writer.writerow(
                [f"{series.started_at + sample.t_s:.3f}", *(row[c] for c in TIMELINE_COLUMNS[1:])]
            )
    return path


def plot_timeline(series: Sequence[StageSeries], path: Path) -> Path | None:
    """GPU power over wall-clock time, one line per GPU, each stage's span shaded and labelled."""
    if not any(s.samples for s in series):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = min(s.started_at for s in series)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for index, stage in enumerate(series):
        ax.axvspan(stage.started_at - origin, stage.ended_at - origin, alpha=0.12, color=f"C{index % 10}")
        ax.text(stage.started_at - origin, 1.0, f" {stage.stage}", transform=ax.get_xaxis_transform(),
                va="top", fontsize=8)  # fmt: skip
        for gpu in sorted({s.gpu for s in stage.samples}):
            points = [s for s in stage.samples if s.gpu == gpu]
            ax.plot([stage.started_at - origin + s.t_s for s in points], [s.power_w for s in points],
                    color="black" if gpu == 0 else f"C{(gpu + 3) % 10}", linewidth=0.8)  # fmt: skip
    ax.set_xlabel("seconds since the first stage started")
    ax.set_ylabel("GPU power (W)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def append_results_row(path: Path, row: dict[str, Any]) -> None:
    """Append under an exclusive lock: pipelines started together must not interleave half-rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", newline="") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.seek(0, 2)
            writer = csv.DictWriter(handle, fieldnames=RESULTS_COLUMNS, extrasaction="ignore")
            if handle.tell() == 0:
                writer.writeheader()
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in RESULTS_COLUMNS})
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
