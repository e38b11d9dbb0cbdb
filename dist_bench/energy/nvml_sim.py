"""A simulated NVML: the `pynvml` functions and constants the energy code uses, over GPUs whose power you set.

    sim = SimulatedNvml(SimulatedGpu("GPU-0", "Sim H100", 81559, square_wave(700, 70, 0.6, 0.5)))
    GpuEnergyCounter(nvml=sim, cuda_uuids=lambda: ["0"])    # the real code path, no GPU

It mirrors what was measured on an H100 (shared/measurements/README.md) so tests and CPU demos meet the
same behaviour as the real bindings:
- every reading (energy, power, memory, ...) changes only every `update_interval_s` (100 ms there): time is
  quantised down to that grid before any trace is evaluated;
- `nvmlDeviceGetTotalEnergyConsumption` is the exact integral of the power trace, in integer mJ;
- `nvmlDeviceGetPowerUsage` is a trailing 1 s average, the field `NVML_FI_DEV_POWER_INSTANT` the
  instantaneous value, both in integer mW;
- errors are pynvml's own `NVMLError` (NOT_SUPPORTED, GPU_IS_LOST, UNINITIALIZED), and results are pynvml's
  own ctypes structures, so code that works here does not depend on the simulation's leniency.

Traces built with `constant`, `square_wave` or `steps` carry their exact integral; any other callable is
integrated numerically on a fine grid (0.1 ms steps at the default update interval).
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import pynvml  # nvidia-ml-py: imports without a driver; only its constants, error and structures are used

P = ParamSpec("P")
R = TypeVar("R")
Metric = float | Callable[[float], float]  # a constant, or a function of seconds since the simulation start
FieldValues = Sequence[pynvml.c_nvmlFieldValue_t]  # what nvmlDeviceGetFieldValues returns (a ctypes array)

# A time within this of a trace's edge counts as past it: grid times such as 3 * 0.1 are not exact floats.
_EDGE_EPS = 1e-9
_SUBSTEPS = 1000  # numerical integration steps per update interval, for traces without an exact integral
AVERAGE_WINDOW_S = 1.0  # nvmlDeviceGetPowerUsage's trailing average
MB = 2**20  # NVML reports bytes; the harness reports MiB under the name "mb"


@dataclass(frozen=True)
class PowerTrace:
    """Watts at `t` seconds since the simulation started, with the exact joules over [0, t]."""

    watts: Callable[[float], float]
    joules: Callable[[float], float]

    def __call__(self, t: float) -> float:
        return self.watts(t)


def constant(watts: float) -> PowerTrace:
    return PowerTrace(lambda t: watts, lambda t: watts * t)


def square_wave(
    high_w: float, low_w: float, period_s: float, duty: float, phase_s: float = 0.0
) -> PowerTrace:
    """`high_w` for the first `duty` of each period (periods start at `phase_s`), `low_w` for the rest.

    The bursty load of the measurements: square_wave(700, 70, 0.6, 0.5) is 0.3 s on, 0.3 s off.
    """
    if period_s <= 0 or not 0 <= duty <= 1:
        raise ValueError("square_wave needs period_s > 0 and 0 <= duty <= 1")
    on_s = duty * period_s
    per_period_j = high_w * on_s + low_w * (period_s - on_s)

    def position(t: float) -> tuple[int, float]:
        n = math.floor((t - phase_s) / period_s + _EDGE_EPS)
        return n, max(t - phase_s - n * period_s, 0.0)

    def watts(t: float) -> float:
        return high_w if position(t)[1] < on_s - _EDGE_EPS else low_w

    def since_phase(t: float) -> float:  # an antiderivative: continuous, and its slope is watts(t)
        n, u = position(t)
        return n * per_period_j + high_w * min(u, on_s) + low_w * max(u - on_s, 0.0)

    return PowerTrace(watts, lambda t: since_phase(t) - since_phase(0.0))


def steps(points: Sequence[tuple[float, float]]) -> PowerTrace:
    """`w` from each `(t, w)` until the next point; before the first point, the first `w`."""
    times = [float(t) for t, _ in points]
    levels = [float(w) for _, w in points]
    if not times or times != sorted(times):
        raise ValueError("steps needs at least one (t, w) point, in time order")
    # Joules from the first point to each point, so an integral is one lookup plus one partial segment.
    cumulative = [0.0]
    for i in range(1, len(times)):
        cumulative.append(cumulative[-1] + levels[i - 1] * (times[i] - times[i - 1]))

    def segment(t: float) -> int:
        return max(bisect.bisect_right(times, t + _EDGE_EPS) - 1, 0)

    def since_first(t: float) -> float:
        i = segment(t)
        return cumulative[i] + levels[i] * (t - times[i])

    return PowerTrace(lambda t: levels[segment(t)], lambda t: since_first(t) - since_first(0.0))


@dataclass
class SimulatedGpu:
    uuid: str
    name: str
    memory_total_mb: float
    power_w: Callable[[float], float]
    has_energy_counter: bool = True  # False: pre-Volta, the counter raises NOT_SUPPORTED
    has_instant_power: bool = True  # False: the instant-power field comes back with NOT_SUPPORTED
    fail_after_s: float | None = None  # from then on every call on this GPU raises GPU_IS_LOST
    memory_used_mb: Metric = 0.0
    utilization_pct: Metric = 0.0
    temperature_c: Metric = 35.0
    sm_clock_mhz: Metric = 1980.0


@dataclass(frozen=True)
class SimulatedHandle:
    """Opaque like a real c_nvmlDevice_t: code must go through the NVML functions, not the GPU object."""

    index: int


def _nvml_call(fn: Callable[Concatenate[SimulatedNvml, P], R]) -> Callable[Concatenate[SimulatedNvml, P], R]:
    """Count the call, refuse it before nvmlInit like the real library, and serialise it (the sampler
    thread and the stage's own counter reads share one simulation)."""

    @functools.wraps(fn)
    def call(self: SimulatedNvml, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            self.calls[fn.__name__] += 1
            if self._refcount == 0 and fn.__name__ != "nvmlInit":
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
            return fn(self, *args, **kwargs)

    return call


class SimulatedNvml:
    """Module-like stand-in for `pynvml` over simulated GPUs; pass it wherever an `nvml` module goes."""

    NVMLError = pynvml.NVMLError
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVML_ERROR_UNINITIALIZED = pynvml.NVML_ERROR_UNINITIALIZED
    NVML_ERROR_INVALID_ARGUMENT = pynvml.NVML_ERROR_INVALID_ARGUMENT
    NVML_ERROR_NOT_SUPPORTED = pynvml.NVML_ERROR_NOT_SUPPORTED
    NVML_ERROR_GPU_IS_LOST = pynvml.NVML_ERROR_GPU_IS_LOST
    NVML_FI_DEV_POWER_INSTANT = pynvml.NVML_FI_DEV_POWER_INSTANT
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_VALUE_TYPE_DOUBLE = pynvml.NVML_VALUE_TYPE_DOUBLE
    NVML_VALUE_TYPE_UNSIGNED_INT = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG
    NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_LONG_LONG = pynvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG
    NVML_VALUE_TYPE_SIGNED_INT = pynvml.NVML_VALUE_TYPE_SIGNED_INT
    NVML_VALUE_TYPE_UNSIGNED_SHORT = pynvml.NVML_VALUE_TYPE_UNSIGNED_SHORT
    DRIVER_VERSION = "simulated"  # lands in environment.json: a simulated run must not pass for a real one

    def __init__(
        self,
        *gpus: SimulatedGpu,
        clock: Callable[[], float] = time.monotonic,
        update_interval_s: float = 0.1,
    ) -> None:
        if update_interval_s <= 0:
            raise ValueError("update_interval_s must be > 0")
        self.gpus = list(gpus)
        self.update_interval_s = update_interval_s
        self.calls: Counter[str] = Counter()
        self._clock = clock
        self._t0 = clock()  # the simulation starts now: traces get t = 0 here
        self._refcount = 0
        self._lock = threading.RLock()
        # Numerically integrated traces: joules at grid points 0, 1, 2, ... per GPU, extended on demand.
        self._joules_at: list[list[float]] = [[0.0] for _ in gpus]

    # --- library --------------------------------------------------------------------------------------
    @_nvml_call
    def nvmlInit(self) -> None:
        self._refcount += 1  # reference counted like the real library: every init needs its shutdown

    @_nvml_call
    def nvmlShutdown(self) -> None:
        self._refcount -= 1

    @_nvml_call
    def nvmlSystemGetDriverVersion(self) -> str:
        return self.DRIVER_VERSION

    @_nvml_call
    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    @_nvml_call
    def nvmlDeviceGetHandleByIndex(self, index: int) -> SimulatedHandle:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._check_alive(index)
        return SimulatedHandle(index)

    # --- identity -------------------------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetUUID(self, handle: SimulatedHandle) -> str:
        return self._gpu(handle).uuid

    @_nvml_call
    def nvmlDeviceGetName(self, handle: SimulatedHandle) -> str:
        return self._gpu(handle).name

    # --- power and energy -----------------------------------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetTotalEnergyConsumption(self, handle: SimulatedHandle) -> int:
        gpu = self._gpu(handle)
        if not gpu.has_energy_counter:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return math.floor(self._joules(handle.index, self._tick()) * 1000)  # mJ, truncated like a counter

    @_nvml_call
    def nvmlDeviceGetPowerUsage(self, handle: SimulatedHandle) -> int:
        self._gpu(handle)
        return round(self._average_w(handle.index, self._tick()) * 1000)

    @_nvml_call
    def nvmlDeviceGetFieldValues(
        self, handle: SimulatedHandle, fieldIds: Sequence[int | tuple[int, int]]
    ) -> FieldValues:
        gpu = self._gpu(handle)
        tick = self._tick()
        values = (pynvml.c_nvmlFieldValue_t * len(fieldIds))()
        for value, field in zip(values, fieldIds, strict=True):
            value.fieldId, value.scopeId = field if isinstance(field, tuple) else (field, 0)
            value.timestamp = round(self._grid_s(tick) * 1e6)  # µs, like the real field's timestamp
            if value.fieldId == pynvml.NVML_FI_DEV_POWER_INSTANT and gpu.has_instant_power:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_INT
                value.value.uiVal = round(gpu.power_w(self._grid_s(tick)) * 1000)
            else:
                # The call succeeds and the entry carries the error, as the real library does per field.
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    # --- memory, utilisation, temperature, clocks -----------------------------------------------------
    @_nvml_call
    def nvmlDeviceGetMemoryInfo(
        self, handle: SimulatedHandle, version: int | None = None
    ) -> pynvml.c_nvmlMemory_t:
        gpu = self._gpu(handle)
        total = round(gpu.memory_total_mb * MB)
        used = min(round(self._metric(gpu.memory_used_mb) * MB), total)
        return pynvml.c_nvmlMemory_t(total=total, free=total - used, used=used)

    @_nvml_call
    def nvmlDeviceGetUtilizationRates(self, handle: SimulatedHandle) -> pynvml.c_nvmlUtilization_t:
        gpu = self._gpu(handle)
        return pynvml.c_nvmlUtilization_t(gpu=round(self._metric(gpu.utilization_pct)), memory=0)

    @_nvml_call
    def nvmlDeviceGetTemperature(self, handle: SimulatedHandle, sensor: int) -> int:
        gpu = self._gpu(handle)
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return round(self._metric(gpu.temperature_c))

    @_nvml_call
    def nvmlDeviceGetClockInfo(self, handle: SimulatedHandle, type: int) -> int:
        gpu = self._gpu(handle)
        if type != pynvml.NVML_CLOCK_SM:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return round(self._metric(gpu.sm_clock_mhz))

    # --- the simulation ---------------------------------------------------------------------------------
    def elapsed_s(self) -> float:
        """Seconds since the simulation started (not quantised)."""
        return self._clock() - self._t0

    def _tick(self) -> int:
        # The sensor's latest update: the grid point at or before now.
        return max(math.floor(self.elapsed_s() / self.update_interval_s + _EDGE_EPS), 0)

    def _grid_s(self, tick: int) -> float:
        # Rounded so that e.g. tick 3 at 0.1 s is 0.3, not 0.30000000000000004, before a trace sees it.
        return round(tick * self.update_interval_s, 9)

    def _gpu(self, handle: SimulatedHandle) -> SimulatedGpu:
        if not isinstance(handle, SimulatedHandle) or not 0 <= handle.index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._check_alive(handle.index)
        return self.gpus[handle.index]

    def _check_alive(self, index: int) -> None:
        fail_after = self.gpus[index].fail_after_s
        if fail_after is not None and self.elapsed_s() >= fail_after:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)

    def _metric(self, metric: Metric) -> float:
        return float(metric(self._grid_s(self._tick()))) if callable(metric) else float(metric)

    def _average_w(self, index: int, tick: int) -> float:
        """Mean power over the trailing window ending at this grid point; before the start the trace is
        taken to have held its t = 0 value (the GPU was idling at that level)."""
        window = max(round(AVERAGE_WINDOW_S / self.update_interval_s), 1)
        first = tick - window
        joules = self._joules(index, tick)
        if first >= 0:
            joules -= self._joules(index, first)
        else:
            joules += self.gpus[index].power_w(0.0) * self._grid_s(-first)
        return joules / self._grid_s(window)

    def _joules(self, index: int, tick: int) -> float:
        power = self.gpus[index].power_w
        if isinstance(power, PowerTrace):
            return power.joules(self._grid_s(tick))
        return self._integrated(index, tick)

    def _integrated(self, index: int, tick: int) -> float:
        # Midpoint rule on _SUBSTEPS steps per grid interval: exact for steps that fall on the substep
        # grid, within 0.1 ms x the jump otherwise, O(h^2) for smooth traces.
        cached = self._joules_at[index]
        power = self.gpus[index].power_w
        h = self.update_interval_s / _SUBSTEPS
        while len(cached) <= tick:
            start = (len(cached) - 1) * self.update_interval_s
            cached.append(cached[-1] + h * sum(power(start + (j + 0.5) * h) for j in range(_SUBSTEPS)))
        return cached[tick]
