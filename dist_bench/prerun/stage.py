"""The checks as the pipeline's `prerun` stage: an energy-tracked MLflow child run whose idle baseline feeds
the net energy of the stages after it, and whose failure stops the pipeline when the check is required."""

from __future__ import annotations

from pathlib import Path

import mlflow

from dist_bench.config import flatten
from dist_bench.prerun.results import PrerunFailed, PrerunReport
from dist_bench.prerun.validation import run_prerun_validation
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

# --- as a pipeline stage ----------------------------------------------------------------------------------
STAGE = "prerun"


def run_stage(parent: ParentRun, output_dir: Path | None = None) -> tuple[StageResult, PrerunReport]:
    """Pre-run validation as the `prerun` stage: an energy-tracked child run whose idle baseline feeds the
    net energy of the stages after it. Never reused: it measures the machine as it is now."""
    cfg = parent.cfg.prerun
    params = flatten(cfg.model_dump(), "prerun.")
    outcome: dict[str, PrerunReport] = {}

    def work(ctx: StageContext) -> StageWork:
        out = Path(output_dir) if output_dir else ctx.stage_dir / "prerun_validation"
        report = run_prerun_validation(
            output_dir=str(out),
            idle_duration_minutes=cfg.idle_duration_minutes,
            burn_in_steps=cfg.burn_in_steps,
            expected_gpu_type=cfg.expected_gpu,
            expected_vram_gb=cfg.expected_vram_gb,
            expected_gpu_count=cfg.expected_gpu_count,
            expected_cpu=cfg.expected_cpu,
            skip_idle=cfg.skip_idle,
            skip_burn_in=cfg.skip_burn_in,
            skip_sampling=cfg.skip_sampling,
            quick=cfg.quick,
            energy_cfg=parent.cfg.energy,  # the pipeline's own energy settings, for the burn-in too
        )
        outcome["report"] = report
        return StageWork(
            tokens=report.burn_in.tokens_processed if report.burn_in else 0,
            outputs={"prerun_validation": out},
            fingerprints={},
            metrics=_report_metrics(report),
            details={
                "all_checks_passed": report.all_checks_passed,
                "critical_warnings": report.critical_warnings,
            },
        )

    result = execute_stage(parent, STAGE, params, work, reusable=False)
    report = outcome["report"]
    mlflow.set_tag("dist_bench.prerun.passed", str(report.all_checks_passed).lower())
    idle = report.idle_baseline
    if idle is not None and idle.idle_power_w_per_gpu is not None:
        parent.idle_power_w = idle.idle_power_w_per_gpu
        parent.idle_source = "prerun"
        mlflow.set_tag("energy.idle.source", "prerun")
    if cfg.required and not report.all_checks_passed:
        raise PrerunFailed(report)
    return result, report


def _report_metrics(report: PrerunReport) -> dict[str, float]:
    """The report's key figures (the parent shows them as prerun/<name>)."""
    figures: dict[str, float | None] = {"all_checks_passed": float(report.all_checks_passed)}
    if report.idle_baseline:
        figures["idle_gpu_avg_power_w"] = report.idle_baseline.gpu_avg_power_watts
        figures["idle_gpu_std_power_w"] = report.idle_baseline.gpu_std_power_watts
    if report.burn_in:
        figures["burn_in_tokens_per_s"] = report.burn_in.tokens_per_second
        figures["burn_in_gpu_energy_j"] = report.burn_in.gpu_energy_joules
    if report.sampling_validation:
        for interval, estimate in report.sampling_validation.estimates.items():
            figures[f"sampling_deviation_pct_{interval}ms"] = estimate.get("deviation_pct")
    return {k: float(v) for k, v in figures.items() if v is not None}
