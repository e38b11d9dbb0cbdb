"""Pre-run validation (seed 000): cheap checks before an expensive energy experiment.

    from dist_bench.prerun import quick_validation, run_prerun_validation

    ok = quick_validation(output_dir="./prerun_validation")          # reduced durations, -> bool
    report = run_prerun_validation(
        output_dir="./prerun_validation", idle_duration_minutes=5.0, burn_in_steps=500,
        expected_gpu_type="A100", expected_vram_gb=80.0,
    )
    if not report.all_checks_passed:
        print(report.critical_warnings)

    python -m dist_bench.prerun --quick --output-dir ./validation   # exit 0 passed, 1 failed

Four checks, each also callable on its own, in the order run_prerun_validation runs them:
1. `validate_hardware`: GPU type (case-insensitive substring), VRAM per GPU (GiB), GPU count, CPU model.
2. `measure_idle_baseline`: GPU power while nothing runs, polled by a PowerSampler; the mean comes from the
   energy counter. Runs before any work so the GPUs are not still warm from it.
3. `run_burn_in_test`: a small transformer trained on random tokens inside an EnergyWindow, to prove the
   energy logs get written with non-zero figures and that throughput and utilisation are sane.
4. `validate_sampling_interval`: one bursty workload measured at once by the energy counter and by
   samplers at several intervals; polling every 0.5-1 s misses 10-20% of a bursty load on an H100
   (shared/measurements/README.md), so this shows on this machine what each interval would miss.

Output tree (run_prerun_validation):

    prerun_validation/
        prerun_validation_report.json
        idle_baseline/idle_baseline.json, idle_baseline_readings.json
        burn_in/energy_logs/stage_burn_in.json (+ power_timeline.csv, codecarbon/ when they apply)
        sampling_validation/sampling_validation.json, sampling_series.json

Critical (`all_checks_passed` is False): any hardware expectation not met; the burn-in's energy logs
invalid on a machine with a GPU; NVML failing on a machine with a GPU (no GPU energy or power at all); a
check that crashed. A CPU-only machine is not a failure: GPU figures are None and warnings say why.

Nothing here raises because NVML is missing. Every function takes `nvml` (default pynvml) so a simulated
device (energy/nvml_sim.py) can stand in for a GPU.

Package layout (import from dist_bench.prerun; the modules import results.py, never this file):

    results.py     constants several checks read, ModelSize, the result dataclasses, PrerunReport,
                   PrerunFailed, the NVML and JSON helpers the checks share
    hardware.py    1. validate_hardware
    idle.py        2. measure_idle_baseline
    burn_in.py     3. BurnInModel, run_burn_in_test
    sampling.py    4. bursty_workload, validate_sampling_interval
    validation.py  run_prerun_validation, quick_validation, summary_text and the quick-mode durations
    stage.py       run_stage: the checks as the pipeline's `prerun` stage
    __main__.py    the command line: python -m dist_bench.prerun

A constant is read from the globals of the module that uses it: to change one in a test, patch it there
(e.g. validation.QUICK_BURN_IN_STEPS), not on this package.
"""

from dist_bench.prerun.burn_in import BurnInModel, run_burn_in_test
from dist_bench.prerun.hardware import validate_hardware
from dist_bench.prerun.idle import measure_idle_baseline
from dist_bench.prerun.results import (
    BurnInResult,
    HardwareValidation,
    IdleBaseline,
    ModelSize,
    PrerunFailed,
    PrerunReport,
    SamplingValidation,
)
from dist_bench.prerun.sampling import bursty_workload, validate_sampling_interval
from dist_bench.prerun.stage import STAGE, run_stage
from dist_bench.prerun.validation import REPORT_FILE, quick_validation, run_prerun_validation, summary_text

__all__ = [
    "REPORT_FILE", "STAGE", "BurnInModel", "BurnInResult", "HardwareValidation", "IdleBaseline", "ModelSize",
    "PrerunFailed", "PrerunReport", "SamplingValidation", "bursty_workload", "measure_idle_baseline",
    "quick_validation", "run_burn_in_test", "run_prerun_validation", "run_stage", "summary_text",
    "validate_hardware", "validate_sampling_interval",
]  # fmt: skip
