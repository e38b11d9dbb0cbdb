"""All the checks together: run_prerun_validation and quick_validation write and return the PrerunReport;
summary_text puts it on the terminal. The quick-mode durations and the report's file name live here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dist_bench import environment
from dist_bench.config import EnergyConfig
from dist_bench.prerun.burn_in import run_burn_in_test
from dist_bench.prerun.hardware import validate_hardware
from dist_bench.prerun.idle import measure_idle_baseline
from dist_bench.prerun.results import (
    CPU_MODEL,
    FULL_MODEL,
    IDLE_POLL_INTERVAL_MS,
    SAMPLING_DURATION_S,
    SAMPLING_INTERVALS_MS,
    PrerunReport,
    _nvml_module,
    _size_text,
    _write_json,
)
from dist_bench.prerun.sampling import validate_sampling_interval

# --- durations ----------------------------------------------------------------------------------------------
# quick=True: 10 s idle, 50 burn-in steps (FULL_MODEL on a GPU, CPU_MODEL on CPU), 15 s of sampling with
# 5 s instead of 15 s as the long interval, so that it still gets three periods.
QUICK_IDLE_MINUTES = 10 / 60
QUICK_BURN_IN_STEPS = 50
QUICK_SAMPLING_DURATION_S = 15.0
QUICK_SAMPLING_INTERVALS_MS = (100, 1000, 5000)

REPORT_FILE = "prerun_validation_report.json"


# --- all together ---------------------------------------------------------------------------------------
def run_prerun_validation(
    output_dir: str | Path = "./prerun_validation",
    idle_duration_minutes: float = 5.0,
    burn_in_steps: int = 500,
    expected_gpu_type: str | None = None,
    expected_vram_gb: float | None = None,
    expected_gpu_count: int | None = None,
    expected_cpu: str | None = None,
    skip_idle: bool = False,
    skip_burn_in: bool = False,
    skip_sampling: bool = False,
    quick: bool = False,
    *,
    energy_cfg: EnergyConfig | None = None,
    nvml: Any = None,
) -> PrerunReport:
    """Run the checks (hardware, idle, burn-in, sampling), write prerun_validation_report.json, return it.

    quick=True replaces the durations (idle_duration_minutes and burn_in_steps are then ignored): idle
    QUICK_IDLE_MINUTES (10 s), QUICK_BURN_IN_STEPS (50) steps, QUICK_SAMPLING_DURATION_S (15 s) at
    QUICK_SAMPLING_INTERVALS_MS (100 ms, 1 s, 5 s). Otherwise sampling runs SAMPLING_DURATION_S (60 s) at
    SAMPLING_INTERVALS_MS (100 ms, 1 s, 15 s). The burn-in model is FULL_MODEL (the seed's 1024 x 12) on a
    GPU and CPU_MODEL (128 x 2) without CUDA, quick or not. A check that crashes is a critical
    finding, not an exception: the report is always written.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Quick keeps the full-size model on a GPU: 50 steps of it last ~1.4 s on an H200, so the window spans
    # enough counter updates; a smaller model finished in 0.5 s there (flagged below_resolution, 10% busy).
    size = CPU_MODEL if device == "cpu" else FULL_MODEL
    settings: dict[str, Any] = {
        "quick": quick,
        "idle_duration_minutes": QUICK_IDLE_MINUTES if quick else idle_duration_minutes,
        "idle_poll_interval_ms": IDLE_POLL_INTERVAL_MS,
        "burn_in_steps": QUICK_BURN_IN_STEPS if quick else burn_in_steps,
        "burn_in_device": device,
        "burn_in_model": dataclasses.asdict(size),
        "sampling_duration_s": QUICK_SAMPLING_DURATION_S if quick else SAMPLING_DURATION_S,
        "sampling_intervals_ms": list(QUICK_SAMPLING_INTERVALS_MS if quick else SAMPLING_INTERVALS_MS),
    }
    findings: list[tuple[str, str]] = []  # (check, critical warning)
    warnings: list[str] = []
    skips = {"idle_baseline": skip_idle, "burn_in": skip_burn_in, "sampling_validation": skip_sampling}
    skipped = [name for name, skip in skips.items() if skip]

    def attempt(name: str, check: Callable[[], Any]) -> Any:
        try:
            result = check()
        except Exception as err:  # a check that breaks must fail the gate, not hide the other checks
            findings.append((name, f"check crashed: {type(err).__name__}: {err}"))
            return None
        findings.extend((name, text) for text in result.critical_warnings)
        warnings.extend(f"{name}: {text}" for text in result.warnings)
        return result

    hardware = attempt(
        "hardware",
        lambda: validate_hardware(
            expected_gpu_type, expected_vram_gb, expected_gpu_count, expected_cpu, nvml=nvml
        ),
    )
    # Idle before any work of ours: a GPU still warm from the burn-in would read high.
    idle = None
    if not skip_idle:
        idle = attempt(
            "idle_baseline",
            lambda: measure_idle_baseline(
                settings["idle_duration_minutes"], IDLE_POLL_INTERVAL_MS, root / "idle_baseline", nvml=nvml
            ),
        )
    burn_in = None
    if not skip_burn_in:
        if device == "cpu" and not quick:
            warnings.append(f"burn_in: no CUDA device: the small CPU model ({_size_text(size)}) stands in")
        burn_in = attempt(
            "burn_in",
            lambda: run_burn_in_test(
                root / "burn_in",
                settings["burn_in_steps"],
                size.batch_size,
                size.model_dim,
                size.num_layers,
                size.seq_len,
                device,
                vocab_size=size.vocab_size,
                energy_cfg=energy_cfg,
                nvml=nvml,
            ),
        )
    sampling = None
    if not skip_sampling:
        sampling = attempt(
            "sampling_validation",
            lambda: validate_sampling_interval(
                root / "sampling_validation",
                settings["sampling_duration_s"],
                settings["sampling_intervals_ms"],
                nvml=nvml,
            ),
        )

    critical = _merge_findings(findings)
    module, _ = _nvml_module(nvml)
    report = PrerunReport(
        all_checks_passed=not critical,
        critical_warnings=critical,
        warnings=warnings,
        hardware_validation=hardware,
        idle_baseline=idle,
        burn_in=burn_in,
        sampling_validation=sampling,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        environment=environment.snapshot(module),
        output_dir=str(root),
        settings=settings,
        skipped=skipped,
    )
    _write_json(root / REPORT_FILE, report.to_dict())
    return report


def quick_validation(output_dir: str | Path = "./prerun_validation", *, nvml: Any = None) -> bool:
    """run_prerun_validation(quick=True): True when no check found anything critical."""
    return run_prerun_validation(output_dir=output_dir, quick=True, nvml=nvml).all_checks_passed


def _merge_findings(findings: list[tuple[str, str]]) -> list[str]:
    # One NVML failure breaks several checks with the same message: say it once, naming them all.
    checks: dict[str, list[str]] = {}
    for check, text in findings:
        checks.setdefault(text, []).append(check)
    return [f"{', '.join(dict.fromkeys(names))}: {text}" for text, names in checks.items()]


def summary_text(report: PrerunReport) -> str:
    """A few lines for the terminal: the verdict, one line per check, then every warning."""
    lines = [f"Pre-run validation: {'PASSED' if report.all_checks_passed else 'FAILED'}"]
    hw = report.hardware_validation
    if hw is not None:
        vram = f", {hw.actual_vram_gb:.1f} GiB" if hw.actual_vram_gb is not None else ""
        lines.append(
            f"  hardware: {hw.actual_gpu_count} x {hw.actual_gpu_type or 'no GPU'}{vram}; CPU {hw.actual_cpu}"
        )
    idle = report.idle_baseline
    if idle is not None:
        if idle.gpu_avg_power_watts is None:
            lines.append("  idle baseline: not measured (no GPU)")
        else:
            std = f", std {idle.gpu_std_power_watts:.1f} W" if idle.gpu_std_power_watts is not None else ""
            lines.append(
                f"  idle baseline: {idle.gpu_avg_power_watts:.1f} W{std} over {idle.duration_s:.0f} s"
            )
    burn = report.burn_in
    if burn is not None:
        rate = f"{burn.tokens_per_second:,.0f} tokens/s" if burn.tokens_per_second else "no throughput"
        lines.append(
            f"  burn-in: {burn.num_steps} steps on {burn.device}, {rate}, "
            f"energy logs {'valid' if burn.energy_logs_valid else 'INVALID'}"
        )
    sampling = report.sampling_validation
    if sampling is not None:
        if sampling.converged is None:
            lines.append("  sampling: not validated (no GPU energy counter)")
        else:
            verdict = "converged" if sampling.converged else "NOT converged"
            lines.append(f"  sampling: {verdict}; recommended interval {sampling.recommended_interval_ms} ms")
    if report.skipped:
        lines.append(f"  skipped: {', '.join(report.skipped)}")
    lines += [f"CRITICAL: {text}" for text in report.critical_warnings]
    lines += [f"warning: {text}" for text in report.warnings]
    lines.append(f"report: {Path(report.output_dir) / REPORT_FILE}")
    return "\n".join(lines)
