"""Validate the energy tracker on a real GPU; writes JSON under --out. Results: docs/benchmarks.md.

    python bench/energy_validation.py --out $OUT                 # on the GPU machine
    python bench/energy_validation.py --out /tmp/ev --simulate   # plumbing check on CPU (simulated NVML)

(a) bursty load (0.3 s of bf16 matmuls, 0.3 s idle, repeated): the tracker's stage energy against a raw
    counter read outside the tracker, and against power integration at 10 ms, 100 ms, 500 ms and 1 s
    (four samplers polling during the same window);
(b) overhead: tokens/s of a real transformers training loop with the tracker on and off, same process,
    alternating segments, median of the pairs;
(c) idle baseline: repeated idle windows, their mean power and spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dist_bench.config import EnergyConfig
from dist_bench.energy import gpu as gpu_module
from dist_bench.energy.sampler import PowerSampler, integrate_energy_j
from dist_bench.energy.window import EnergyWindow

INTERVALS_S = (0.01, 0.1, 0.5, 1.0)


def bursty(seconds: float, device: torch.device, size: int) -> None:
    """0.3 s of back-to-back matmuls, 0.3 s idle: the load that defeats slow power polling."""
    a = torch.randn(
        size, size, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        burst_end = time.perf_counter() + 0.3
        while time.perf_counter() < burst_end:
            a @ a  # the work is the point
            if device.type == "cuda":
                torch.cuda.synchronize()
        time.sleep(0.3)


def raw_counter_mj(nvml: Any, handle: Any) -> int:
    return nvml.nvmlDeviceGetTotalEnergyConsumption(handle)


def part_a(
    nvml: Any, handle: Any, name: str, device: torch.device, seconds: float, size: int, out: Path
) -> dict:
    cfg = EnergyConfig(codecarbon=False, sample_interval_ms=100)
    samplers = {interval: PowerSampler(nvml, [handle], [name], interval) for interval in INTERVALS_S}
    before = raw_counter_mj(nvml, handle)
    window = EnergyWindow(cfg, out / "a", "bursty", nvml=nvml)
    with window:
        for sampler in samplers.values():
            sampler.start()
        bursty(seconds, device, size)
        series = {interval: sampler.stop() for interval, sampler in samplers.items()}
    after = raw_counter_mj(nvml, handle)
    raw_j = (after - before) / 1000
    reading = window.reading
    result = {
        "seconds": reading.duration_s,
        "raw_counter_j": raw_j,
        "tracker_gpu_energy_j": reading.gpu_energy_j,
        "tracker_vs_raw": _rel(reading.gpu_energy_j, raw_j),
        "tracker_integrated_100ms_j": reading.gpu_integrated_j,
        "tracker_uncertainty_j": reading.gpu_uncertainty_j,
        "power_method": reading.power_method,
        "flags": list(reading.flags),
        "avg_power_w": reading.avg_power_w,
        "peak_power_w": reading.peak_power_w,
        "integration": {},
    }
    for interval, samples in series.items():
        energy = integrate_energy_j(samples, 0)
        result["integration"][f"{interval * 1000:g}ms"] = {
            "energy_j": energy,
            "vs_tracker_counter": _rel(energy, reading.gpu_energy_j),
            "samples": len(samples),
        }
    return result


def part_b(device: torch.device, pairs: int, steps: int, simulate_nvml: Any) -> dict:
    """Same model, same data, alternating tracker off/on segments; tokens/s inside each segment."""
    from transformers import LlamaConfig, LlamaForCausalLM

    small = device.type != "cuda"
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256 if small else 1024,
        intermediate_size=688 if small else 2816,
        num_hidden_layers=2 if small else 12,
        num_attention_heads=4 if small else 16,
        num_key_value_heads=4 if small else 16,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch, seq = (2, 128) if small else (8, 1024)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def train(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n * batch * seq / (time.perf_counter() - start)

    train(5)  # warm-up: kernels selected, allocator settled
    cfg = EnergyConfig()  # as in a real stage: sampler, counter and CodeCarbon's thread all running
    ratios, off, on = [], [], []
    for pair in range(pairs):
        # Alternate which goes first, so drift (clocks, temperature) does not favour one side.
        order = ("off", "on") if pair % 2 == 0 else ("on", "off")
        rates = {}
        for mode in order:
            if mode == "off":
                rates[mode] = train(steps)
            else:
                with EnergyWindow(cfg, Path("/tmp/ev-overhead"), "train", nvml=simulate_nvml):
                    rates[mode] = train(steps)
        off.append(rates["off"])
        on.append(rates["on"])
        ratios.append(rates["on"] / rates["off"])
    return {
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens_per_step": batch * seq,
        "steps_per_segment": steps,
        "pairs": pairs,
        "tokens_per_s_off": off,
        "tokens_per_s_on": on,
        "ratio_on_over_off_median": statistics.median(ratios),
        "ratios": ratios,
    }


def part_c(nvml: Any, handle: Any, name: str, windows: int, seconds: float) -> dict:
    watts = []
    for _ in range(windows):
        sampler = PowerSampler(nvml, [handle], [name], 0.1)
        before = raw_counter_mj(nvml, handle)
        sampler.start()
        time.sleep(seconds)
        samples = sampler.stop()
        watts.append((raw_counter_mj(nvml, handle) - before) / 1000 / seconds)
        instant_std = statistics.pstdev(s.power_w for s in samples)
    return {
        "window_s": seconds,
        "idle_w_per_window": watts,
        "mean_w": statistics.mean(watts),
        "std_w": statistics.pstdev(watts),
        "last_window_instant_power_std_w": instant_std,
    }


def _rel(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference - 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--simulate", action="store_true", help="CPU + simulated NVML: checks the script only"
    )
    parser.add_argument("--bursty-s", type=float, default=30.0)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    if args.simulate:
        from dist_bench.energy.nvml_sim import SimulatedGpu, SimulatedNvml, square_wave

        nvml: Any = SimulatedNvml(SimulatedGpu("GPU-sim", "simulated", 80000, square_wave(700, 70, 0.6, 0.5)))
        gpu_module.torch_cuda_uuids = lambda: ["sim"]  # what torch would report for that device
        device, size = torch.device("cpu"), 256
        args.bursty_s, args.pairs, args.steps = (
            min(args.bursty_s, 3.0),
            min(args.pairs, 2),
            min(args.steps, 3),
        )
    else:
        import pynvml as nvml

        device, size = torch.device("cuda"), 8192
    nvml.nvmlInit()
    counter = gpu_module.GpuEnergyCounter(nvml)
    counter.start()
    _, handles, names = counter.devices
    counter.stop()
    nvml.nvmlInit()  # counter.stop() released its reference; keep one for the raw reads
    handle, name = handles[0], names[0]

    result = {"gpu": name, "torch": torch.__version__, "simulated": args.simulate}
    result["c_idle"] = part_c(nvml, handle, name, windows=5, seconds=3.0 if not args.simulate else 0.5)
    result["a_bursty"] = part_a(nvml, handle, name, device, args.bursty_s, size, args.out)
    result["b_overhead"] = part_b(device, args.pairs, args.steps, nvml if args.simulate else None)
    (args.out / "energy_validation.json").write_text(json.dumps(result, indent=2))
    a, b, c = result["a_bursty"], result["b_overhead"], result["c_idle"]
    print(json.dumps({
        "tracker_vs_raw": a["tracker_vs_raw"],
        "integration_vs_counter": {k: v["vs_tracker_counter"] for k, v in a["integration"].items()},
        "flags": a["flags"],
        "throughput_ratio_median": b["ratio_on_over_off_median"],
        "idle_mean_w": c["mean_w"],
        "idle_std_w": c["std_w"],
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
