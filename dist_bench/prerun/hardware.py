"""1. Hardware: the GPUs this process uses (type, VRAM, count) and the CPU, against what the run expects."""

from __future__ import annotations

from typing import Any

import torch

from dist_bench import environment
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import uuid_key
from dist_bench.prerun.results import HardwareValidation, _describe, _nvml_module

# --- thresholds -------------------------------------------------------------------------------------------
VRAM_TOLERANCE = 0.02  # NVML reports memory after the driver's reservation: an "80GB" H100 shows 79.6 GiB


# --- 1. hardware ----------------------------------------------------------------------------------------
def validate_hardware(
    expected_gpu_type: str | None = None,
    min_vram_gb: float | None = None,
    expected_gpu_count: int | None = None,
    expected_cpu: str | None = None,
    *,
    nvml: Any = None,
) -> HardwareValidation:
    """Compare the GPUs this process uses (one per rank under torchrun) and the CPU with expectations.

    Every expectation not met is a critical warning; with none given, it passes.
    """
    gpus, source, warnings = _process_gpus(nvml)
    cpu = environment.cpu_info().get("model")
    names = [name for name, _ in gpus if name]
    actual_type = ", ".join(dict.fromkeys(names)) or None
    vrams = [vram for _, vram in gpus if vram is not None]
    actual_vram = round(min(vrams), 2) if vrams else None
    critical: list[str] = []

    type_ok = True
    if expected_gpu_type:
        type_ok = bool(gpus) and len(names) == len(gpus)
        type_ok = type_ok and all(expected_gpu_type.lower() in name.lower() for name in names)
        if not type_ok:
            critical.append(
                f"GPU type mismatch: expected {expected_gpu_type!r}, found {actual_type or 'no GPU'}"
            )
    vram_ok = True
    if min_vram_gb is not None:
        vram_ok = actual_vram is not None and actual_vram >= min_vram_gb * (1 - VRAM_TOLERANCE)
        if not vram_ok:
            found = f"{actual_vram:.1f} GiB per GPU" if actual_vram is not None else "no GPU memory figure"
            critical.append(
                f"insufficient VRAM: expected at least {min_vram_gb:g} GiB per GPU, found {found}"
            )
    count_ok = expected_gpu_count is None or len(gpus) == expected_gpu_count
    if not count_ok:
        critical.append(f"GPU count mismatch: expected {expected_gpu_count}, found {len(gpus)}")
    cpu_ok = expected_cpu is None or (cpu is not None and expected_cpu.lower() in cpu.lower())
    if not cpu_ok:
        critical.append(f"CPU mismatch: expected {expected_cpu!r}, found {cpu or 'unknown CPU'}")

    return HardwareValidation(
        actual_gpu_type=actual_type,
        actual_vram_gb=actual_vram,
        actual_gpu_count=len(gpus),
        actual_cpu=cpu,
        gpu_type_matches=type_ok,
        vram_sufficient=vram_ok,
        gpu_count_matches=count_ok,
        cpu_matches=cpu_ok,
        critical_warnings=critical,
        warnings=warnings,
        expected={
            "gpu_type": expected_gpu_type,
            "min_vram_gb": min_vram_gb,
            "gpu_count": expected_gpu_count,
            "cpu": expected_cpu,
        },
        gpu_source=source,
    )


def _process_gpus(nvml: Any) -> tuple[list[tuple[str | None, float | None]], str | None, list[str]]:
    """(name, GiB) of each CUDA device of this process, from NVML, else torch.cuda; where from; warnings."""
    try:
        wanted = [uuid_key(u) for u in gpu_module.torch_cuda_uuids()]
    except Exception as err:
        return [], None, [f"could not list CUDA devices: {_describe(err)}"]
    module, why = _nvml_module(nvml)
    info = environment.gpu_info(module) if module is not None else {"gpus": [], "gpu_note": why}
    by_uuid = {uuid_key(g["uuid"]): g for g in info["gpus"]}
    if not wanted:
        if by_uuid:
            return (
                [],
                None,
                [
                    f"NVML sees {len(by_uuid)} GPU(s) but torch sees none: a CPU-only torch build, "
                    "or CUDA_VISIBLE_DEVICES hides them"
                ],
            )
        return [], None, []
    if all(u in by_uuid for u in wanted):
        found = [by_uuid[u] for u in wanted]
        return [(g["name"], _gib(g["memory_total_mb"])) for g in found], "nvml", []
    warnings = [
        f"NVML could not describe the GPUs ({info.get('gpu_note') or 'UUIDs not found'}): used torch.cuda"
    ]
    try:
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        by_torch = {uuid_key(p.uuid): (p.name, p.total_memory / 2**30) for p in props}
        return [by_torch.get(u, (None, None)) for u in wanted], "torch", warnings
    except Exception as err:
        return [(None, None)] * len(wanted), None, [*warnings, f"torch.cuda failed too: {_describe(err)}"]


def _gib(mib: float | None) -> float | None:
    return mib / 1024 if mib is not None else None
