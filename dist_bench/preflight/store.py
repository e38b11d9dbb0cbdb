"""The tracking store, folders and devices: the cheap checks every pipeline runs first."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from dist_bench.config import RunConfig
from dist_bench.preflight.base import Check, PreflightError, located
from dist_bench.redact import redact

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # tracking.py uses the same (it imports mlflow; this must not)
SQLITE_HEADER = b"SQLite format 3\x00"
HTTP_TIMEOUT_S = (
    3.0,
    10.0,
)  # connect, read: a dead server is reported in seconds, not after minutes of retries


# ---- tracking store -----------------------------------------------------------------------------------

# MLflow's built-in tracking schemes; anything else is looked up in MLflow's (plugin-extensible) registry.
KNOWN_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "uc"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def tracking_store() -> Check:
    """The store MLFLOW_TRACKING_URI names: a scheme MLflow knows, and a database or server that answers."""
    uri = tracking_uri()
    shown = redact(uri)
    scheme = urlparse(uri).scheme
    if len(scheme) == 1:  # C:\... : a Windows path, not a scheme
        scheme = ""
    if scheme.split("+")[0] not in KNOWN_SCHEMES and scheme not in _registered_schemes():
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: '{shown}': unknown scheme '{scheme}' "
            "(sqlite:///file.db, http(s)://host:port, postgresql://..., file:///folder or a folder)"
        )
    if scheme == "sqlite":
        return _sqlite_store(uri, shown)
    if scheme in ("http", "https"):
        return _http_store(uri, shown)
    if scheme in ("", "file"):
        folder = urlparse(uri).path if scheme == "file" else uri
        return Check("tracking store", f"{shown} ({writable_dir('MLFLOW_TRACKING_URI', folder).detail})")
    return Check("tracking store", f"{shown} (scheme '{scheme}': reachability not probed)")


def _registered_schemes() -> set[str]:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    return set(_tracking_store_registry._registry)


def _sqlite_store(uri: str, shown: str) -> Check:
    path_text = uri.removeprefix("sqlite:///")
    if path_text in ("", ":memory:") or not uri.startswith("sqlite:///"):
        return Check("tracking store", f"{shown} (in memory)")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise PreflightError(f"MLFLOW_TRACKING_URI: {shown}: {path} is a folder, not a database file")
    if path.exists():
        try:
            with path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as err:
            raise PreflightError(
                f"MLFLOW_TRACKING_URI: {shown}: cannot read {path} ({err.strerror})"
            ) from None
        if header and header != SQLITE_HEADER:  # an empty file is an empty database
            raise PreflightError(f"MLFLOW_TRACKING_URI: {shown}: {path} is not an SQLite database")
        return Check("tracking store", f"{shown} (SQLite database, {path.stat().st_size / 1e6:.1f} MB)")
    writable_dir("MLFLOW_TRACKING_URI", path.parent)
    return Check("tracking store", f"{shown} (a new SQLite database will be created)")


def _http_store(uri: str, shown: str) -> Check:
    """One real API call with a short timeout (MLflow's own client retries for minutes before giving up)."""
    import requests

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(
            url, params={"max_results": 1}, headers=headers, auth=auth, timeout=HTTP_TIMEOUT_S, verify=verify
        )
    except requests.Timeout:
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: the tracking server did not answer in time"
        ) from None
    except requests.RequestException as err:
        why = type(err).__name__
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: no tracking server answers there ({why})"
        ) from None
    if response.status_code in (401, 403):
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: the tracking server refused the credentials (HTTP {response.status_code})"
        )
    try:
        body = response.json() if response.ok else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: answered HTTP {response.status_code}, not as an MLflow tracking server"
        )
    return Check("tracking store", f"{shown} (MLflow server answered)")


# ---- folders and devices ------------------------------------------------------------------------------


def writable_dir(field: str, path: str | Path) -> Check:
    """A folder that is, or can be created as, a writable directory; nothing is created."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == target else f" ({existing} is a file)"
        what = "is a file, not a folder" if existing == target else "cannot be created"
        raise PreflightError(f"{field}: {target} {what}{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):  # os.access says yes to root even where writing fails
            pass
    except OSError as err:
        raise PreflightError(f"{field}: {target}: not writable ({err.strerror})") from None
    free = shutil.disk_usage(existing).free
    return Check(field, f"{target} (writable, {free / 1e9:.1f} GB free)")


def device(field: str, requested: str) -> Check:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PreflightError(
            f"{field}=cuda: torch sees no CUDA device (torch {torch.__version__}, {build}); use auto or cpu"
        )
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if requested == "cuda" else "CPU"
    return Check(field, f"{requested} ({name})")


def energy_devices(cfg: RunConfig) -> list[Check]:
    """energy.gpu_devices names GPUs this host's NVML has, each once. A wrong index would not stop a stage:
    its GPU energy would be missing from the table, explained only in a tag; a repeated one counted twice."""
    indices = cfg.energy.gpu_devices
    if not cfg.energy.enabled or indices is None:
        return []
    from dist_bench.energy import gpu

    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise PreflightError(f"energy.gpu_devices: {indices} names device {repeated[0]} twice")
    nvml = gpu.load_nvml()
    try:
        nvml.nvmlInit()
        try:
            count = nvml.nvmlDeviceGetCount()
        finally:
            nvml.nvmlShutdown()
    except Exception as err:  # pynvml's NVMLError (no driver, no library) or a broken install
        raise PreflightError(
            f"energy.gpu_devices: {indices}: NVML cannot be read on this host ({str(err) or type(err).__name__}); "
            "unset it to measure the GPUs this process uses"
        ) from None
    missing = [i for i in indices if not 0 <= i < count]
    if missing:
        raise PreflightError(
            f"energy.gpu_devices: no NVML device {missing[0]}: this host has {count} (indices 0 to {count - 1})"
        )
    return [Check("energy.gpu_devices", f"NVML devices {indices} of {count} on this host")]


def training_ranks(cfg: RunConfig, ranks: int) -> Check:
    """Several training ranks (--nproc, torchrun): they can share an optimizer step evenly, and FSDP (which
    accelerate applies over GPUs only) has GPUs to shard over."""
    import torch

    from dist_bench.distributed import step_split

    try:
        micro, accumulation = step_split(cfg.train.batch_size, cfg.train.grad_accum, ranks)
    except ValueError as err:
        raise PreflightError(str(err)) from None
    cuda = cfg.train.device != "cpu" and torch.cuda.is_available()
    if cfg.train.distributed == "fsdp" and not cuda:
        raise located(
            PreflightError(
                "train.distributed=fsdp: accelerate shards a model over GPUs only; CPU ranks train with ddp"
            ),
            cfg,
        )
    return Check("train.distributed", f"{cfg.train.distributed} on {ranks} ranks, each {accumulation} "
                 f"micro-batch(es) of {micro} per step")  # fmt: skip
