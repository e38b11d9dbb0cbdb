"""`python -m dist_bench.prerun ...`: the pre-run checks from the command line; exit 0 when every check
passed, 1 when one found something critical."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dist_bench.prerun.validation import run_prerun_validation, summary_text


# --- command line ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dist_bench.prerun",
        description="Pre-run validation: idle baseline, burn-in, sampling interval, hardware. "
        "Exit 0 when every check passed, 1 when one found something critical.",
    )
    parser.add_argument("--quick", action="store_true", help="reduced durations (~10 s idle, 50 steps, 15 s)")
    parser.add_argument("--output-dir", default="./prerun_validation", help="where the report tree goes")
    parser.add_argument("--idle-duration", type=float, default=5.0, help="idle baseline minutes")
    parser.add_argument("--burn-in-steps", type=int, default=500, help="burn-in training steps")
    parser.add_argument("--expected-gpu", default=None, help="substring of the GPU name, e.g. A100")
    parser.add_argument("--expected-vram", type=float, default=None, help="minimum GiB of VRAM per GPU")
    parser.add_argument("--expected-gpu-count", type=int, default=None, help="GPUs this process must see")
    parser.add_argument("--expected-cpu", default=None, help="substring of the CPU model")
    parser.add_argument("--skip-idle", action="store_true", help="skip the idle baseline")
    parser.add_argument("--skip-burn-in", action="store_true", help="skip the burn-in test")
    parser.add_argument("--skip-sampling", action="store_true", help="skip the sampling-interval check")
    args = parser.parse_args(argv)
    report = run_prerun_validation(
        output_dir=args.output_dir,
        idle_duration_minutes=args.idle_duration,
        burn_in_steps=args.burn_in_steps,
        expected_gpu_type=args.expected_gpu,
        expected_vram_gb=args.expected_vram,
        expected_gpu_count=args.expected_gpu_count,
        expected_cpu=args.expected_cpu,
        skip_idle=args.skip_idle,
        skip_burn_in=args.skip_burn_in,
        skip_sampling=args.skip_sampling,
        quick=args.quick,
    )
    print(summary_text(report))
    return 0 if report.all_checks_passed else 1


if __name__ == "__main__":
    sys.exit(main())
