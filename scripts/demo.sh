#!/usr/bin/env bash
# make demo: the KD and SFT pipelines on the embedded tiny world (same student, data, trainer and token
# budget), reference evaluations of the teacher and of the untrained student, then the standard table.
# Everything goes to ./mlflow.db (see README for the UI).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
experiment="${DIST_BENCH_EXPERIMENT:-dist-bench}"
run() { mlflow run . --env-manager local --experiment-name "$experiment" "$@"; }

run -e kd
run -e sft
run -e eval -P model=tinyworld:teacher
run -e eval -P model=tinyworld:student-init
run -e report -P experiment="$experiment"
