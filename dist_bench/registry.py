"""Registering a pipeline's final model in the MLflow Model Registry, with its energy label.

    dist-bench register --run <parent run id> --name tiny-kd-student --alias candidate
    dist-bench kd --config configs/experiments/tiny_kd.yaml --register tiny-kd-student   (at the pipeline's end)

1. The parent run (a finished kd, sft or dpo pipeline) names its training stage run; that run holds the final
   model (`final_model`, dpo: `final_policy`).
2. The model is logged into that stage run as an MLflow transformers model (`name="model"`), and the parent's
   quality and energy metrics are logged again against the logged model (MLflow 3's `model_id`), so the
   model's page shows them.
3. It is registered under `name`; the version's tags are the energy label (pipeline, teacher, student init,
   data, token budget, kWh per role and in total, gross and net, the teacher's kWh amortised over the students
   that reused its output, CO2e, J/token, every score, energy provenance, config hash, git commit) and its
   description is the report's row. `alias` points at the new version.

`models:/<name>@<alias>` then loads with `mlflow.transformers.load_model` and evaluates with
`dist-bench eval --model models:/<name>@<alias>` (models.resolve_model reads the flavour's layout).
"""

from __future__ import annotations

import tempfile
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from dist_bench import report
from dist_bench.tracking import ROLE

FINAL = {"kd": ("student_train", "final_model"), "sft": ("student_train", "final_model"),
         "dpo": ("dpo_training", "final_policy")}  # fmt: skip
PROVENANCE = ("gpu", "cpu", "ram")


def register(parent_run_id: str, name: str, alias: str | None = None) -> Any:
    """The registered model version of the pipeline run's final model, with its energy label."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    stage_run_id, artifact = final_model_of(parent)
    label = energy_label(parent)
    with tempfile.TemporaryDirectory() as scratch:
        local = mlflow.artifacts.download_artifacts(f"runs:/{stage_run_id}/{artifact}", dst_path=scratch)
        with mlflow.start_run(run_id=stage_run_id):
            info = _log_transformers_model(local)
    # the parent's scores and costs, against the logged model (its page in the UI lists them)
    metrics = {k: v for k, v in parent.data.metrics.items() if k.startswith(("eval/", "total/"))}
    client.log_batch(
        stage_run_id,
        metrics=[Metric(k, float(v), 0, 0, model_id=info.model_id) for k, v in sorted(metrics.items())],
        synchronous=True,
    )
    version = mlflow.register_model(info.model_uri, name, tags=label)
    client.update_model_version(name, version.version, description=description(parent))
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return client.get_model_version(name, version.version)


def final_model_of(parent: Any) -> tuple[str, str]:
    """(training stage run id, artifact path of its final model) of a finished kd/sft/dpo parent run."""
    tags = parent.data.tags
    pipeline = tags.get("dist_bench.pipeline")
    if tags.get(ROLE) != "pipeline" or pipeline not in FINAL:
        raise ValueError(
            f"--run: {parent.info.run_id} is not a kd, sft or dpo pipeline run (role {tags.get(ROLE)!r}, "
            f"pipeline {pipeline!r})"
        )
    if parent.info.status != "FINISHED":
        raise ValueError(f"--run: {parent.info.run_id} is {parent.info.status}, not FINISHED")
    stage, artifact = FINAL[pipeline]
    stage_run = tags.get(f"dist_bench.stage_run.{stage}")
    if stage_run is None:
        raise ValueError(f"--run: {parent.info.run_id} has no {stage} stage run")
    return stage_run, artifact


def energy_label(parent: Any) -> dict[str, str]:
    """The model version's tags: what the model cost and what it scores, from the parent and the report."""
    tags, params, metrics = parent.data.tags, parent.data.params, parent.data.metrics
    row = _report_row(parent)
    label = {
        "dist_bench.pipeline": tags.get("dist_bench.pipeline", ""),
        "dist_bench.teacher": tags.get("dist_bench.teacher", ""),
        "dist_bench.student": tags.get("dist_bench.student", ""),
        "dist_bench.data": tags.get("dist_bench.data", ""),
        "dist_bench.config_hash": tags.get("dist_bench.config_hash", ""),
        "dist_bench.git_commit": tags.get("dist_bench.git_commit", ""),
        "dist_bench.parent_run": parent.info.run_id,
        "train.token_budget": params.get("train.token_budget", ""),
    }
    kwh = {
        "energy.total_kwh": metrics.get("total/total_energy_kwh"),
        "energy.net_kwh": _kwh(metrics.get("total/net_energy_j")),
        "energy.teacher_kwh_amortised": row.get("teacher_kwh_amortised"),
        "energy.co2e_kg": metrics.get("total/co2e_kg"),
        "energy.j_per_token": metrics.get("total/j_per_token"),
        **{f"energy.{role}_kwh": row.get(f"{role}_kwh") for role in report.ROLES},
    }
    # a figure that was not measured is absent (never "0"); provenance says how each component was measured
    label |= {key: f"{value:.6g}" for key, value in kwh.items() if value is not None}
    for stage in report._stages():
        for component in PROVENANCE:
            source = tags.get(f"{stage}/energy.{component}.source")
            if source:
                label[f"energy.{stage}.{component}.source"] = source
    for column, value in report.quality_columns(metrics, _tasks(tags)).items():
        task, _, metric = column.partition("/")
        label[f"quality.{task}.{metric.replace('/', '.')}"] = f"{value:.6g}"
    return label


def description(parent: Any) -> str:
    """The report's row for this run, as a one-row Markdown table."""
    return report.to_markdown(report.build_table([report._row_facts(parent)]))


def _report_row(parent: Any) -> dict[str, Any]:
    """This run's row of the standard table over its experiment: the teacher's energy is amortised over
    every student there that reused the same teacher output."""
    client = MlflowClient()
    parents = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{ROLE}` = 'pipeline' and attributes.status = 'FINISHED'",
    )
    table = report.build_table([report._row_facts(run) for run in parents])
    mine = table[table["run_id"] == parent.info.run_id] if "run_id" in table else table.iloc[0:0]
    return {} if mine.empty else {k: (None if _missing(v) else v) for k, v in mine.iloc[0].to_dict().items()}


def _log_transformers_model(local: str) -> Any:
    # The components, not the folder: MLflow 3.17's local-checkpoint path fails on transformers 5's pipeline
    # registry ('str' object has no attribute '__name__'); and the requirements are named, because inferring
    # them imports torchvision, which this project does not need.
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer

    components = {
        "model": AutoModelForCausalLM.from_pretrained(local),
        "tokenizer": AutoTokenizer.from_pretrained(local),
    }
    requirements = [f"{p}=={version(p)}" for p in ("torch", "transformers", "safetensors")]
    return mlflow.transformers.log_model(
        transformers_model=components, name="model", task="text-generation", pip_requirements=requirements
    )


def _tasks(tags: dict[str, str]) -> list[str] | None:
    tasks = tags.get(report.EVAL_TASKS)
    return tasks.split(",") if tasks else None


def _kwh(joules: float | None) -> float | None:
    return joules / 3.6e6 if joules is not None else None


def _missing(value: Any) -> bool:
    try:
        return value is None or value != value  # NaN
    except (TypeError, ValueError):
        return False
