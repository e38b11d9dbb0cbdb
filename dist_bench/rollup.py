"""What a parent run carries once its stages ran: `<stage>/<metric>` after each stage, and at the end
`total/<metric>`, the headline metrics, tag and description (headline.py), the pipeline-wide power
timeline and `experiment_summary.json` (seed 003's names; `dist-bench report --run-dir` reads it back); and the
results CSV's row per stage (seed 004).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dist_bench import headline
from dist_bench.energy import outputs
from dist_bench.energy.outputs import plot_timeline

if TYPE_CHECKING:
    from dist_bench.energy import EnergyReading
    from dist_bench.tracking import ParentRun, StageResult


def log_stage(parent: ParentRun, result: StageResult) -> None:
    client = MlflowClient()
    rollup = {}
    for name, value in result.metrics.items():
        rollup[name if name.startswith("eval/") else f"{result.stage}/{name}"] = value
    client.log_batch(parent.run_id, metrics=[metric(k, v) for k, v in rollup.items()], synchronous=True)
    client.set_tag(parent.run_id, f"dist_bench.stage_run.{result.stage}", result.run_id)
    for component in ("gpu", "cpu", "ram"):
        source = result.summary.get("energy_sources", {}).get(component)
        if source:
            client.set_tag(parent.run_id, f"{result.stage}/energy.{component}.source", source)
    flags = result.summary.get("energy", {}).get("flags")
    if flags:
        client.set_tag(parent.run_id, f"{result.stage}/energy.flags", ",".join(flags))


TOTALS = ("duration_s", "tokens", "gpu_energy_j", "cpu_energy_j", "ram_energy_j", "total_energy_j", "co2e_kg",
          "net_energy_j", "gpu_energy_uncertainty_j")  # fmt: skip


def log_totals(parent: ParentRun) -> None:
    """total/<metric> over the stages; a component absent in any stage is absent from the total."""
    totals: dict[str, float] = {}
    for name in TOTALS:
        values = [s.metrics.get(name) for s in parent.stages]
        if values and all(v is not None for v in values):
            totals[name] = float(sum(values))  # type: ignore[arg-type]
    if "total_energy_j" in totals:
        totals["total_energy_kwh"] = totals["total_energy_j"] / 3.6e6
        if totals.get("tokens"):
            totals["j_per_token"] = totals["total_energy_j"] / totals["tokens"]
    if totals.get("duration_s") and totals.get("tokens"):
        totals["tokens_per_s"] = totals["tokens"] / totals["duration_s"]
    if "net_energy_j" in totals:
        totals["net_energy_kwh"] = totals["net_energy_j"] / 3.6e6
    MlflowClient().log_batch(parent.run_id, metrics=[metric(f"total/{k}", v) for k, v in totals.items()])
    _log_headline(parent, totals)
    plot = plot_timeline(parent.timeline, Path(tempfile.mkdtemp()) / "power_timeline.png")
    if plot:
        mlflow.log_artifact(str(plot), "energy")
    else:
        mlflow.log_text(_no_timeline(parent.stages), "energy/power_timeline.txt")
    summary = {
        "pipeline": parent.pipeline,
        "run_id": parent.run_id,
        "config_hash": MlflowClient().get_run(parent.run_id).data.tags["dist_bench.config_hash"],
        "total_energy_kwh": totals.get("total_energy_kwh"),
        "total_energy_joules": totals.get("total_energy_j"),
        "total_duration_seconds": totals.get("duration_s"),
        "total_tokens": totals.get("tokens"),
        "co2e_kg": totals.get("co2e_kg"),
        "stages": {s.stage: {**s.summary, "reused": s.reused, "run_id": s.run_id} for s in parent.stages},
    }
    # The parent's own tags and metrics as logged: `dist-bench report --run-dir` builds the same table row
    # from this file without a tracking server.
    logged = MlflowClient().get_run(parent.run_id)
    summary["run"] = {
        "name": logged.info.run_name,
        "start_time": logged.info.start_time,  # ms since the epoch: the table's row order
        "tags": {k: v for k, v in logged.data.tags.items() if k.startswith("dist_bench.") or "/energy." in k},
        "metrics": dict(logged.data.metrics),
        "params": dict(logged.data.params),
    }
    mlflow.log_dict(summary, "experiment_summary.json")
    out = Path(parent.cfg.output.run_dir).resolve() / "pipelines" / parent.run_id
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "experiment_summary.json", summary)


def _log_headline(parent: ParentRun, totals: dict[str, float]) -> None:
    """The few metrics, the tag and the description a user of the MLflow UI looks for first (headline.py)."""
    from dist_bench.report import EVAL_TASKS, quality_columns  # the report imports this module

    client = MlflowClient()
    stage_metrics = {s.stage: s.metrics for s in parent.stages}
    figures = headline.metrics(totals, stage_metrics)
    client.log_batch(parent.run_id, metrics=[metric(k, v) for k, v in figures.items()], synchronous=True)
    logged = client.get_run(parent.run_id)
    tasks = logged.data.tags.get(EVAL_TASKS)
    quality = quality_columns(dict(logged.data.metrics), tasks.split(",") if tasks else None)
    sources = [(s.stage, s.reused, s.summary.get("energy_sources", {})) for s in parent.stages]
    client.set_tag(parent.run_id, headline.COVERS, headline.covers(sources))
    note = headline.description(parent.pipeline, parent.name, logged.data.tags, figures, quality)
    client.set_tag(parent.run_id, headline.NOTE, note)
    headline.update_view(client, parent.experiment_id, list(quality))


def _no_timeline(stages: list[StageResult]) -> str:
    """In place of a power timeline that could not be drawn: why (each stage's GPU energy note)."""
    lines = ["No power timeline: it plots the GPU power samples, and none were taken."]
    for s in stages:
        notes = s.summary.get("energy_notes", {})
        why = notes.get("gpu") or notes.get("gpu_sampler") or "no GPU samples"
        lines.append(f"- {s.stage}{' (reused)' if s.reused else ''}: {why}")
    return "\n".join(lines) + "\n"


def append_results_row(
    parent: ParentRun,
    stage: str,
    run_id: str,
    metrics: dict[str, float],
    energy: EnergyReading,
    tags: dict[str, str],
) -> None:
    """Seed 004's results CSV: one row per stage, for analysis with pandas outside MLflow."""
    cfg = parent.cfg
    if not cfg.energy.results_csv:
        return
    path = Path(cfg.output.run_dir) / cfg.energy.results_csv
    model = next(
        (
            v
            for k, v in tags.items()
            if k in ("dist_bench.teacher", "dist_bench.student", "dist_bench.eval_model")
        ),
        "",
    )
    total = metrics.get("total_energy_j")
    post_warmup = metrics.get("post_warmup_energy_j", total)
    outputs.append_results_row(
        path,
        {
            "tokens_processed": int(metrics.get("tokens", 0)),
            "wall_s": energy.duration_s,
            "warmup_s": metrics.get("warmup_s", 0.0),
            "energy_J": post_warmup,
            "avg_power_W": energy.avg_power_w,
            "peak_power_W": energy.peak_power_w,
            "tok_per_s": metrics.get("tokens_per_s"),
            "J_per_token": metrics.get("j_per_token"),
            "E10k_J": metrics.get("energy_per_10k_tokens_j"),
            "vram_peak_MB": energy.vram_peak_mb,
            "vram_avg_MB": energy.vram_avg_mb,
            "run_id": run_id,
            "parent_run_id": parent.run_id,
            "pipeline": parent.pipeline,
            "stage": stage,
            "model": model,
            "dataset": cfg.data.train,
            "backend": "transformers",
            "optimizer": "adamw",
            "batch_size": cfg.train.batch_size,
            "grad_accum": cfg.train.grad_accum,
            "seq_len": cfg.data.max_length,
            "precision": cfg.train.precision,
            "seed": cfg.seed,
            "gpu_source": energy.gpu_source,
            "cpu_source": energy.cpu_source,
            "notes": "; ".join(f"{k}: {v}" for k, v in energy.notes.items()),
        },
    )


def metric(key: str, value: float, step: int = 0) -> Metric:
    return Metric(key, float(value), int(time.time() * 1000), step)


def write_json_atomic(path: Path, data: Any) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=str)
    os.replace(handle.name, path)
