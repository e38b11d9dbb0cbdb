"""Decoding ablations: one parent per grid point with its sweep and ablation tags, stages reused across
points whose inputs match, every point checked before the first runs, and the report groups them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, SMALL
from dist_bench import pipeline, report
from dist_bench.preflight import PreflightError

GRID = """
ablations:
  name: decoding
  grid:
    generation.temperature: [0.0, 1.0]
    train.max_steps: [2, 3]
"""


def experiment(folder: Path, grid: str = GRID) -> Path:
    path = folder / "sweep.yaml"
    path.write_text((PROJECT / "configs" / "experiments" / "tiny_sft.yaml").read_text() + grid)
    return path


def overrides(folder: Path) -> list[str]:
    return [*SMALL, f"output.run_dir={folder / 'runs'}", "generation.max_prompts=24",
            "generation.batch_size=8", "generation.filters.verify=none"]  # fmt: skip


def test_the_grid_makes_one_tagged_parent_per_point_and_reuses_stages(workdir: Path) -> None:
    parents = pipeline.sweep(experiment(workdir), overrides(workdir), "sft")
    client = MlflowClient()
    tags = [client.get_run(p.run_id).data.tags for p in parents]
    assert [t["dist_bench.ablation"] for t in tags] == [
        "generation.temperature=0.0,train.max_steps=2",
        "generation.temperature=0.0,train.max_steps=3",
        "generation.temperature=1.0,train.max_steps=2",
        "generation.temperature=1.0,train.max_steps=3",
    ]
    assert {t["dist_bench.sweep"] for t in tags} == {"decoding"}
    assert [p.cfg.generation.temperature for p in parents] == [0.0, 0.0, 1.0, 1.0]
    assert [p.cfg.train.max_steps for p in parents] == [2, 3, 2, 3]
    # the teacher wrote each temperature's data once: the second point of each reuses it
    assert [p.stages[0].reused for p in parents] == [False, True, False, True]
    assert [p.stages[1].metrics["steps"] for p in parents] == [2, 3, 2, 3]

    table = report.build_table([report._row_facts(client.get_run(p.run_id)) for p in parents])
    assert list(table["sweep"]) == ["decoding"] * 4
    assert list(table["ablation"]) == [t["dist_bench.ablation"] for t in tags]


def test_a_bad_point_stops_the_sweep_before_any_run(workdir: Path) -> None:
    grid = GRID.replace("train.max_steps: [2, 3]", "generation.max_new_tokens: [8, 500]")  # 500 > context
    with pytest.raises(PreflightError, match=r"generation\.max_new_tokens: 500 new tokens"):
        pipeline.sweep(experiment(workdir, grid), overrides(workdir), "sft")
    assert not (workdir / "runs").exists()
    assert not MlflowClient().search_experiments() or not MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]
    )


def test_the_sft_entry_point_runs_the_sweep(tmp_path: Path) -> None:
    """`mlflow run . -e sft -P run_ablations=true` runs this script with `--ablations true`."""
    grid = GRID.replace("    generation.temperature: [0.0, 1.0]\n", "")  # two points: max_steps 2 and 3
    done = subprocess.run(
        [sys.executable, str(PROJECT / "entry_points" / "sft.py"), "--config", str(experiment(tmp_path, grid)),
         "--overrides", " ".join(overrides(tmp_path)), "--ablations", "true"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string="tags.`dist_bench.sweep` = 'decoding'",
        order_by=["attributes.start_time ASC"],
    )
    assert [r.data.tags["dist_bench.ablation"] for r in runs] == ["train.max_steps=2", "train.max_steps=3"]
    assert {r.info.status for r in runs} == {"FINISHED"}
