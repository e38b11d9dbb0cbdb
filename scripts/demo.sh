#!/usr/bin/env bash
# make demo: the KD, SFT and DPO pipelines on the embedded tiny world (the same trainer, precision and
# token budget; KD and SFT from the untrained student, DPO from an under-trained one), reference
# evaluations of the teacher and of both student inits, then the standard table.
# Everything goes to ./mlflow.db (see README for the UI).
set -euo pipefail
cd "$(dirname "$0")/.."
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}"
experiment="${DIST_BENCH_EXPERIMENT:-dist-bench}"
run() { mlflow run . --env-manager local --experiment-name "$experiment" "$@"; }

run -e kd
run -e sft
run -e dpo
# the references, one parent each: the teacher, the untrained student (kd, sft) and the dpo row's init
run -e eval -P model=tinyworld:teacher,tinyworld:student-init,tinyworld:student-undertrained
run -e report -P experiment="$experiment"
