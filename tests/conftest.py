"""Shared fixtures: an isolated MLflow store and run dir per test, and a tiny-world config small enough
that a whole pipeline runs in seconds on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest

from dist_bench.config import RunConfig, load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PROJECT = Path(__file__).resolve().parent.parent

# Few records, several shards, frequent checkpoints: every mechanism runs, nothing takes long.
SMALL = [
    "data.max_samples=48",
    "logits.shard_size=16",
    "logits.batch_size=8",
    "train.token_budget=12000",
    "train.batch_size=8",
    "train.checkpoint_every=4",
    "train.log_every=2",
    "train.optimizer.warmup_steps=2",
    "eval.limit=8",
    "energy.codecarbon=false",
]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """cwd = a fresh dir with its own sqlite MLflow store."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # mlflow.set_tracking_uri (called by every pipeline) outlives a test and wins over the variable:
    # without this, MlflowClient() here would read the store of whichever test ran a pipeline last.
    mlflow.set_tracking_uri(uri)
    return tmp_path


def small_config(workdir: Path, *overrides: str) -> RunConfig:
    return load_config(None, [*SMALL, f"output.run_dir={workdir / 'runs'}", *overrides])
