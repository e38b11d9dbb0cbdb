"""Run a tiny-world pipeline on a CUDA GPU and dump what the stage runs recorded, as JSON.

    python bench/pipeline_on_gpu.py --out $OUT          (on the GPU machine; results: docs/benchmarks.md)
    python bench/pipeline_on_gpu.py --out $OUT pipeline=sft      (the SFT pipeline instead)
    python bench/pipeline_on_gpu.py --out $OUT --config configs/experiments/tiny_dpo.yaml   (DPO)

Checks the CUDA code paths (bf16 autocast training, teacher caching on the GPU, lm-eval on cuda) and that
every stage's GPU energy comes from NVML's energy counter, against a local sqlite MLflow store.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from dist_bench import pipeline
from dist_bench.config import load_config

GPU = ["train.device=cuda", "train.precision=bf16", "eval.device=cuda", "teacher.dtype=float32"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default=None, help="experiment file (default: tiny_kd)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.out / 'mlflow.db'}")
    cfg = load_config(args.config, [*GPU, f"output.run_dir={args.out / 'runs'}", *args.overrides])
    started = time.time()
    parent = {"kd": pipeline.kd, "sft": pipeline.sft, "dpo": pipeline.dpo}[cfg.pipeline](cfg)
    wall = time.time() - started
    client = MlflowClient()
    stages = {}
    for stage in parent.stages:
        run = client.get_run(stage.run_id)
        stages[stage.stage] = {
            "metrics": run.data.metrics,
            "energy_tags": {k: v for k, v in run.data.tags.items() if k.startswith("energy.")},
        }
    result = {
        "overrides": [*GPU, *args.overrides],
        "wall_s": round(wall, 1),
        "parent_totals": {
            k: v
            for k, v in client.get_run(parent.run_id).data.metrics.items()
            if k.startswith(("total/", "eval/tiny"))
        },
        "stages": stages,
    }
    (args.out / "pipeline_on_gpu.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    print(
        json.dumps(
            {
                "wall_s": result["wall_s"],
                "parent_totals": result["parent_totals"],
                "gpu_sources": {s: v["energy_tags"].get("energy.gpu.source") for s, v in stages.items()},
                "gpu_energy_j": {s: v["metrics"].get("gpu_energy_j") for s, v in stages.items()},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
