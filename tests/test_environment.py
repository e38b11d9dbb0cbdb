"""Environment snapshot and git state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_bench import environment

KEYS = {
    "timestamp_utc",
    "hostname",
    "platform",
    "python",
    "cpu",
    "memory_gb",
    "gpus",
    "nvidia_driver",
    "cuda",
    "packages",
    "pip_freeze",
    "git",
}


@pytest.fixture(scope="module")
def snap() -> dict:
    return environment.snapshot()


def test_snapshot_has_the_keys_and_is_json(snap: dict) -> None:
    assert set(snap) >= KEYS
    assert json.loads(json.dumps(snap)) == snap
    assert set(snap["platform"]) == {"os", "kernel", "machine"}
    assert set(snap["python"]) == {"version", "executable"}
    assert snap["cpu"]["logical_cores"] >= 1
    assert snap["memory_gb"] > 0
    assert snap["cuda"] == {
        "version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "available": torch.cuda.is_available(),
        "jit_cache": environment.jit_cache(),
    }
    assert set(snap["git"]) == {"commit", "dirty", "branch"}


def test_the_cuda_jit_cache_is_measured_where_cuda_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cold cache (a fresh machine) costs the first run seconds: the snapshot says how full it was."""
    monkeypatch.setenv("CUDA_CACHE_PATH", str(tmp_path / "cache"))
    assert environment.jit_cache() == {"path": str(tmp_path / "cache"), "bytes": 0}
    (tmp_path / "cache" / "a" / "b").mkdir(parents=True)
    (tmp_path / "cache" / "index").write_bytes(b"x" * 100)
    (tmp_path / "cache" / "a" / "b" / "kernel").write_bytes(b"y" * 23)
    assert environment.jit_cache()["bytes"] == 123
    monkeypatch.delenv("CUDA_CACHE_PATH")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert environment.jit_cache()["path"] == str(tmp_path / ".nv" / "ComputeCache")
    monkeypatch.setenv("CUDA_CACHE_DISABLE", "1")
    assert environment.jit_cache()["bytes"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without GPU")
def test_no_gpu_here(snap: dict) -> None:
    assert snap["gpus"] == []
    assert snap["nvidia_driver"] is None
    assert snap["gpu_note"].startswith("NVML unavailable")


def test_gpus_listed_through_nvml() -> None:
    devices = [SimpleNamespace(uuid="GPU-aaaa", name=b"NVIDIA H100 80GB HBM3", total=80 * 2**30)]
    nvml = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=lambda i: devices[i],
        nvmlDeviceGetName=lambda h: h.name,
        nvmlDeviceGetUUID=lambda h: h.uuid,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h.total),
        nvmlSystemGetDriverVersion=lambda: "580.159.04",
    )
    info = environment.gpu_info(nvml)
    assert info == {
        "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa", "memory_total_mb": 81920}],
        "nvidia_driver": "580.159.04",
    }


def test_packages_and_freeze(snap: dict) -> None:
    packages = snap["packages"]
    assert {"torch", "transformers", "trl", "mlflow", "lm_eval", "codecarbon", "pydantic"} <= set(packages)
    assert {"nvidia-ml-py", "datasets", "accelerate", "numpy", "dist-bench"} <= set(packages)
    assert packages["torch"] == torch.__version__
    assert packages["dist-bench"] is not None
    assert environment.package_versions()["torch"] == packages["torch"]
    assert environment._version("surely-not-an-installed-distribution") is None
    freeze = snap["pip_freeze"]
    assert freeze == sorted(freeze, key=str.lower)
    assert f"torch=={torch.__version__}" in freeze
    assert all("==" in line for line in freeze)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def test_git_state_of_a_temporary_repo(tmp_path: Path) -> None:
    assert environment.git_state(tmp_path) == (None, False)  # not a checkout

    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git(tmp_path, "rev-parse", "HEAD").strip()
    assert environment.git_state(tmp_path) == (head, False)

    (tmp_path / "notes.txt").write_text("untracked output\n")
    assert environment.git_state(tmp_path) == (head, False)  # untracked files do not count

    (tmp_path / "a.py").write_text("x = 2\n")
    assert environment.git_state(tmp_path / "a.py") == (head, True)

    (tmp_path / ".gitignore").write_text(".venv/\n")
    installed = tmp_path / ".venv" / "dist_bench"
    installed.mkdir(parents=True)
    assert environment.git_state(installed) == (None, False)  # an installed copy is not this checkout
