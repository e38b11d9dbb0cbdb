"""Registering a finished tiny kd run's student: an MLflow transformers model linked to its training stage run,
a registered version carrying the energy label as tags and the report row as description, an alias that
resolves, a model that loads with mlflow.transformers.load_model and generates, and evaluates through its
models:/ URI to the pipeline's own scores."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_preflight import assert_rejected, dist_bench

from conftest import small_config
from dist_bench import pipeline, registry

NAME, ALIAS = "tiny-kd-student", "candidate"


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        uri = f"sqlite:///{root / 'mlflow.db'}"
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(uri)
        parent = pipeline.kd(small_config(root, "energy.codecarbon=true"))
        version = registry.register(parent.run_id, NAME, ALIAS)
        yield {"root": root, "parent": parent, "version": version}


def test_the_version_carries_the_energy_label(registered: dict) -> None:
    parent = MlflowClient().get_run(registered["parent"].run_id)
    tags, metrics = registered["version"].tags, parent.data.metrics
    assert tags["dist_bench.pipeline"] == "kd" and tags["dist_bench.teacher"] == "tinyworld:teacher"
    assert (
        tags["dist_bench.student"] == "tinyworld:student-init"
        and tags["dist_bench.data"] == "tinyworld:kd_train"
    )
    assert tags["dist_bench.config_hash"] == parent.data.tags["dist_bench.config_hash"]
    assert tags["dist_bench.git_commit"] == parent.data.tags["dist_bench.git_commit"]
    assert tags["train.token_budget"] == "12000"
    assert float(tags["energy.total_kwh"]) == pytest.approx(metrics["total/total_energy_kwh"], rel=1e-5)
    roles = sum(float(tags[f"energy.{role}_kwh"]) for role in ("teacher", "student", "eval"))
    assert roles == pytest.approx(metrics["total/total_energy_kwh"], rel=1e-4)
    assert float(tags["energy.teacher_kwh_amortised"]) == pytest.approx(
        float(tags["energy.teacher_kwh"]), rel=1e-5
    )
    assert float(tags["energy.co2e_kg"]) == pytest.approx(metrics["total/co2e_kg"], rel=1e-5)
    assert float(tags["energy.j_per_token"]) == pytest.approx(metrics["total/j_per_token"], rel=1e-5)
    assert tags["energy.student_train.cpu.source"] == "estimated"
    if torch.cuda.is_available():  # `make test` on a GPU host: the student trained there, NVML measured it
        assert tags["energy.student_train.gpu.source"] != "unavailable"
    else:
        assert tags["energy.student_train.gpu.source"] == "unavailable"
        assert "energy.net_kwh" not in tags  # no GPU idle baseline: not measured, so absent (never 0)
    for task, metric in [("tiny_arith", "exact_match"), ("tiny_mc", "acc")]:
        assert float(tags[f"quality.{task}.{metric}"]) == pytest.approx(
            metrics[f"eval/{task}/{metric}"], rel=1e-5
        )
    assert "| tiny-kd | kd | tinyworld:teacher |" in registered["version"].description


def test_the_model_is_logged_in_its_training_run_and_the_alias_resolves(registered: dict) -> None:
    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert version.version == registered["version"].version
    train_run = registered["parent"].stages[1]
    assert train_run.stage == "student_train" and version.run_id == train_run.run_id
    assert version.source.startswith("models:/m-")  # registered from the logged model (MLflow 3)
    logged = mlflow.get_logged_model(version.model_id or version.source.removeprefix("models:/"))
    assert logged.source_run_id == train_run.run_id
    linked = {m.key: m.value for m in logged.metrics}
    assert (
        linked["eval/tiny_arith/exact_match"]
        == registered["parent"].stages[2].metrics["eval/tiny_arith/exact_match"]
    )


def test_models_uri_loads_with_the_transformers_flavour_and_generates(registered: dict) -> None:
    generator = mlflow.transformers.load_model(f"models:/{NAME}@{ALIAS}")
    out = generator("Question: What is 12 + 30?\nAnswer:", max_new_tokens=6, do_sample=False)
    assert out[0]["generated_text"].startswith("Question: What is 12 + 30?\nAnswer:")
    assert len(out[0]["generated_text"]) > len("Question: What is 12 + 30?\nAnswer:")


def test_eval_through_the_models_uri_reproduces_the_pipelines_scores(registered: dict) -> None:
    in_pipeline = registered["parent"].stages[2].metrics
    again = pipeline.evaluate(small_config(registered["root"]), f"models:/{NAME}@{ALIAS}").stages[0].metrics
    scores = [
        k
        for k in in_pipeline
        if k.startswith("eval/tiny_") and k.rpartition("/")[2] in ("exact_match", "acc")
    ]
    assert scores and all(again[k] == in_pipeline[k] for k in scores)


def test_only_a_finished_training_pipeline_registers(registered: dict, tmp_path: Path) -> None:
    evaluation = pipeline.evaluate(small_config(registered["root"]), "tinyworld:teacher")
    with pytest.raises(ValueError, match="not a kd, sft or dpo pipeline run"):
        registry.register(evaluation.run_id, "nope")
    done = dist_bench(tmp_path, "kd", "--alias", "x")
    assert_rejected(done, tmp_path, "--alias", "--register")
