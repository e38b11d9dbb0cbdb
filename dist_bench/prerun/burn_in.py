"""3. Burn-in: a small transformer trained on random tokens inside an EnergyWindow, to prove the energy logs
get written with non-zero figures and that throughput and GPU utilisation are sane."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dist_bench.config import EnergyConfig
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.gpu import uuid_key
from dist_bench.energy.outputs import StageSeries, write_timeline_csv
from dist_bench.energy.sampler import Sample
from dist_bench.energy.window import EnergyWindow, stage_metrics
from dist_bench.prerun.results import (
    CPU_MODEL,
    FULL_MODEL,
    BurnInResult,
    ModelSize,
    _gpu_visible,
    _nvml_failure,
    _size_text,
    _write_json,
)

# --- thresholds -------------------------------------------------------------------------------------------
LOW_UTILIZATION_PCT = 50.0

# Throughput sanity range of the burn-in, from its FLOPs per step. The floor is far below any healthy
# device (an H100 does ~989 dense bf16 TFLOP/s, plain PyTorch training reaches ~20% of it); the per-step
# overhead allowance keeps tiny models, which are launch/Python bound, above the floor. Above the ceiling
# the timing itself is wrong (e.g. asynchronous CUDA work not synchronised).
FLOOR_FLOPS = {"cuda": 5e12, "cpu": 1e9}
STEP_OVERHEAD_S = {"cuda": 0.05, "cpu": 0.25}
CEILING_FLOPS = {"cuda": 5e15, "cpu": 5e13}

BURN_IN_STAGE = "burn_in"
BURN_IN_WARMUP_STEPS = 2  # allocator, cuBLAS handles, optimizer state: not part of the measured window
BURN_IN_LR = 1e-4


# --- 3. burn-in -----------------------------------------------------------------------------------------
class BurnInModel(nn.Module):
    """Embedding, a causal stack of nn.TransformerEncoderLayer, LM head: the shape of a small LM."""

    def __init__(self, vocab_size: int, model_dim: int, num_layers: int) -> None:
        super().__init__()
        heads = model_dim // 64 if model_dim % 64 == 0 else 1
        layer = nn.TransformerEncoderLayer(
            model_dim, heads, 4 * model_dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(self.embed(tokens), mask=mask, is_causal=True)
        return self.head(self.norm(hidden))


def run_burn_in_test(
    output_dir: str | Path,
    num_steps: int = 500,
    batch_size: int = FULL_MODEL.batch_size,
    model_dim: int = FULL_MODEL.model_dim,
    num_layers: int = FULL_MODEL.num_layers,
    seq_len: int = FULL_MODEL.seq_len,
    device: str | None = None,
    *,
    vocab_size: int = FULL_MODEL.vocab_size,
    energy_cfg: EnergyConfig | None = None,
    nvml: Any = None,
) -> BurnInResult:
    """Train a dummy model on random tokens (nothing is learnt) inside an EnergyWindow and check its logs.

    Writes `output_dir/energy_logs/stage_burn_in.json`. `device` None: cuda when available, else cpu.
    `energy_cfg` None: EnergyConfig() (CodeCarbon on: the only CPU figure where RAPL is unreadable).
    """
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    logs = Path(output_dir) / "energy_logs"
    logs.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shrunk = None
    if dev.type == "cpu" and model_dim * num_layers > CPU_MODEL.model_dim * CPU_MODEL.num_layers:
        # A GPU-sized burn-in (the seed's 2048 x 24 is 1.2 B parameters) would take hours and most of the
        # memory of a CPU-only machine: check the logging path with the small model instead, and say so.
        shrunk = f"no GPU: burn-in used the CPU model {_size_text(CPU_MODEL)} instead of {model_dim} x {num_layers}"
        model_dim, num_layers, seq_len, vocab_size = (
            CPU_MODEL.model_dim,
            CPU_MODEL.num_layers,
            CPU_MODEL.seq_len,
            CPU_MODEL.vocab_size,
        )
    size = ModelSize(model_dim, num_layers, seq_len, batch_size, vocab_size)
    model = BurnInModel(vocab_size, model_dim, num_layers).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=BURN_IN_LR)
    mask = nn.Transformer.generate_square_subsequent_mask(seq_len, device=dev)
    bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()

    def step() -> torch.Tensor:
        tokens = torch.randint(0, vocab_size, (batch_size, seq_len + 1), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1], mask)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab_size), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()  # no .item(): a sync per step would change what is being measured

    for _ in range(BURN_IN_WARMUP_STEPS):
        step()
    window = EnergyWindow(energy_cfg or EnergyConfig(), logs, BURN_IN_STAGE, nvml=nvml)
    with window:
        for _ in range(num_steps):
            loss = step()
    reading = window.reading
    assert reading is not None  # set by the window's exit, also when measuring failed
    final_loss = float(loss)
    tokens = num_steps * batch_size * seq_len
    metrics = stage_metrics(reading, tokens)
    avg_util = _utilization(window.samples, _sampler_index(dev))
    params = sum(p.numel() for p in model.parameters())
    model_info = {**dataclasses.asdict(size), "parameters": params}

    path = logs / f"stage_{BURN_IN_STAGE}.json"
    _write_json(
        path,
        {
            "stage": BURN_IN_STAGE,
            "started_at": _iso(window.started_at),
            "ended_at": _iso(window.ended_at),
            "duration_seconds": reading.duration_s,
            "device": str(dev),
            "num_steps": num_steps,
            "model": model_info,
            "tokens_processed": tokens,
            "tokens_per_second": metrics.get("tokens_per_s"),
            "gpu_energy_joules": reading.gpu_energy_j,
            "cpu_energy_joules": reading.cpu_energy_j,
            "ram_energy_joules": reading.ram_energy_j,
            "total_energy_joules": reading.total_energy_j,
            "total_energy_kwh": metrics.get("total_energy_kwh"),
            "joules_per_token": metrics.get("j_per_token"),
            "co2e_kg": reading.co2e_kg,
            "avg_gpu_utilization_pct": avg_util,
            "final_loss": final_loss if math.isfinite(final_loss) else None,
            "energy_sources": {
                "gpu": reading.gpu_source,
                "cpu": reading.cpu_source,
                "ram": reading.ram_source,
            },
            "energy_notes": reading.notes,
            "energy": reading.to_dict(),
            "metrics": metrics,
        },
    )
    if window.samples and window.started_at is not None and window.ended_at is not None:
        series = StageSeries(BURN_IN_STAGE, window.started_at, window.ended_at, window.samples)
        write_timeline_csv(series, logs / "power_timeline.csv")

    # Judge what was logged, read back from the file, not what is in memory: that is what later runs use.
    logged = _read_json(path)
    valid, warnings = _check_energy_log(logged, path)
    critical: list[str] = []
    gpu_present = _gpu_visible()
    if reading.gpu_energy_j is None:
        why = reading.notes.get("gpu", "not measured")
        if gpu_present:
            critical.append(_nvml_failure(why))
        else:
            warnings.append(
                f"GPU energy unavailable ({why}): the burn-in ran on {dev} and checks the logging path only"
            )
    if not valid and gpu_present:
        critical.append(f"energy logs invalid: {path}")
    if shrunk:
        warnings.append(shrunk)
    if reading.cpu_source == "estimated":
        warnings.append(f"CPU/RAM energy is an estimate: {reading.notes.get('cpu', 'CodeCarbon')}")
    if reading.flags:
        flagged = [f"{flag} ({_flag_note(reading.notes, flag)})" for flag in reading.flags]
        warnings.append(f"energy flags: {', '.join(flagged)}")

    expected = _expected_throughput(params, size, dev.type)
    tokens_per_s = metrics.get("tokens_per_s")
    if tokens_per_s is not None and tokens_per_s < expected["min"]:
        warnings.append(
            f"low throughput: {tokens_per_s:,.0f} tokens/s below the floor of {expected['min']:,.0f} "
            f"({FLOOR_FLOPS[dev.type]:.0e} FLOP/s plus {STEP_OVERHEAD_S[dev.type]:g} s per step on {dev.type}): "
            "device not used properly? check CUDA installation and GPU availability"
        )
    if tokens_per_s is not None and tokens_per_s > expected["max"]:
        warnings.append(
            f"implausible throughput: {tokens_per_s:,.0f} tokens/s above {expected['max']:,.0f} "
            f"({CEILING_FLOPS[dev.type]:.0e} FLOP/s): the timing misses work (unsynchronised CUDA?)"
        )
    if dev.type == "cuda" and avg_util is not None and avg_util < LOW_UTILIZATION_PCT:
        warnings.append(
            f"GPU utilisation {avg_util:.0f}% < {LOW_UTILIZATION_PCT:g}%: the GPU waits on the host "
            "(Python overhead, a model too small) or shares with another process"
        )
    if not math.isfinite(final_loss):
        warnings.append(f"loss is {final_loss}: broken numerics on {dev}")

    return BurnInResult(
        energy_logs_valid=valid,
        gpu_energy_joules=reading.gpu_energy_j,
        cpu_energy_joules=reading.cpu_energy_j,
        tokens_processed=tokens,
        tokens_per_second=tokens_per_s,
        avg_gpu_utilization_pct=avg_util,
        num_steps=num_steps,
        device=str(dev),
        warnings=warnings,
        critical_warnings=critical,
        ram_energy_joules=reading.ram_energy_j,
        duration_s=reading.duration_s,
        expected_tokens_per_second=expected,
        model=model_info,
        final_loss=final_loss if math.isfinite(final_loss) else None,
        energy_log=str(path),
    )


def _sampler_index(dev: torch.device) -> int | None:
    """Which of the measured GPUs is `dev`: the window samples every GPU of this process, in the order of
    torch_cuda_uuids, and the other GPUs of a multi-GPU machine idle through a one-device burn-in."""
    if dev.type != "cuda":
        return None
    try:
        uuids = [uuid_key(u) for u in gpu_module.torch_cuda_uuids()]
        return uuids.index(uuid_key(torch.cuda.get_device_properties(dev).uuid))
    except Exception:  # not found (a device outside the measured set): average over all of them
        return None


def _utilization(samples: list[Sample], gpu: int | None) -> float | None:
    values = [s.utilization_pct for s in samples if s.utilization_pct is not None and gpu in (None, s.gpu)]
    return sum(values) / len(values) if values else None


def _check_energy_log(logged: dict[str, Any] | None, path: Path) -> tuple[bool, list[str]]:
    """Valid: the file reads back, at least one energy component is in it, and none measured is <= 0."""
    if logged is None:
        return False, [f"energy log {path} missing or unreadable"]
    components = {c: logged.get(f"{c}_energy_joules") for c in ("gpu", "cpu", "ram")}
    measured = {c: v for c, v in components.items() if v is not None}
    if not measured:
        notes = logged.get("energy_notes", {})
        why = "; ".join(f"{c}: {notes[c]}" for c in ("gpu", "cpu") if c in notes) or "no meter"
        return False, [f"no energy component measured ({why})"]
    zero = [f"{c} {v} J" for c, v in measured.items() if v <= 0]
    if zero:
        return False, [
            f"energy logged as zero ({', '.join(zero)}): NVML may lack permission to read power "
            "(check nvidia-smi -q -d POWER)"
        ]
    return True, []


def _expected_throughput(params: int, size: ModelSize, device_type: str) -> dict[str, float]:
    """Tokens/s range: training costs ~6 FLOPs per parameter per token, plus attention's 12 L T d."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    tokens_per_step = size.batch_size * size.seq_len
    flops_per_step = (6 * params + 12 * size.num_layers * size.seq_len * size.model_dim) * tokens_per_step
    floor_s = flops_per_step / FLOOR_FLOPS[kind] + STEP_OVERHEAD_S[kind]
    return {"min": tokens_per_step / floor_s, "max": tokens_per_step * CEILING_FLOPS[kind] / flops_per_step}


def _flag_note(notes: dict[str, str], flag: str) -> str:
    key = {"below_resolution": "gpu_resolution", "counter_integration_mismatch": "gpu_cross_check"}.get(flag)
    return notes.get(key or "", "see the stage log")


# --- helpers --------------------------------------------------------------------------------------------
def _iso(epoch_s: float | None) -> str | None:
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
