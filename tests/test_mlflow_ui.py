"""What a user comparing pipelines in the MLflow UI sees: headline metrics named alike on every parent, in
Wh / g / J per token, a tag on what the total covers, a one-line description, params that apply to the
pipeline (the model among them, and in the config hash), stage runs named after their pipeline, the
experiment's shared view with the headline columns, a note where a power timeline is missing, and no
artifact folder that belongs to no run. The browser test (test_mlflow_browser.py) looks at the real UI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import small_config
from dist_bench import headline, pipeline, registry, report
from dist_bench.config import config_hash
from dist_bench.energy.nvml_sim import SimulatedNvml
from dist_bench.tracking import pipeline_config


def test_parents_carry_headline_metrics_a_description_and_their_own_params(
    workdir: Path, simulated_gpu: SimulatedNvml
) -> None:
    kd_cfg = small_config(workdir)
    kd = pipeline.kd(kd_cfg)
    sft = pipeline.sft(small_config(workdir, "name=tiny-sft", "pipeline=sft", "generation.enabled=false"))
    client = MlflowClient()
    for parent, cfg in ((kd, kd_cfg), (sft, None)):
        run = client.get_run(parent.run_id)
        metrics, tags, params = run.data.metrics, run.data.tags, run.data.params
        assert metrics["energy_wh"] == float(f"{metrics['total/total_energy_j'] / 3600:.4g}")
        assert metrics["gpu_energy_wh"] == pytest.approx(metrics["total/gpu_energy_j"] / 3600, rel=1e-3)
        assert "co2e_g" not in metrics and "total/co2e_kg" not in metrics  # CPU and RAM unmeasured here
        assert metrics["j_per_token"] == pytest.approx(metrics["total/j_per_token"], rel=1e-3)
        assert metrics["wall_time_min"] == pytest.approx(metrics["total/duration_s"] / 60, rel=1e-3)
        teacher = metrics.get("logit_caching/total_energy_j", 0.0)
        assert metrics["student_energy_wh"] == pytest.approx(
            metrics["student_train/total_energy_j"] / 3600, rel=1e-3
        )
        assert metrics["eval_energy_wh"] == pytest.approx(metrics["eval/total_energy_j"] / 3600, rel=1e-3)
        assert ("teacher_energy_wh" in metrics) == (parent is kd)
        assert sum(metrics.get(f"{r}_energy_wh", 0.0) for r in headline.ROLES) == pytest.approx(
            metrics["energy_wh"], rel=1e-3
        )
        assert teacher >= 0
        # What the total covers, stage by stage, with each component's source.
        assert tags[headline.COVERS].startswith("all stages: ")
        assert "student_train (gpu nvml_counter" in tags[headline.COVERS]
        # The description: the pipeline, the models, the figures as the metrics give them.
        note = tags[headline.NOTE]
        assert note.startswith(f"**{parent.pipeline}** `{run.info.run_name}`: tinyworld:teacher → ")
        assert f"{metrics['energy_wh']:.3g} Wh" in note
        assert f"tiny_arith/exact_match {metrics['eval/tiny_arith/exact_match']:.3f}" in note
        # Params: the pipeline's own sections, the model under `model`; the hash covers exactly them.
        assert params["model"] == "tinyworld:student-init" and params["pipeline"] == parent.pipeline
        assert not any(k.startswith(("dpo.", "preferences.", "tracking.", "output.")) for k in params)
        assert params["prerun.enabled"] == "False" and "prerun.quick" not in params
        assert any(k.startswith("logits.") for k in params) == (parent is kd)
        assert params["generation.enabled" if parent is sft else "kd.loss"]
        if cfg is not None:
            expected = config_hash(pipeline_config(cfg, "kd", cfg.student.model))
            assert tags["dist_bench.config_hash"] == expected
        # Stage runs say whose stage they are.
        names = sorted(client.get_run(s.run_id).info.run_name for s in parent.stages)
        assert names == sorted(f"{run.info.run_name}/{s.stage}" for s in parent.stages)
    assert (
        client.get_run(kd.run_id).data.tags["dist_bench.config_hash"]
        != client.get_run(sft.run_id).data.tags["dist_bench.config_hash"]
    )
    # The experiment's shared view: pipeline parents, the headline columns, every quality column seen.
    experiment = client.get_experiment(kd.experiment_id)
    view = json.loads(experiment.tags[headline.VIEW_TAG])
    assert view["searchFilter"] == "tags.`dist_bench.role` = 'pipeline'"
    for name in (*headline.HEADLINE, "eval/tiny_arith/exact_match", "eval/tiny_mc/acc"):
        assert f"metrics.`{name}`" in view["selectedColumns"]
    assert "params.`model`" in view["selectedColumns"]


def test_eval_parents_of_two_models_differ_in_model_param_and_config_hash(workdir: Path) -> None:
    cfg = small_config(workdir, "eval.tasks=[tiny_arith]")
    first = pipeline.evaluate(cfg, "tinyworld:teacher")
    second = pipeline.evaluate(cfg, "tinyworld:student-init")
    client = MlflowClient()
    runs = [client.get_run(p.run_id) for p in (first, second)]
    assert [r.data.params["model"] for r in runs] == ["tinyworld:teacher", "tinyworld:student-init"]
    assert runs[0].data.tags["dist_bench.config_hash"] != runs[1].data.tags["dist_bench.config_hash"]
    for run in runs:  # the eval settings, not the KD ones
        assert {k.split(".")[0] for k in run.data.params} == {"model", "pipeline", "seed", "eval", "energy"}
        assert run.data.tags[headline.NOTE].startswith(f"**eval** `{run.info.run_name}`: ")


def test_without_a_gpu_a_note_stands_where_the_timeline_would_be_and_no_artifact_folder_is_orphaned(
    workdir: Path,
) -> None:
    parent = pipeline.kd(small_config(workdir, "energy.codecarbon=true"))  # CPU and RAM estimated
    metrics = MlflowClient().get_run(parent.run_id).data.metrics
    assert metrics["co2e_g"] == pytest.approx(metrics["total/co2e_kg"] * 1000, rel=1e-3)
    assert "gpu_energy_wh" not in metrics and metrics["energy_wh"] > 0
    registry.register(parent.run_id, "tiny-kd-student", "candidate")  # a logged model has its own folder
    report.run(["dist-bench"], workdir / "report")
    client = MlflowClient()
    for run_id in [parent.run_id, *(s.run_id for s in parent.stages)]:
        files = {f.path for f in client.list_artifacts(run_id, "energy")}
        assert files == {"energy/power_timeline.txt"}, files
        local = Path(client.download_artifacts(run_id, "energy/power_timeline.txt", str(workdir / run_id)))
        text = local.read_text()
        assert text.startswith("No power timeline") and "GPU" in text
    # Every folder under mlruns/<experiment>/ is a run's or a logged model's.
    runs = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    models = {m.model_id for m in client.search_logged_models(experiment_ids=experiment_ids)}
    for experiment in (workdir / "mlruns").iterdir():
        for folder in experiment.iterdir():
            if folder.name == "models":
                assert {m.name for m in folder.iterdir()} <= models
            else:
                assert folder.name in runs, f"orphan artifact folder {folder}"
