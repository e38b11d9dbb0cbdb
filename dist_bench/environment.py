"""Hardware/software snapshot of the machine a run ran on (the run's `environment.json`), and git state.

Everything here degrades to None / [] with a note instead of failing: a run on a laptop without a GPU,
git or /proc still gets a snapshot.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dist_bench.energy.gpu import as_text, load_nvml
from dist_bench.redact import environ_snapshot

# Key in `packages` -> distribution names to try, first installed wins.
PACKAGES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "trl": ("trl",),
    "mlflow": ("mlflow", "mlflow-skinny"),
    "lm_eval": ("lm-eval", "lm_eval"),
    "codecarbon": ("codecarbon",),
    "pydantic": ("pydantic",),
    "nvidia-ml-py": ("nvidia-ml-py",),
    "datasets": ("datasets",),
    "accelerate": ("accelerate",),
    "numpy": ("numpy",),
    "dist-bench": ("dist-bench",),
}


def snapshot(nvml: Any = None) -> dict[str, Any]:
    """JSON-serialisable description of this machine and software; `nvml` replaces pynvml (tests)."""
    return {
        "timestamp_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "platform": {"os": platform.system(), "kernel": platform.release(), "machine": platform.machine()},
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "cpu": cpu_info(),
        "memory_gb": memory_gb(),
        **gpu_info(nvml),
        "cuda": cuda_info(),
        "packages": package_versions(),
        "pip_freeze": pip_freeze(),
        "git": source_git(),
    }


def cpu_info() -> dict[str, Any]:
    fields = _cpuinfo_records()
    model = next((r[k] for r in fields for k in ("model name", "Model", "Hardware") if r.get(k)), None)
    cores = {(r["physical id"], r["core id"]) for r in fields if "physical id" in r and "core id" in r}
    return {
        "model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "physical_cores": len(cores) or None,  # unknown where /proc/cpuinfo has no core ids (ARM, macOS)
    }


def _cpuinfo_records() -> list[dict[str, str]]:
    """One dict per processor block of /proc/cpuinfo; [] where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    records = []
    for block in text.split("\n\n"):
        pairs = (line.split(":", 1) for line in block.splitlines() if ":" in line)
        record = {key.strip(): value.strip() for key, value in pairs}
        if record:
            records.append(record)
    return records


def memory_gb() -> float | None:
    """Physical memory in GiB (2^30 bytes, what `free -g` shows)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 2)
    except (AttributeError, ValueError, OSError):
        return None


def gpu_info(nvml: Any = None) -> dict[str, Any]:
    """`gpus` (every GPU NVML sees) and `nvidia_driver`; `gpu_note` says why NVML could not be asked."""
    try:
        nvml = nvml or load_nvml()
        nvml.nvmlInit()
    except Exception as err:
        return {"gpus": [], "gpu_note": f"NVML unavailable: {err}", "nvidia_driver": None}
    try:
        gpus = [_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        driver = as_text(nvml.nvmlSystemGetDriverVersion())
        return {"gpus": gpus, "nvidia_driver": driver}
    except Exception as err:
        return {"gpus": [], "gpu_note": f"NVML query failed: {err}", "nvidia_driver": None}
    finally:
        with contextlib.suppress(Exception):  # a failed release must not cost the snapshot
            nvml.nvmlShutdown()


def _gpu(nvml: Any, index: int) -> dict[str, Any]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return {
        "index": index,
        "name": as_text(nvml.nvmlDeviceGetName(handle)),
        "uuid": as_text(nvml.nvmlDeviceGetUUID(handle)),
        "memory_total_mb": _memory_total_mb(nvml, handle),
    }


def _memory_total_mb(nvml: Any, handle: Any) -> int | None:
    try:
        return round(nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20)
    except Exception:  # not every (simulated) NVML reports memory; the rest of the GPU entry still counts
        return None


def cuda_info() -> dict[str, Any]:
    import torch

    return {
        "version": torch.version.cuda,  # the CUDA torch was built with; None for a CPU build
        "cudnn": torch.backends.cudnn.version(),
        "available": torch.cuda.is_available(),
        "jit_cache": jit_cache(),
    }


def jit_cache() -> dict[str, Any]:
    """The CUDA driver's JIT cache when the run started: its folder and how many bytes it held. Empty (a fresh
    machine, a container without a persistent home) means the first process pays for kernels compiled at
    run time: 2.4-2.8 s of a 600 k-token kd training loop on an H200 (docs/benchmarks.md, 2026-12-02)."""
    if os.environ.get("CUDA_CACHE_DISABLE") == "1":
        return {"path": None, "bytes": None, "note": "disabled (CUDA_CACHE_DISABLE=1)"}
    folder = Path(os.environ.get("CUDA_CACHE_PATH") or Path.home() / ".nv" / "ComputeCache")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0
    return {"path": str(folder), "bytes": size}


def package_versions() -> dict[str, str | None]:
    return {key: _version(*names) for key, names in PACKAGES.items()}


def _version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def pip_freeze() -> list[str]:
    """Sorted "name==version" of every installed distribution, read from metadata (no pip subprocess)."""
    found = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:  # a broken install can leave a dist-info without metadata
            found.add(f"{name}=={dist.version}")
    return sorted(found, key=str.lower)


def source_git() -> dict[str, Any]:
    """Git state of the checkout holding dist_bench's own source (not the working directory)."""
    import dist_bench

    source = Path(dist_bench.__file__).resolve().parent
    commit, dirty = git_state(source)
    return {"commit": commit, "dirty": dirty, "branch": _git(source, "symbolic-ref", "--short", "-q", "HEAD")}


def git_state(path: Path) -> tuple[str | None, bool]:
    """(commit, dirty) of the git checkout holding `path`; (None, False) when it is not in one.

    Dirty means tracked files differ from HEAD. Untracked files do not count: run outputs and caches written
    inside a checkout must not change the key that decides whether a finished stage can be reused.
    A path the checkout ignores (an installed copy inside a project's .venv) is not that checkout's source.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if _git(folder, "rev-parse", "--is-inside-work-tree") != "true" or _is_ignored(folder, path):
        return None, False
    commit = _git(folder, "rev-parse", "--verify", "-q", "HEAD")  # None before the first commit
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    return commit, bool(status)


def _is_ignored(folder: Path, path: Path) -> bool:
    done = _run_git(folder, "check-ignore", "-q", str(path))
    return done is not None and done.returncode == 0


def _git(folder: Path, *args: str) -> str | None:
    """stdout of `git -C folder args`, stripped; None when git is missing or the command fails."""
    done = _run_git(folder, *args)
    return done.stdout.strip() if done is not None and done.returncode == 0 else None


def _run_git(folder: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    # GIT_DIR & co. (set inside git hooks) would point every command at another repository.
    env = {k: v for k, v in environ_snapshot().items() if not k.startswith("GIT_")}
    try:
        return subprocess.run(
            ["git", "-C", str(folder), *args],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):  # no git on this machine, or it hung
        return None
