"""GPU power, memory, utilisation, temperature and SM clock, sampled on a fixed schedule by a thread.

    sampler = PowerSampler(nvml, handles, names, interval_s=0.1)
    sampler.start()
    ...                                       # the stage's work
    samples = sampler.stop()                  # the whole series; sampler.samples() gives it so far
    energy_j = integrate_energy_j(samples, gpu=0)

Stage energy comes from NVML's energy counter (gpu.py). This series is for the timeline, peaks, VRAM and a
cross-check: on an H100, instant power polled at >= 10 Hz integrates to within about 1% of the counter on a
bursty load, while 0.5-1 s polling misses 10-20% (shared/measurements/README.md). So prefer the instant
field and a short interval; the trailing-average `nvmlDeviceGetPowerUsage` is the fallback.

The caller initialises NVML and finds the handles; the sampler takes its own NVML reference (NVML counts
them) from start() to stop(), so its last reads still work when the caller has already released its own.
Never raises from the thread: failed reads are counted, and a GPU that keeps failing is dropped with a note.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

PowerMethod = Literal["instant", "average"]
MAX_CONSECUTIVE_FAILURES = 5  # at 10 Hz, half a second of a GPU not answering: it is gone, not hiccuping
STOP_TIMEOUT_S = 5.0  # a real NVML call on a dying GPU can hang for seconds; stop() must still return
THREAD_NAME = "dist-bench-power-sampler"
MW_PER_W = 1000.0
MB = 2**20  # NVML reports bytes; "mb" in the harness's names is MiB

# Which member of NVML's value union holds a field value, by the name of its valueType constant.
_VALUE_MEMBERS = {
    "NVML_VALUE_TYPE_DOUBLE": "dVal",
    "NVML_VALUE_TYPE_UNSIGNED_INT": "uiVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG": "ulVal",
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": "ullVal",
    "NVML_VALUE_TYPE_SIGNED_LONG_LONG": "sllVal",
    "NVML_VALUE_TYPE_SIGNED_INT": "siVal",
    "NVML_VALUE_TYPE_UNSIGNED_SHORT": "usVal",
}


@dataclass(frozen=True)
class Sample:
    """One GPU at one tick. Only power is required; a metric the GPU does not report is None."""

    t_s: float  # seconds since start(), monotonic clock
    gpu: int  # index into the sampler's handles
    power_w: float
    memory_used_mb: float | None
    utilization_pct: float | None
    temperature_c: float | None
    sm_clock_mhz: float | None
    torch_allocated_mb: float | None = None  # what this process's tensors hold (torch's allocator)


class PowerSampler:
    """Samples every GPU in `handles` every `interval_s` from start() to stop(), both included."""

    def __init__(
        self,
        nvml: Any,
        handles: list[Any],
        names: list[str],
        interval_s: float = 0.1,
        torch_devices: list[int | None] | None = None,
    ) -> None:
        """`torch_devices[i]`: the CUDA index of handles[i] in this process, to sample torch's allocator too."""
        if len(handles) != len(names):
            raise ValueError("one name per handle")
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.interval_s = interval_s
        self._nvml = nvml
        self._handles = list(handles)
        self._names = list(names)
        self._torch_devices = list(torch_devices) if torch_devices else [None] * len(handles)
        self._lock = threading.Lock()  # guards what the caller may read while the thread writes
        self._samples: list[Sample] = []
        self._notes: dict[int, str] = {}
        self._failures = [0] * len(handles)
        self._streak = [0] * len(handles)  # consecutive failures
        self._last_error: list[str | None] = [None] * len(handles)
        self._polling = [True] * len(handles)
        self._method: PowerMethod | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._stopped = False
        self._holds_nvml = False

    # --- what the caller reads ------------------------------------------------------------------------
    @property
    def power_method(self) -> PowerMethod:
        """Which reading power comes from, fixed at start(): "instant" is the field
        NVML_FI_DEV_POWER_INSTANT, "average" is nvmlDeviceGetPowerUsage (a trailing ~1 s average)."""
        if self._method is None:
            raise RuntimeError("power_method is decided by start()")
        return self._method

    @property
    def notes(self) -> dict[int, str]:
        """GPU index -> why its series stops early or has gaps."""
        with self._lock:
            return dict(self._notes)

    @property
    def failures(self) -> dict[int, int]:
        """GPU index -> failed reads so far (each one a tick without a sample for that GPU)."""
        with self._lock:
            return dict(enumerate(self._failures))

    def samples(self) -> list[Sample]:
        """A copy of the samples so far, in time order per GPU."""
        with self._lock:
            return list(self._samples)

    # --- start / stop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Choose the power method, take the t = 0 sample, and start the thread."""
        if self._method is not None:
            raise RuntimeError("a PowerSampler starts once")
        self._holds_nvml = _acquire(self._nvml)
        self._method = self._choose_power_method()
        self._t0 = time.monotonic()
        self._tick()
        # Daemon: a sampler that is never stopped must not keep the interpreter alive.
        thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        try:
            thread.start()
        except RuntimeError as err:  # no thread to spare: the t = 0 sample is all there will be
            self._note_all(f"sampler thread could not start: {_describe(err)}")
            self._release_nvml()
            return
        self._thread = thread

    def stop(self) -> list[Sample]:
        """Stop the thread, take the final sample and return the series; later calls just return it."""
        if self._thread is None or self._stopped:
            return self.samples()
        self._stopped = True
        self._stopping.set()
        self._thread.join(timeout=STOP_TIMEOUT_S)
        if self._thread.is_alive():
            # Still inside an NVML call: a final read from here would race it, so the series ends early.
            self._note_all(f"sampler thread still in an NVML call {STOP_TIMEOUT_S:.0f} s after stop()")
        else:
            self._tick()
            self._release_nvml()  # not while the thread may still be inside a call
        self._note_gaps()
        return self.samples()

    def __enter__(self) -> PowerSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            tick = 0
            while True:
                # Ticks sit on a fixed grid from t0, so a late wake-up or a slow read never shifts the
                # ones after it; ticks already missed are skipped rather than fired back to back.
                tick = max(tick + 1, math.floor(self._elapsed() / self.interval_s) + 1)
                if self._stopping.wait(max(self._t0 + tick * self.interval_s - time.monotonic(), 0.0)):
                    return
                self._tick()
        except Exception as err:  # a bug here must end the series with a reason, not kill the process
            self._note_all(f"sampler thread failed: {type(err).__name__}: {err}")

    def _tick(self) -> None:
        for gpu, handle in enumerate(self._handles):
            if self._polling[gpu]:
                self._sample(gpu, handle)

    def _sample(self, gpu: int, handle: Any) -> None:
        t_s = self._elapsed()  # per GPU: with several GPUs a tick's reads are spread over milliseconds
        try:
            power_w = self._read_power_w(handle)
        except Exception as err:  # NVMLError, or anything a broken or simulated module raises
            self._failed(gpu, t_s, err)
            return
        sample = Sample(
            t_s=t_s,
            gpu=gpu,
            power_w=power_w,
            memory_used_mb=_optional(lambda: self._nvml.nvmlDeviceGetMemoryInfo(handle).used / MB),
            utilization_pct=_optional(lambda: self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            temperature_c=_optional(
                lambda: self._nvml.nvmlDeviceGetTemperature(handle, self._nvml.NVML_TEMPERATURE_GPU)
            ),
            sm_clock_mhz=_optional(
                lambda: self._nvml.nvmlDeviceGetClockInfo(handle, self._nvml.NVML_CLOCK_SM)
            ),
            torch_allocated_mb=_optional(lambda: _torch_allocated_mb(self._torch_devices[gpu])),
        )
        with self._lock:
            self._samples.append(sample)
        self._streak[gpu] = 0

    def _failed(self, gpu: int, t_s: float, err: Exception) -> None:
        text = _describe(err)
        with self._lock:
            self._failures[gpu] += 1
            self._streak[gpu] += 1
            self._last_error[gpu] = text
            if self._streak[gpu] >= MAX_CONSECUTIVE_FAILURES:
                self._polling[gpu] = False
                self._notes[gpu] = (
                    f"{self._names[gpu]}: sampling stopped at t={t_s:.2f} s after "
                    f"{MAX_CONSECUTIVE_FAILURES} consecutive failed reads: {text}"
                )

    # --- reading power --------------------------------------------------------------------------------
    def _choose_power_method(self) -> PowerMethod:
        # One method for every GPU so the series are comparable; a GPU whose probe raised has no say
        # (it is probably gone, and must not demote the others to the averaged reading).
        votes = [v for v in (self._has_instant_power(h) for h in self._handles) if v is not None]
        return "instant" if votes and all(votes) else "average"

    def _has_instant_power(self, handle: Any) -> bool | None:
        field_id = getattr(self._nvml, "NVML_FI_DEV_POWER_INSTANT", None)  # absent in old nvidia-ml-py
        if field_id is None:
            return False
        try:
            return (
                self._nvml.nvmlDeviceGetFieldValues(handle, [field_id])[0].nvmlReturn
                == self._nvml.NVML_SUCCESS
            )
        except Exception:
            return None

    def _read_power_w(self, handle: Any) -> float:
        nvml = self._nvml
        if self._method == "average":
            return nvml.nvmlDeviceGetPowerUsage(handle) / MW_PER_W
        field = nvml.nvmlDeviceGetFieldValues(handle, [nvml.NVML_FI_DEV_POWER_INSTANT])[0]
        if field.nvmlReturn != nvml.NVML_SUCCESS:
            raise nvml.NVMLError(field.nvmlReturn)  # a failed field comes back inside a successful call
        return _field_number(nvml, field) / MW_PER_W

    # --- helpers --------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _release_nvml(self) -> None:
        if self._holds_nvml:
            self._holds_nvml = False
            with contextlib.suppress(Exception):  # releasing must not cost the series
                self._nvml.nvmlShutdown()

    def _note_all(self, text: str) -> None:
        with self._lock:
            for gpu, polling in enumerate(self._polling):
                if polling:
                    self._notes[gpu] = f"{self._names[gpu]}: {text}"

    def _note_gaps(self) -> None:
        # A dropped GPU already has its note; one that recovered still has holes the trapezoid bridges.
        with self._lock:
            for gpu, count in enumerate(self._failures):
                if count and gpu not in self._notes:
                    self._notes[gpu] = (
                        f"{self._names[gpu]}: {count} failed read(s) left gaps in the series; "
                        f"last: {self._last_error[gpu]}"
                    )


def _acquire(nvml: Any) -> bool:
    try:
        nvml.nvmlInit()
    except Exception:  # the caller's reference still holds NVML open; reads will tell if it does not
        return False
    return True


def _field_number(nvml: Any, field: Any) -> float:
    for constant, member in _VALUE_MEMBERS.items():
        if getattr(nvml, constant, None) == field.valueType:
            return float(getattr(field.value, member))
    raise ValueError(f"unknown NVML field value type {field.valueType}")


def _optional(read: Callable[[], float]) -> float | None:
    # Secondary metrics are best effort: not every GPU reports every one (utilisation under MIG, say),
    # and a missing one must not cost the power sample.
    try:
        return float(read())
    except Exception:
        return None


def _torch_allocated_mb(device: int | None) -> float:
    if device is None:
        raise LookupError("no CUDA device of this process")
    import torch

    # Only once the process uses CUDA: querying would otherwise create a context from this thread.
    if not torch.cuda.is_initialized():
        raise LookupError("CUDA not initialised")
    return torch.cuda.memory_allocated(device) / MB


def _describe(err: BaseException) -> str:
    return str(err) or type(err).__name__


# --- figures from a series -------------------------------------------------------------------------------
def integrate_energy_j(samples: Sequence[Sample], gpu: int) -> float:
    """Joules of one GPU over its sampled span: trapezoid over the power series."""
    times, watts = _series(samples, gpu, "power_w")
    return _trapezoid(times, watts)


def power_stats(samples: Sequence[Sample], gpu: int) -> tuple[float, float]:
    """(time-weighted average W, peak W) of one GPU."""
    times, watts = _series(samples, gpu, "power_w")
    return _time_weighted_mean(times, watts), max(watts)


def vram_stats(samples: Sequence[Sample], gpu: int, metric: str = "memory_used_mb") -> tuple[float, float]:
    """(peak MiB, time-weighted average MiB) of one GPU's used memory (NVML), or `torch_allocated_mb`."""
    times, used = _series(samples, gpu, metric)
    return max(used), _time_weighted_mean(times, used)


def timeline_rows(samples: Sequence[Sample]) -> list[dict[str, float | int | None]]:
    """One flat row per sample, by time then GPU: ready for csv.DictWriter or pandas.DataFrame."""
    return [dataclasses.asdict(s) for s in sorted(samples, key=lambda s: (s.t_s, s.gpu))]


def _series(samples: Sequence[Sample], gpu: int, metric: str) -> tuple[list[float], list[float]]:
    points = sorted(
        (s.t_s, value) for s in samples if s.gpu == gpu and (value := getattr(s, metric)) is not None
    )
    if not points:
        # Not 0: a figure that was not measured must be absent, and the caller decides how to say so.
        raise ValueError(f"no {metric} samples for GPU {gpu}")
    return [t for t, _ in points], [float(v) for _, v in points]


def _trapezoid(times: list[float], values: list[float]) -> float:
    return sum((t1 - t0) * (v0 + v1) / 2 for (t0, v0), (t1, v1) in pairwise(zip(times, values, strict=True)))


def _time_weighted_mean(times: list[float], values: list[float]) -> float:
    span = times[-1] - times[0]
    # A single sample (or several at one instant) has no duration to weight by: plain mean.
    return _trapezoid(times, values) / span if span > 0 else sum(values) / len(values)
