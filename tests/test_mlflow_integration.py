"""The two ways users drive it that need real MLflow processes: a separate `mlflow server` over HTTP,
and `mlflow run . -e kd --env-manager local` reading the MLproject."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, SMALL, small_config, store_outside_the_checkout
from dist_bench import pipeline

BIN = Path(sys.executable).parent


def test_pipeline_against_a_real_mlflow_server(
    server: str, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    parent = pipeline.kd(small_config(workdir))
    client = MlflowClient(server)
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED" and "total/tokens" in run.data.metrics
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(c.info.status for c in children) == ["FINISHED"] * 3
    # Artifacts travel through the server's proxied artifact store.
    assert "final_model" in [a.path for a in client.list_artifacts(parent.stages[1].run_id)]
    assert not (workdir / "mlflow.db").exists() and not (workdir / "mlruns").exists()
    again = pipeline.kd(small_config(workdir))
    assert [s.reused for s in again.stages] == [True, True, True]


def mlflow_run_env(tmp_path: Path, *experiments: str) -> dict[str, str]:
    """The environment of an `mlflow run` subprocess: a store of its own (its experiments' artifacts in
    tmp_path), this venv's executables first."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store_outside_the_checkout(tmp_path, *experiments),
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_mlflow_run_kd_entry_point(tmp_path: Path) -> None:
    overrides = " ".join([*SMALL, f"output.run_dir={tmp_path / 'runs'}"])
    env = mlflow_run_env(tmp_path, "mlproject-test")
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "kd", "--env-manager", "local", "--experiment-name", "mlproject-test",
         "-P", f"overrides={overrides}", "-P", "register=mlproject-student", "-P", "alias=candidate"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered: models:/mlproject-student@candidate" in done.stdout
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("mlproject-student", "candidate")
    assert version.tags["dist_bench.pipeline"] == "kd"
    experiment = client.get_experiment_by_name("mlproject-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("dist_bench.role") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name == "tiny-kd"
    assert parents[0].data.tags["mlflow.project.entryPoint"] == "kd"
    assert sorted(r.data.tags["dist_bench.stage"] for r in runs if r.data.tags.get("dist_bench.role") == "stage") == [
        "eval", "logit_caching", "student_train",
    ]  # fmt: skip


def test_mlflow_run_cache_logits_on_two_ranks_continues_the_run_mlflow_opened(tmp_path: Path) -> None:
    overrides = " ".join([*SMALL, f"output.run_dir={tmp_path / 'runs'}"])
    env = mlflow_run_env(tmp_path, "two-ranks")
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "cache_logits", "--env-manager", "local", "--experiment-name",
         "two-ranks", "-P", f"overrides={overrides}", "-P", "nproc=2"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("two-ranks").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("dist_bench.role") == "pipeline"]
    (stage,) = [r for r in runs if r.data.tags.get("dist_bench.role") == "stage"]
    assert len(runs) == 2 and parent.data.tags["mlflow.project.entryPoint"] == "cache_logits"
    assert parent.info.status == stage.info.status == "FINISHED"
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_mlflow_run_eval_of_several_models_makes_a_parent_each(tmp_path: Path) -> None:
    """What `make demo` runs for its reference rows: one process, one parent run per model, the run that
    `mlflow run` opened kept out of the table (role sweep)."""
    overrides = " ".join(["energy.codecarbon=false", f"output.run_dir={tmp_path / 'runs'}"])
    env = mlflow_run_env(tmp_path, "refs")
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "eval", "--env-manager", "local", "--experiment-name", "refs",
         "-P", "model=tinyworld:teacher,tinyworld:student-init", "-P", "tasks=tiny_arith", "-P", "max_samples=8",
         "-P", f"overrides={overrides}"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("refs").experiment_id])
    roles = sorted((r.data.tags.get("dist_bench.role"), r.info.run_name, r.info.status) for r in runs)
    assert [(role, name) for role, name, _ in roles if role != "stage"] == [
        ("pipeline", "eval:tinyworld:student-init"), ("pipeline", "eval:tinyworld:teacher"),
        ("sweep", roles[-1][1]),
    ]  # fmt: skip
    assert {status for *_, status in roles} == {"FINISHED"}
    teacher = next(r for r in runs if r.info.run_name == "eval:tinyworld:teacher")
    assert teacher.data.metrics["eval/tiny_arith/exact_match"] == 1.0
    assert not any(k.startswith("eval/tiny_mc") for k in teacher.data.metrics)  # -P tasks=tiny_arith
    assert teacher.data.params["eval.limit"] == "8"  # -P max_samples=8
    parents = [r for r in runs if r.data.tags.get("dist_bench.role") == "pipeline"]
    assert len({r.data.tags["dist_bench.config_hash"] for r in parents}) == 2  # the model is in the hash
    assert {r.data.params["model"] for r in parents} == {"tinyworld:teacher", "tinyworld:student-init"}
    assert not any(k.startswith(("kd.", "train.", "logits.")) for r in parents for k in r.data.params)


def test_mlflow_run_without_an_experiment_name_puts_the_pipeline_in_the_configured_experiment(
    tmp_path: Path,
) -> None:
    """`mlflow run` creates its run in Default before our code starts: that run becomes a launcher with a
    note, and the pipeline's runs go to tracking.experiment_name with everything else of the config."""
    overrides = " ".join(
        [
            "energy.codecarbon=false",
            "tracking.experiment_name=configured",
            f"output.run_dir={tmp_path / 'runs'}",
        ]
    )
    env = mlflow_run_env(tmp_path, "configured")
    done = subprocess.run(
        [str(BIN / "mlflow"), "run", ".", "-e", "eval", "--env-manager", "local",
         "-P", "model=tinyworld:teacher", "-P", "tasks=tiny_arith", "-P", "max_samples=4",
         "-P", f"overrides={overrides}"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    [launcher] = client.search_runs(["0"])
    assert launcher.data.tags["dist_bench.role"] == "launcher" and launcher.info.status == "FINISHED"
    assert "'configured'" in launcher.data.tags["mlflow.note.content"]
    runs = client.search_runs([client.get_experiment_by_name("configured").experiment_id])
    assert sorted((r.data.tags["dist_bench.role"], r.info.run_name) for r in runs) == [
        ("pipeline", "eval:tinyworld:teacher"),
        ("stage", "eval:tinyworld:teacher/eval"),
    ]
    assert "in the MLflow UI" in done.stdout and "viewStateShareKey=dist-bench" in done.stdout


def test_mlflow_run_with_a_bad_override_fails_with_exit_2_and_no_finished_run(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PATH": f"{BIN}:{os.environ['PATH']}",
    }
    done = subprocess.run(
        [str(BIN / "python"), "entry_points/kd.py", "--overrides", "train.batch_size=lots"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dist-bench: error: config: train.batch_size (from override 'train.batch_size=lots'): "
        "Input should be a valid integer, unable to parse string as an integer"
    ]
