#!/usr/bin/env bash
# make demo: the KD, SFT and DPO pipelines on the embedded tiny world (the same trainer, precision and
# token budget; KD and SFT from the untrained student, DPO from an under-trained one), reference
# evaluations of the teacher and of both student inits, the standard table, and the KD student registered
# in the Model Registry with its energy label.
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
# the KD student -> the Model Registry (an MLflow transformers model, the energy label as version tags)
kd_run=$(python -c "
from mlflow import MlflowClient
client = MlflowClient()
experiment = client.get_experiment_by_name('$experiment').experiment_id
query = \"tags.\`dist_bench.pipeline\` = 'kd' and tags.\`dist_bench.role\` = 'pipeline' and attributes.status = 'FINISHED'\"
print(client.search_runs([experiment], query, order_by=['attributes.start_time DESC'], max_results=1)[0].info.run_id)
")
run -e register -P run="$kd_run" -P name=tiny-kd-student -P alias=candidate
