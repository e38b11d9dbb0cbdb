"""GPU energy of one window: the difference of NVML's cumulative energy counters.

`nvmlDeviceGetTotalEnergyConsumption` (millijoules since the driver loaded) is the reference on H100s: two
reads bracket the window exactly, while integrating polled power misses 10-20% on bursty work at the
0.5-1 s intervals other tools use (shared/measurements/README.md).

The NVML module is a parameter (default `pynvml` from nvidia-ml-py) so a simulated device exposing the same
function names can stand in for a real GPU.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MJ_PER_J = 1000.0


@dataclass(frozen=True)
class GpuEnergy:
    """GPU figures of a window so far: energy_j None means not measured, and `note` says why."""

    energy_j: float | None
    gpus: tuple[str, ...] = ()
    note: str | None = None
    per_gpu_j: dict[str, float] = field(default_factory=dict)  # uuid key -> joules, to count each GPU once


class _Unavailable(Exception):
    """The GPU energy cannot be measured; the message is the note the user sees."""


def load_nvml() -> Any:
    # Imported lazily: nvidia-ml-py imports fine without a driver, but nothing should touch NVML when
    # energy tracking is disabled.
    return importlib.import_module("pynvml")


def as_text(value: str | bytes) -> str:
    # nvidia-ml-py returned bytes before 11.5 and str since; simulated devices may return either.
    return value.decode() if isinstance(value, bytes) else str(value)


def uuid_key(uuid: object) -> str:
    """Comparable form of a GPU UUID: torch prints its _CUuuid without NVML's "GPU-" prefix."""
    text = as_text(uuid) if isinstance(uuid, str | bytes) else str(uuid)
    return text.strip().lower().removeprefix("gpu-")


def torch_cuda_uuids() -> list[str]:
    """UUIDs of the CUDA devices this process uses, [] when none.

    CUDA_VISIBLE_DEVICES is applied by torch. Under torchrun/accelerate (LOCAL_RANK set) a process that
    sees several devices uses only cuda:LOCAL_RANK, so each rank measures its own GPU and the ranks'
    windows add up without counting a GPU twice.
    """
    import torch

    if not torch.cuda.is_available():
        return []
    indices = list(range(torch.cuda.device_count()))
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and len(indices) > 1 and int(local_rank) < len(indices):
        indices = [int(local_rank)]
    return [uuid_key(torch.cuda.get_device_properties(i).uuid) for i in indices]


def torch_cuda_index(uuid: str) -> int | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        keys = [uuid_key(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
        return keys.index(uuid_key(uuid)) if uuid_key(uuid) in keys else None
    except Exception:  # a measurement aid: no index, no torch memory series
        return None


def synchronize_cuda() -> str | None:
    """Let queued kernels finish so their energy lands in the window that launched them.

    Returns the error text, or None.
    """
    try:
        import torch

        # Only when this process already uses CUDA: synchronising would otherwise create a context
        # (hundreds of MB and some power) just to measure.
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
    except Exception as err:  # a CUDA error here belongs to the work, which reports it itself
        return f"CUDA synchronize failed: {_describe(err)}"
    return None


class GpuEnergyCounter:
    """Energy of the GPUs this process uses, summed, since `start()`. Never raises: failures become notes.

    The GPUs are the CUDA devices visible to torch, found among NVML's devices by UUID (NVML indexes
    ignore CUDA_VISIBLE_DEVICES), or the NVML indices given (energy.gpu_devices: GPUs another process
    uses for this stage, such as a teacher served on this node). No device means nothing to measure,
    not zero.
    """

    def __init__(
        self,
        nvml: Any = None,
        cuda_uuids: Callable[[], list[str]] | None = None,
        nvml_indices: list[int] | None = None,
    ) -> None:
        self._nvml = nvml
        self._nvml_indices = nvml_indices
        # Looked up when measuring, not bound here: tests (and simulated devices) replace it module-wide.
        self._cuda_uuids = cuda_uuids or (lambda: torch_cuda_uuids())
        self._handles: list[Any] = []
        self._start_mj: list[int] = []
        self._gpus: tuple[str, ...] = ()
        self._uuids: list[str] = []
        self._note: str | None = "GPU counter not started"
        self._initialized = False

    def start(self) -> None:
        """Synchronize CUDA, then read every counter."""
        try:
            self._start()
            self._note = None
        except _Unavailable as err:
            self._note = str(err)
        except Exception as err:  # a simulated or broken NVML must not break the stage
            self._note = f"NVML unavailable: {_describe(err)}"
        if self._note is not None:
            self._shutdown()

    def read(self) -> GpuEnergy:
        """Energy since start(); cheap (one NVML call per GPU), no synchronisation."""
        if self._note is not None:
            return GpuEnergy(None, self._gpus, self._note)
        try:
            now = [self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) for h in self._handles]
        except Exception as err:
            # Not sticky: the counter is cumulative, so a later read still gives the whole window.
            return GpuEnergy(None, self._gpus, f"NVML energy read failed: {_describe(err)}")
        deltas = [end - begin for begin, end in zip(self._start_mj, now, strict=True)]
        if any(d < 0 for d in deltas):
            return GpuEnergy(None, self._gpus, "NVML energy counter went backwards (driver reloaded?)")
        per_gpu = {uuid: d / MJ_PER_J for uuid, d in zip(self._uuids, deltas, strict=True)}
        return GpuEnergy(sum(deltas) / MJ_PER_J, self._gpus, per_gpu_j=per_gpu)

    @property
    def devices(self) -> tuple[Any, list[Any], tuple[str, ...]]:
        """(nvml module, handles, names) of the measured GPUs, for the power sampler; empty if none."""
        return self._nvml, list(self._handles), self._gpus

    @property
    def torch_indices(self) -> list[int | None]:
        """CUDA index in this process of each measured GPU (None where torch does not see it)."""
        return [torch_cuda_index(uuid) for uuid in self._uuids]

    def stop(self) -> GpuEnergy:
        """Synchronize CUDA, read the counters a last time and release NVML."""
        sync_error = synchronize_cuda() if self._note is None else None
        figures = self.read()
        self._shutdown()
        if sync_error and figures.energy_j is not None:
            return GpuEnergy(figures.energy_j, figures.gpus, sync_error)
        return figures

    def _start(self) -> None:
        wanted: list[str] = []
        if self._nvml_indices is None:
            try:
                wanted = self._cuda_uuids()
            except Exception as err:
                raise _Unavailable(f"could not list CUDA devices: {_describe(err)}") from err
            wanted = [uuid_key(u) for u in wanted]  # torch and NVML spell UUIDs differently
            if not wanted:
                raise _Unavailable("no CUDA device visible to torch")
        if self._nvml is None:
            try:
                self._nvml = load_nvml()
            except ImportError as err:
                raise _Unavailable(f"NVML unavailable: {err} (install nvidia-ml-py)") from err
        try:
            self._nvml.nvmlInit()
        except Exception as err:
            raise _Unavailable(f"NVML unavailable: {_describe(err)}") from err
        self._initialized = True
        if self._nvml_indices is not None:
            wanted = [self._uuid_at(index) for index in self._nvml_indices]
        self._handles, self._gpus = self._find_devices(wanted)
        self._uuids = list(wanted)
        sync_error = synchronize_cuda()
        if sync_error:
            raise _Unavailable(sync_error)
        self._start_mj = [
            self._first_read(h, name) for h, name in zip(self._handles, self._gpus, strict=True)
        ]

    def _uuid_at(self, index: int) -> str:
        try:
            handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            return uuid_key(as_text(self._nvml.nvmlDeviceGetUUID(handle)))
        except Exception as err:
            raise _Unavailable(f"energy.gpu_devices: no NVML device {index} ({_describe(err)})") from err

    def _find_devices(self, wanted: list[str]) -> tuple[list[Any], tuple[str, ...]]:
        nvml = self._nvml
        by_uuid: dict[str, tuple[Any, str]] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            uuid = as_text(nvml.nvmlDeviceGetUUID(handle))
            by_uuid[uuid_key(uuid)] = (handle, f"{as_text(nvml.nvmlDeviceGetName(handle))} ({uuid})")
        missing = [u for u in wanted if u not in by_uuid]
        if missing:
            # e.g. a MIG instance: its energy is not separable from the rest of the GPU.
            raise _Unavailable(f"CUDA device(s) {', '.join(missing)} not found among NVML devices")
        found = [by_uuid[u] for u in wanted]
        return [h for h, _ in found], tuple(name for _, name in found)

    def _first_read(self, handle: Any, name: str) -> int:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except Exception as err:  # NVML_ERROR_NOT_SUPPORTED before Volta
            raise _Unavailable(f"energy counter unavailable on {name}: {_describe(err)}") from err

    def _shutdown(self) -> None:
        if self._initialized:
            self._initialized = False
            # Releasing a reference must not hide the figures already read.
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


def measure_idle_power_w(seconds: float, nvml: Any = None) -> tuple[float | None, str]:
    """Mean idle draw per GPU over `seconds` of doing nothing, from the energy counter; (None, why) if none.

    For net energy when no pre-run baseline exists: run it before any work so the GPUs are not still
    cooling down from it.
    """
    import time

    counter = GpuEnergyCounter(nvml)
    counter.start()
    time.sleep(seconds)
    figures = counter.stop()
    if figures.energy_j is None or not figures.gpus:
        return None, figures.note or "no GPU measured"
    return figures.energy_j / seconds / len(
        figures.gpus
    ), f"measured over {seconds:g} s before the first stage"
