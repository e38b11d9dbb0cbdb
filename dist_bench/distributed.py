"""Several processes, one pipeline: `dist-bench <pipeline> --nproc N`, torchrun, accelerate launch, srun.

Every process runs the same pipeline code. Rank 0 alone talks to the MLflow tracking server: it opens the
parent and the stage runs, decides whether a stage is reused, and logs; the other ranks follow its
decisions (`broadcast`) and do their part of each stage's work. A data-parallel stage splits its work
units by rank (`my_share`) so that the files it writes are the same bytes whatever the world size; every
rank's energy is gathered into the stage's figure (energy/distributed.py).

The process group is torch.distributed's, set up from the environment torchrun (and accelerate, and our
`launch`) provides: NCCL where the ranks use CUDA, gloo otherwise (the CPU tests). Without it, every
function here is the single-process identity, so one-process runs pay nothing.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600


_alone = False  # set while rank 0 runs a stage by itself (alone())


def _group() -> Any | None:
    """torch.distributed when a process group of more than one rank is up, else None."""
    import torch.distributed as dist

    if _alone:
        return None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def rank() -> int:
    dist = _group()
    return dist.get_rank() if dist else 0


def world_size() -> int:
    dist = _group()
    return dist.get_world_size() if dist else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Whether this process is one rank of a launcher's job (torchrun, accelerate, srun + torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def one_gpu_per_process() -> str | None:
    """A plain one-process run uses one GPU, cuda:0 (every stage's `cuda`): hide the others before CUDA
    starts. Otherwise transformers' Trainer wraps the student in nn.DataParallel when one process sees
    several GPUs (TRL's trainers refuse it, as the TRL error says: launch with torchrun or make one GPU
    visible), and the stage's energy would add the idle neighbours' draw. Returns the CUDA_VISIBLE_DEVICES
    it set, or None (a rank of a launched job, one GPU or none, or CUDA already started)."""
    torch = sys.modules.get("torch")
    if launched() or (torch is not None and torch.cuda.is_initialized()):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [part.strip() for part in visible.split(",") if part.strip()]
        if len(ids) <= 1:
            return None
        first = ids[0]
    else:
        if _nvml_gpu_count() <= 1:
            return None
        first = "0"  # CUDA's device 0 in its own order: the GPU cuda:0 would have been
    os.environ["CUDA_VISIBLE_DEVICES"] = first
    return first


def _nvml_gpu_count() -> int:
    # NVML, not torch.cuda.device_count(): the CUDA driver reads CUDA_VISIBLE_DEVICES once, when it starts.
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no NVML: no GPU to hide
        return 0


def init_from_env(device: str) -> None:
    """Join the launcher's process group (once): NCCL when `device` (train.device) puts ranks on CUDA GPUs,
    each on GPU LOCAL_RANK; gloo otherwise."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(threads_per_rank())
    # The other ranks wait in a collective while rank 0 runs a stage alone (eval, tracking), which can take
    # hours: the default 10-30 minutes would end the job. A failed rank still ends them all: the launcher
    # (torchrun's agent, srun) stops every rank when one exits with an error.
    dist.init_process_group(
        "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    atexit.register(close)


def threads_per_rank() -> int:
    """CPU threads for this rank's torch work: OMP_NUM_THREADS where the user or launcher set it (torchrun
    sets 1), else this host's cores shared among its ranks. Left to torch, every rank starts a thread per
    core, and CPU work on the training step's path (the KD collator decodes the teacher cache) then runs
    oversubscribed: OpenMP's spinning workers wait for each other's descheduled threads."""
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def close() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(value: T | None) -> T:
    """Rank 0's value on every rank (what the others pass is ignored): a decision only rank 0 can make."""
    dist = _group()
    if dist is None:
        return value  # type: ignore[return-value]
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]


def all_gather(value: T) -> list[T]:
    """Every rank's value, in rank order, on every rank ([value] in one process)."""
    dist = _group()
    if dist is None:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    dist = _group()
    if dist is not None:
        dist.barrier()


def my_share(items: Sequence[T]) -> list[T]:
    """This rank's work units: every world_size-th, from its rank on. The units and what each writes do
    not depend on the world size, only who computes them."""
    return list(items[rank() :: world_size()])


def step_split(batch: int, accumulation: int, ranks: int) -> tuple[int, int]:
    """(sequences per micro-batch, micro-batches per optimizer step) for each of `ranks` data-parallel
    training ranks, so that an optimizer step is the plan's (train.batch_size x train.grad_accum
    sequences) whatever the number of ranks: fewer accumulation steps where they divide, else smaller
    micro-batches. The plan's order is cut into micro-batches of that size and the ranks take them in turn
    (accelerate's sharding of the trainer's DataLoader), so one step's ranks see exactly the plan's step."""
    if accumulation % ranks == 0:
        return batch, accumulation // ranks
    if batch % ranks == 0:
        return batch // ranks, accumulation
    raise ValueError(
        f"train.batch_size {batch}, train.grad_accum {accumulation}: {ranks} processes divide neither, so "
        "they cannot share an optimizer step evenly"
    )


@contextmanager
def alone() -> Iterator[None]:
    """Rank 0 working by itself (a stage that is not data-parallel, while the others wait): inside, the
    functions here act as in a one-process run, so a shared helper (my_share, broadcast) does not wait for
    ranks that are not there."""
    global _alone
    before, _alone = _alone, True
    try:
        yield
    finally:
        _alone = before


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m dist_bench <argv>` as `nproc` ranks on this host (torch.distributed.run, the engine
    torchrun is) and wait: the exit code is the first failed rank's, 0 when all succeed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dist-bench-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",  # a free port, as torchrun --standalone
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "dist_bench", *argv)
    except ChildFailedError as failed:
        codes = [f.exitcode for _, f in sorted(failed.failures.items())]
        return next((code for code in codes if code not in (0, None)), 1)
    return 0
