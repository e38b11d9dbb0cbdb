"""One stage figure from all the processes of a distributed job (torchrun, accelerate).

Each rank measures the GPUs it uses (gpu.torch_cuda_uuids) and its host's CPU/RAM. On rank 0 the stage's
energy is the sum over distinct GPUs (by UUID: two ranks sharing a GPU count it once) plus, per host, one
host's CPU/RAM (every rank on a host sees the same package and DRAM energy, so adding them would count the
host once per rank). Durations are wall time: the longest rank's. Without an initialised process group
this is the identity, so single-process runs never pay for it.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # window.py imports this module
    from dist_bench.energy.window import EnergyReading


def align_ranks() -> None:
    """Wait until every rank of the job is here (a barrier; nothing in one process or on rank 0 alone).

    A stage window opens and closes at one instant on every rank, so that each GPU is measured over the
    stage's whole span: a rank that finishes its share first (or follows rank 0's stage) still holds its GPU
    for the job, drawing power, until the last rank is done. Without it the stage missed that draw (1% of
    a 2-GPU training stage on H200s: rank 0 also writes the final model)."""
    from dist_bench import distributed

    distributed.barrier()


def combine_ranks(reading: EnergyReading) -> EnergyReading:
    """Called by every rank at the end of a stage window (a collective); rank 0 gets the combined figure."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return reading
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"host": socket.gethostname(), "reading": reading.to_dict()})
    return merge([(part["host"], type(reading).from_dict(part["reading"])) for part in gathered])


def merge(parts: list[tuple[str, EnergyReading]]) -> EnergyReading:
    """Rank readings (with their hostnames) -> the stage's reading."""
    first = parts[0][1]
    per_gpu: dict[str, float] = {}
    for _, reading in parts:
        per_gpu.update(reading.per_gpu_j)  # same UUID from two ranks: the same counter, counted once
        if not reading.per_gpu_j and reading.gpu_energy_j is not None and reading.gpus:
            # integrated power (no energy counter): one figure for the rank's GPUs, keyed by their names
            per_gpu[", ".join(reading.gpus)] = reading.gpu_energy_j
    gpu_measured = all(r.gpu_energy_j is not None for _, r in parts if r.gpus)
    hosts: dict[str, EnergyReading] = {}
    for host, reading in parts:
        hosts.setdefault(host, reading)  # one rank's CPU/RAM per host
    cpu = [r.cpu_energy_j for r in hosts.values()]
    ram = [r.ram_energy_j for r in hosts.values()]
    notes = dict(first.notes)
    for _, reading in parts[1:]:
        for component, text in reading.notes.items():
            notes.setdefault(component, text)
    return dataclasses.replace(
        first,
        duration_s=max(r.duration_s for _, r in parts),
        gpu_energy_j=sum(per_gpu.values()) if per_gpu and gpu_measured else None,
        per_gpu_j=per_gpu,
        cpu_energy_j=sum(cpu) if all(v is not None for v in cpu) else None,  # type: ignore[arg-type]
        ram_energy_j=sum(ram) if all(v is not None for v in ram) else None,  # type: ignore[arg-type]
        gpus=tuple(dict.fromkeys(g for _, r in parts for g in r.gpus)),
        notes=notes,
        co2e_kg=None,  # recomputed by the caller from the combined energy
    )
