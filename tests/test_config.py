"""Config: every shipped YAML validates and says how it is run; bad input is one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dist_bench.config import ConfigError, load_config

PROJECT = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((PROJECT / "configs" / "experiments").glob("*.yaml"))
ALL_YAML = sorted((PROJECT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_validates_against_the_schema(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name and cfg.teacher.model and cfg.student.model
    assert len(cfg.flat()) > 40  # flattened into MLflow params


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(PROJECT)))
def test_every_yaml_starts_with_the_command_that_runs_it(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and ("dist-bench" in first or "mlflow run" in first), first
    if "tasks" in path.relative_to(PROJECT).parts:  # lm-eval task YAMLs: `!function` tags, `include:`
        from lm_eval.tasks._yaml_loader import load_yaml

        assert load_yaml(path, resolve_func=False)
    else:
        yaml.safe_load(path.read_text())


def test_real_model_pair_uses_hub_ids_and_the_same_loader_fields() -> None:
    cfg = load_config(PROJECT / "configs/experiments/qwen2.5-1.5b_to_0.5b_kd.yaml")
    assert cfg.teacher.model == "Qwen/Qwen2.5-1.5B" and cfg.student.model == "Qwen/Qwen2.5-0.5B"


def test_overrides_win_and_are_typed() -> None:
    cfg = load_config(None, ["train.optimizer.lr=1e-4", "kd.temperature=2", "eval.tasks=[tiny_mc]"])
    assert cfg.train.optimizer.lr == 1e-4 and cfg.kd.temperature == 2.0 and cfg.eval.tasks == ["tiny_mc"]
    assert cfg.train.batch_size == 32  # untouched base default


def test_hash_changes_with_any_value() -> None:
    assert load_config().hash() != load_config(None, ["seed=7"]).hash()
    assert load_config().hash() == load_config().hash()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lrr=1", "config: train.lrr (from override 'train.lrr=1'): unknown key"),
        (
            "train.optimizer.lr=fast",
            "config: train.optimizer.lr (from override 'train.optimizer.lr=fast'): Input should be a valid number",
        ),
        (
            "kd.ce_weight=1.5",
            "config: kd.ce_weight (from override 'kd.ce_weight=1.5'): Input should be less than or equal to 1",
        ),
        ("nonsense", "override 'nonsense': expected dotted.key=value"),
    ],
)
def test_bad_values_name_the_dotted_path_and_the_source(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value).startswith(expected)
    assert "\n" not in str(err.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("# dist-bench kd --config bad.yaml\nname: x\ntrain:\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"train\.batchsize \(from .*bad\.yaml:4\): unknown key"):
        load_config(bad)


def test_a_bad_value_in_a_file_names_the_file_and_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain:\n  token_budget: 100\n  optimizer:\n    lr: -1\n")
    with pytest.raises(ConfigError, match=r"^config: train\.optimizer\.lr \(from .*bad\.yaml:5\): "):
        load_config(bad)
    # an override of the value names the override, not the file
    with pytest.raises(
        ConfigError, match=r"^config: train\.optimizer\.lr \(from override 'train\.optimizer\.lr=0'\)"
    ):
        load_config(bad, ["train.optimizer.lr=0"])
    bad.write_text("name: x\nstudent: 3\n")  # a section given as a scalar: the section's line
    with pytest.raises(ConfigError, match=r"^config: student \(from .*bad\.yaml:2\): "):
        load_config(bad)


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:\d+: not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("override", ["train.lrr=1", "train.batch_size=many"])
def test_cli_config_error_exits_2_with_one_line_and_starts_nothing(tmp_path: Path, override: str) -> None:
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "dist_bench", "kd", override],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dist-bench: error: config: train."), done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "entry_point", ["main", "kd", "dpo", "preferences", "cache_logits", "eval", "report"]
)
def test_every_entry_point_script_reaches_the_cli(tmp_path: Path, entry_point: str) -> None:
    args = ["--model", "tinyworld:teacher"] if entry_point == "eval" else []
    if entry_point == "report":  # no config: a bad argument instead
        args, overrides = ["--experiment", "nope"], []
    else:
        overrides = ["--overrides", "seed=1 train.nope=2"]
    done = subprocess.run(
        [sys.executable, str(PROJECT / "entry_points" / f"{entry_point}.py"), *args, *overrides],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    expected = (
        "no experiment named 'nope'"
        if entry_point == "report"
        else "config: train.nope (from override 'train.nope=2'): unknown key"
    )
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_every_config_field_says_what_it_is() -> None:
    """The schema documents the config: every field carries a description."""
    import inspect

    import pydantic

    from dist_bench import config as schema

    models = [c for c in vars(schema).values() if inspect.isclass(c) and issubclass(c, pydantic.BaseModel)]
    undescribed = [
        f"{model.__name__}.{name}"
        for model in models
        if model.__module__ == schema.__name__
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert len(models) > 20 and undescribed == []
