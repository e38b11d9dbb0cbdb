"""Shared fixtures: an isolated MLflow store and run dir per test, and a tiny-world config small enough
that a whole pipeline runs in seconds on CPU."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow.tracking import MlflowClient

from dist_bench.config import RunConfig, load_config
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.nvml_sim import SimulatedGpu, SimulatedNvml, constant

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# MLflow's telemetry thread sets and pops a variable while other code reads the environment; and the
# tests have no business reporting usage
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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


def bare_environment(**values: str) -> dict[str, str]:
    """A child process's environment: `values` over PATH alone, so that nothing of this shell's (an MLflow
    URI, a Hugging Face cache) leaks in; PYTHONPATH too where it is set, for a checkout that runs uninstalled
    (the GPU image imports the project from PYTHONPATH)."""
    kept = {name: os.environ[name] for name in ("PATH", "PYTHONPATH") if name in os.environ}
    return {**kept, **values}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with its own store and proxied artifact folder; yields its URL."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not come up within 90 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def store_outside_the_checkout(tmp_path: Path, *experiments: str) -> str:
    """A fresh sqlite store for a subprocess that runs in the checkout (`mlflow run .`): its Default and
    these experiments are created from tmp_path, so their artifacts land in tmp_path/mlruns and not in
    the checkout's ./mlruns (MLflow's default artifact root is ./mlruns of whoever creates the experiment),
    where they would outlive the store as folders of no run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with contextlib.chdir(tmp_path):
        client = MlflowClient(uri)
        for name in experiments:
            client.create_experiment(name)
    return uri


@pytest.fixture
def simulated_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatedNvml]:
    """This process 'has' one H100 drawing 250 W: NVML is the simulation, torch reports its UUID."""
    nvml = SimulatedNvml(
        SimulatedGpu("GPU-5151", "NVIDIA H100 80GB HBM3", 81559, constant(250.0), memory_used_mb=2048.0)
    )
    monkeypatch.setattr(gpu_module, "load_nvml", lambda: nvml)
    monkeypatch.setattr(gpu_module, "torch_cuda_uuids", lambda: ["5151"])
    yield nvml
