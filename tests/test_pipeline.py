"""The kd pipeline end to end on the tiny world: one parent run, three nested FINISHED stage runs with
their metrics, tags and artifacts; identical inputs reuse stages; the report table reads it all back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import small_config
from dist_bench import pipeline, report

STAGES = ["logit_caching", "student_train", "eval"]
# `make test` on a GPU host: the stages run there (train.device auto) and measure its energy
GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A kd run, its identical repeat, one differing only in the temperature (all three sharing one
    teacher cache) and an eval-only run of the teacher: the situations the table has to represent."""
    root = tmp_path_factory.mktemp("pipeline")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        first = pipeline.kd(small_config(root, "energy.codecarbon=true"))
        again = pipeline.kd(small_config(root, "energy.codecarbon=true"))
        warmer = pipeline.kd(small_config(root, "kd.temperature=2.0"))
        teacher = pipeline.evaluate(small_config(root), "tinyworld:teacher")
        table = report.run(["dist-bench"], root / "report")
        # After the report (whose test counts rows): the student straight from its MLflow artifact.
        logged = pipeline.evaluate(small_config(root), f"runs:/{first.stages[1].run_id}/final_model")
        yield {
            "root": root,
            "first": first,
            "again": again,
            "warmer": warmer,
            "teacher": teacher,
            "table": table,
            "logged": logged,
        }


def client() -> MlflowClient:
    return MlflowClient()


def test_one_parent_with_three_finished_nested_stage_runs(world: dict) -> None:
    parent = client().get_run(world["first"].run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["dist_bench.role"] == "pipeline"
    children = client().search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert sorted(c.data.tags["dist_bench.stage"] for c in children) == sorted(STAGES)
    for child in children:
        assert child.info.status == "FINISHED"
        assert (
            child.data.tags["dist_bench.role"] == "stage" and child.data.tags["dist_bench.pipeline"] == "kd"
        )
        assert child.data.tags["dist_bench.git_commit"] == parent.data.tags["dist_bench.git_commit"]
        stage = child.data.tags["dist_bench.stage"]
        for metric in (
            "duration_s",
            "tokens",
            "tokens_per_s",
            "cpu_energy_j",
            "ram_energy_j",
            "total_energy_j",
            "j_per_token",
            "co2e_kg",
        ):
            assert child.data.metrics[metric] > 0, (stage, metric)
            assert parent.data.metrics[f"{stage}/{metric}"] == child.data.metrics[metric]
        assert child.data.tags["energy.cpu.source"] == "estimated"
        summary = json.loads(mlflow.artifacts.load_text(f"runs:/{child.info.run_id}/stages/{stage}.json"))
        assert summary["tokens_processed"] == child.data.metrics["tokens"]
        assert summary["cpu_energy_joules"] > 0
        if GPU:  # the stage ran on the GPU: its energy from NVML
            assert child.data.metrics["gpu_energy_j"] > 0 and summary["gpu_energy_joules"] > 0
            assert child.data.tags["energy.gpu.source"] != "unavailable"
        else:  # GPU energy is absent and says why, never logged as 0
            assert "gpu_energy_j" not in child.data.metrics and summary["gpu_energy_joules"] is None
            assert (
                child.data.tags["energy.gpu.source"] == "unavailable" and child.data.tags["energy.gpu.note"]
            )


def test_parent_rollup_config_environment_and_summary(world: dict) -> None:
    run = client().get_run(world["first"].run_id)
    metrics = run.data.metrics
    assert metrics["total/total_energy_j"] == pytest.approx(
        sum(metrics[f"{s}/total_energy_j"] for s in STAGES)
    )
    assert metrics["total/tokens"] == sum(metrics[f"{s}/tokens"] for s in STAGES)
    assert 0 <= metrics["eval/tiny_arith/exact_match"] <= 1 and 0 <= metrics["eval/tiny_mc/acc"] <= 1
    assert run.data.params["train.optimizer.lr"] == "0.003" and run.data.params["kd.temperature"] == "1.0"
    assert len(run.data.tags["dist_bench.config_hash"]) == 16
    uri = f"runs:/{run.info.run_id}"
    assert "teacher:" in mlflow.artifacts.load_text(f"{uri}/config/merged.yaml")
    env = json.loads(mlflow.artifacts.load_text(f"{uri}/environment.json"))
    assert env["python"] and env["packages"]["torch"] and env["pip_freeze"] and "commit" in env["git"]
    summary = json.loads(mlflow.artifacts.load_text(f"{uri}/experiment_summary.json"))
    assert summary["total_energy_kwh"] == pytest.approx(metrics["total/total_energy_j"] / 3.6e6)
    assert set(summary["stages"]) == set(STAGES)
    for stage in summary["stages"].values():
        assert {
            "gpu_energy_joules",
            "cpu_energy_joules",
            "tokens_processed",
            "tokens_per_second",
            "joules_per_token",
        } <= set(stage)


def test_final_student_is_an_artifact_loadable_by_transformers_and_the_last_checkpoint_its_trainer_state(
    world: dict,
) -> None:
    train_run = world["first"].stages[1].run_id
    names = [a.path for a in client().list_artifacts(train_run)]
    assert "final_model" in names and "checkpoints" in names
    local = mlflow.artifacts.download_artifacts(f"runs:/{train_run}/final_model")
    model = AutoModelForCausalLM.from_pretrained(local)
    tokenizer = AutoTokenizer.from_pretrained(local)
    assert model.config.num_hidden_layers == 2 and len(tokenizer) == model.config.vocab_size
    checkpoints = [a.path for a in client().list_artifacts(train_run, "checkpoints")]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoints/checkpoint-")  # the last one
    # The last step's weights are final_model's (hard-linked there): uploaded once, not twice.
    files = {Path(a.path).name for a in client().list_artifacts(train_run, checkpoints[0])}
    assert "trainer_state.json" in files and not files & {"model.safetensors", "config.json"}
    state = json.loads(mlflow.artifacts.load_text(f"runs:/{train_run}/{checkpoints[0]}/trainer_state.json"))
    assert checkpoints[0] == f"checkpoints/checkpoint-{state['global_step']}"


def scores(metrics: dict[str, float]) -> list[str]:
    """The tiny tasks' quality metrics (and token counts), not the per-task energy and time."""
    measured = ("/energy_j", "/duration_s", "/j_per_token")
    return [k for k in metrics if k.startswith("eval/tiny_") and not k.endswith(measured)]


def test_a_training_checkpoint_directory_evaluates_like_a_final_model(world: dict) -> None:
    # a mid-training checkpoint of student_train as it lies on disk: weights, tokenizer, optimizer and
    # trainer state side by side (what a user points `dist-bench eval --model` at mid-training); the one at
    # the last step keeps no optimizer state (LeanLastCheckpoint), so the newest one that does
    # (the first kd run's: the warmer run trained another student in a stage dir of its own)
    final = Path(world["first"].stages[1].outputs["final_model"])
    by_step = sorted((final.parent / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    *_, checkpoint = [c for c in by_step if (c / "optimizer.pt").is_file()]
    assert (checkpoint / "trainer_state.json").is_file() and checkpoint != by_step[-1]
    metrics = pipeline.evaluate(small_config(world["root"]), str(checkpoint)).stages[0].metrics
    assert 0.0 <= metrics["eval/tiny_arith/exact_match"] <= 1.0 and 0.0 <= metrics["eval/tiny_mc/acc"] <= 1.0
    if (final / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes():
        in_pipeline = world["first"].stages[2].metrics  # the same weights: the same scores
        assert all(metrics[k] == in_pipeline[k] for k in scores(in_pipeline))


def test_eval_of_the_logged_student_reproduces_the_pipelines_scores(world: dict) -> None:
    in_pipeline = world["first"].stages[2].metrics
    standalone = world["logged"].stages[0].metrics
    quality = scores(in_pipeline)
    assert quality and all(standalone[k] == in_pipeline[k] for k in quality)


def test_identical_second_invocation_reuses_every_stage(world: dict) -> None:
    again = world["again"]
    assert [s.reused for s in again.stages] == [True, True, True]
    assert [s.run_id for s in again.stages] == [s.run_id for s in world["first"].stages]
    tags = client().get_run(again.run_id).data.tags
    assert tags["dist_bench.reused.logit_caching"] == world["first"].stages[0].run_id
    children = client().search_runs(["0", *_experiments()], f"tags.`mlflow.parentRunId` = '{again.run_id}'")
    assert children == []  # nothing was recomputed
    # The reused stages' cost is still this pipeline's cost: the roll-up carries it.
    assert client().get_run(again.run_id).data.metrics["total/total_energy_j"] > 0


def test_changing_a_student_setting_reuses_only_the_teacher_cache(world: dict) -> None:
    warmer = world["warmer"]
    assert [s.reused for s in warmer.stages] == [True, False, False]
    assert warmer.stages[0].run_id == world["first"].stages[0].run_id


def test_report_table_rows_amortisation_and_no_zero_energy(world: dict) -> None:
    table = world["table"]
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True)) for line in lines[1:]
    ]
    assert [r["pipeline"] for r in rows] == ["kd", "kd", "kd", "eval"]
    kd_rows = rows[:3]
    # One teacher cache, two distinct students: the identical repeat trained nothing new.
    assert all(r["students_sharing_teacher"] == "2" for r in kd_rows)
    assert [r["reused"] for r in kd_rows] == ["-", "logit_caching+student_train+eval", "logit_caching"]
    assert rows[3]["student"] == "tinyworld:teacher" and rows[3]["teacher_kwh"] == "n/a"
    for row in rows[:2]:  # measured with CodeCarbon: estimated CPU/RAM, marked ~
        for column in ("total_kwh", "co2e_kg", "eval_kwh"):
            assert row[column].startswith("~") and float(row[column][1:]) > 0
    for row in rows[2:]:  # energy.codecarbon=false: nothing measured here, shown as n/a, never 0
        assert row["total_kwh"] == "n/a" and row["eval_kwh"] == "n/a"
    assert "estimated by CodeCarbon" in table
    if GPU:  # the first run trained on the GPU: its GPU energy is a figure
        assert float(rows[0]["gpu_kwh"].lstrip("~")) > 0
    else:
        assert all(r["gpu_kwh"] == "n/a" for r in rows) and "gpu_kwh n/a: not measured" in table
    files = {p.name for p in (world["root"] / "report").iterdir()}
    assert {"table.csv", "table.md", "table.html", "pareto.png"} <= files
    report_runs = client().search_runs(
        _experiments(), "tags.`dist_bench.role` = 'report'", order_by=["attributes.start_time ASC"]
    )
    assert report_runs  # the fixture's (test_report_filter adds one of its own)
    assert {a.path for a in client().list_artifacts(report_runs[0].info.run_id, "report")} >= {
        "report/table.csv",
        "report/table.html",
        "report/table.tex",
    }


def test_report_csv_html_and_latex_read_back_to_the_runs(world: dict) -> None:
    import pandas as pd

    folder = world["root"] / "report"
    csv = pd.read_csv(folder / "table.csv")
    first = client().get_run(world["first"].run_id).data.metrics
    row = csv[csv["run_id"] == world["first"].run_id].iloc[0]
    assert row["total_kwh"] == pytest.approx(first["total/total_energy_kwh"])
    assert row["tiny_arith/exact_match"] == pytest.approx(first["eval/tiny_arith/exact_match"])
    # per task: each task's share of the eval stage's energy, summing to the stage's
    per_task = [row[f"eval_kwh:{task}"] for task in ("tiny_arith", "tiny_mc")]
    assert per_task == pytest.approx([first[f"eval/{t}/energy_j"] / 3.6e6 for t in ("tiny_arith", "tiny_mc")])
    assert sum(per_task) == pytest.approx(first["eval/total_energy_j"] / 3.6e6)
    assert row["token_budget"] == 12000 and csv[csv["pipeline"] == "eval"]["token_budget"].isna().all()
    # HTML: one page, the table and the plot inline (no file beside it needed)
    page = (folder / "table.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and 'src="data:image/png;base64,' in page
    html_table = pd.read_html(folder / "table.html", na_values=["n/a"])[0]
    assert list(html_table["run"]) == list(csv["run"])
    assert html_table["total_kwh"].tolist()[:2] == pytest.approx(csv["total_kwh"].tolist()[:2], rel=1e-5)
    # LaTeX: booktabs rules; one line per run with the Markdown's cells, `_` escaped
    tex = (folder / "table.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    cells = [[c.strip() for c in line.removesuffix("\\\\").split("&")] for line in body]
    header = [
        c.strip()
        for c in tex.split("\\toprule")[1].split("\\midrule")[0].strip().removesuffix("\\\\").split("&")
    ]
    assert header[:2] == ["run", "pipeline"] and "tiny\\_arith/exact\\_match" in header
    assert [c[0] for c in cells] == list(csv["run"])
    at = header.index("tiny\\_arith/exact\\_match")
    assert float(cells[0][at]) == pytest.approx(csv["tiny_arith/exact_match"].iloc[0], abs=5e-4)
    assert cells[3][header.index("teacher\\_kwh")] == "n/a"


def test_pareto_frontier_on_hand_made_points() -> None:
    points = [(1.0, 0.5), (2.0, 0.4), (2.0, 0.7), (3.0, 0.7), (0.5, 0.1), (4.0, 0.9), (4.0, 0.9)]
    # (2.0, 0.4) is beaten by (1.0, 0.5); (3.0, 0.7) by (2.0, 0.7); of the two (4.0, 0.9) the first counts
    assert report.pareto_front(points) == [4, 0, 2, 5]
    assert report.pareto_front([]) == []


def _experiments() -> list[str]:
    return [e.experiment_id for e in client().search_experiments()]


def test_report_filter_in_mlflow_search_syntax(world: dict) -> None:
    table = report.run(["dist-bench"], world["root"] / "report-eval", "tags.`dist_bench.pipeline` = 'eval'")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "| eval |" in line]
    # the evaluations only (the teacher's, the logged student's, a checkpoint's if that test ran first)
    assert len(rows) >= 2 and "| kd |" not in table
    with pytest.raises(ValueError, match="--filter"):
        report.run(["dist-bench"], world["root"] / "report-bad", "tags.nonsense ~~ 'x'")


def test_report_from_the_run_dir_without_a_tracking_server(world: dict, tmp_path: Path) -> None:
    import pandas as pd

    markdown = report.from_run_dir(world["root"] / "runs", tmp_path / "offline")
    offline = pd.read_csv(tmp_path / "offline" / "table.csv")
    online = pd.read_csv(world["root"] / "report" / "table.csv")
    shared = online[online["run_id"].isin(offline["run_id"])]  # the fixture's report ran before `logged`
    assert list(shared["run"]) == list(offline["run"])[: len(shared)]
    for column in (
        "total_kwh",
        "tiny_arith/exact_match",
        "students_sharing_teacher",
        "teacher_kwh_amortised",
    ):
        left = offline.set_index("run_id").loc[shared["run_id"], column].tolist()
        assert left == pytest.approx(shared[column].tolist(), nan_ok=True), column
    assert (tmp_path / "offline" / "table.tex").is_file() and "| tiny-kd |" in markdown


def test_report_says_when_training_rows_differ_in_token_budget(world: dict) -> None:
    rows = [
        report._row_facts(client().get_run(world[name].run_id)) for name in ("first", "warmer", "teacher")
    ]
    assert report.to_markdown(report.build_table(rows)).count("token_budget differs") == 0
    rows[1]["token_budget"] = 6000  # as a run with train.token_budget=6000 would give
    note = [line for line in report.to_markdown(report.build_table(rows)).splitlines() if "differs" in line]
    assert note == [
        "token_budget differs between training rows (6,000, 12,000): compare methods at equal budget "
        "(--filter on params.`train.token_budget`)."
    ]
