"""Pipelines: each entry point is a parent MLflow run whose stages are nested child runs.

    kd            prerun? -> logit_caching -> student_train -> eval      (dist-bench kd / mlflow run . -e kd)
    sft           prerun? -> teacher_generation? -> student_train -> eval  (dist-bench sft / mlflow run . -e sft)
    dpo           prerun? -> teacher_generation? -> dpo_training -> eval   (dist-bench dpo / mlflow run . -e dpo)
    generate      teacher_generation                          (dist-bench generate)
    preferences   teacher_generation, preference mode         (dist-bench preferences)
    prerun        prerun: idle baseline, burn-in, sampling check, hardware (dist-bench prerun)
    cache_logits  logit_caching                               (dist-bench cache_logits)
    eval          eval of one model                           (dist-bench eval --model ...)

Each first runs its pre-flight pass (preflight/): bad input stops it before any MLflow run opens.
A stage that already ran with identical inputs is reused (see tracking.execute_stage), so running
`cache_logits` first and `kd` afterwards caches the teacher once.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from dist_bench import preflight, prerun
from dist_bench.config import ConfigError, RunConfig, load_config
from dist_bench.evaluation import stage as eval_stage
from dist_bench.student import dpo as dpo_stage
from dist_bench.student import stage as student_stage
from dist_bench.teacher import generation, logit_cache, preferences
from dist_bench.tracking import ParentRun, pipeline_run


def _identity_tags(cfg: RunConfig) -> dict[str, str]:
    return {
        "dist_bench.teacher": cfg.teacher.model,
        "dist_bench.student": cfg.student.model,
        "dist_bench.data": cfg.data.train,
    }


def kd(
    cfg: RunConfig, checks: list[preflight.Check] | None = None, tags: dict[str, str] | None = None
) -> ParentRun:
    """`checks`: the pre-flight pass already run (the CLI runs it before importing this module); `tags`:
    more tags for the parent (a sweep's point)."""
    checks = preflight.kd(cfg) if checks is None else checks  # every input, before any run or stage
    with pipeline_run(
        cfg, "kd", _run_name(cfg, tags), {**_identity_tags(cfg), **(tags or {})}, checks, cfg.student.model
    ) as parent:
        if cfg.prerun.enabled:  # first: a failed required check stops it before any teacher work
            prerun.run_stage(parent)
        cache = logit_cache.run(parent)
        student = student_stage.run(parent, cache)
        eval_stage.run(
            parent,
            model=str(student.outputs["final_model"]),
            fingerprint=student.fingerprints["final_model"],
        )
    return parent


def sft(
    cfg: RunConfig, checks: list[preflight.Check] | None = None, tags: dict[str, str] | None = None
) -> ParentRun:
    """The student trained on teacher-written completions of the data's prompts (generation.enabled), or on
    the data itself."""
    checks = preflight.sft(cfg) if checks is None else checks
    with pipeline_run(
        cfg, "sft", _run_name(cfg, tags), {**_identity_tags(cfg), **(tags or {})}, checks, cfg.student.model
    ) as parent:
        if cfg.prerun.enabled:
            prerun.run_stage(parent)
        data = None
        if cfg.generation.enabled:
            written = generation.run(parent)
            data = generation.training_data(cfg.data, written.outputs["train_data"])
        student = student_stage.run(parent, data=data)
        eval_stage.run(
            parent,
            model=str(student.outputs["final_model"]),
            fingerprint=student.fingerprints["final_model"],
        )
    return parent


def dpo(
    cfg: RunConfig, checks: list[preflight.Check] | None = None, tags: dict[str, str] | None = None
) -> ParentRun:
    """The policy (student.model: any model spec, e.g. runs:/<sft run>/final_model) trained by DPO on pairs
    the teacher built (preferences.method) or on preferences.path's."""
    checks = preflight.dpo(cfg) if checks is None else checks
    with pipeline_run(
        cfg, "dpo", _run_name(cfg, tags), {**_identity_tags(cfg), **(tags or {})}, checks, cfg.student.model
    ) as parent:
        if cfg.prerun.enabled:
            prerun.run_stage(parent)
        generated = preferences.run(parent) if cfg.preferences.method is not None else None
        policy = dpo_stage.run(parent, generated)
        eval_stage.run(
            parent,
            model=str(policy.outputs["final_policy"]),
            fingerprint=policy.fingerprints["final_policy"],
        )
    return parent


SWEEP, ABLATION = "dist_bench.sweep", "dist_bench.ablation"


def ablation_points(cfg: RunConfig) -> list[tuple[str, list[str]]]:
    """(label, overrides) of every point of cfg.ablations' grid, in the order written."""
    if cfg.ablations is None:
        return []
    keys = list(cfg.ablations.grid)
    points = []
    for values in itertools.product(*cfg.ablations.grid.values()):
        overrides = [f"{key}={json.dumps(value)}" for key, value in zip(keys, values, strict=True)]
        points.append((",".join(overrides), overrides))
    return points


def sweep(experiment: str | Path | None, overrides: list[str], pipeline: str = "sft") -> list[ParentRun]:
    """One parent per point of the experiment's ablations grid, tagged dist_bench.sweep and
    dist_bench.ablation. Every point's config is loaded and pre-flight checked before the first one runs."""
    base = load_config(experiment, overrides)
    if base.ablations is None:
        raise ConfigError(
            "ablations: --ablations needs an ablations block (name, grid) in the experiment file"
        )
    points = [
        (label, load_config(experiment, [*overrides, *extra])) for label, extra in ablation_points(base)
    ]
    checked = [(label, cfg, preflight.run(cfg, pipeline)) for label, cfg in points]
    run = {"sft": sft, "kd": kd, "dpo": dpo}[pipeline]
    return [
        run(cfg, checks, tags={SWEEP: base.ablations.name, ABLATION: label}) for label, cfg, checks in checked
    ]


def _run_name(cfg: RunConfig, tags: dict[str, str] | None) -> str:
    return f"{cfg.name}[{tags[ABLATION]}]" if tags and ABLATION in tags else cfg.name


def generate(cfg: RunConfig, checks: list[preflight.Check] | None = None) -> ParentRun:
    """The teacher_generation stage alone; a later `sft` with the same generation settings reuses it."""
    checks = preflight.generate(cfg) if checks is None else checks
    with pipeline_run(
        cfg, "generate", f"{cfg.name}-generate", _identity_tags(cfg), checks, cfg.teacher.model
    ) as parent:
        generation.run(parent)
    return parent


def build_preferences(cfg: RunConfig, checks: list[preflight.Check] | None = None) -> ParentRun:
    """teacher_generation in preference mode alone; a later `dpo` with the same settings reuses its pairs."""
    checks = preflight.preferences(cfg) if checks is None else checks
    with pipeline_run(
        cfg, "preferences", f"{cfg.name}-preferences", _identity_tags(cfg), checks, cfg.teacher.model
    ) as parent:
        preferences.run(parent)
    return parent


def cache_logits(cfg: RunConfig, checks: list[preflight.Check] | None = None) -> ParentRun:
    checks = preflight.cache_logits(cfg) if checks is None else checks
    with pipeline_run(
        cfg, "cache_logits", f"{cfg.name}-cache", _identity_tags(cfg), checks, cfg.teacher.model
    ) as parent:
        logit_cache.run(parent)
    return parent


def evaluate(
    cfg: RunConfig, model: str, dtype: str = "auto", checks: list[preflight.Check] | None = None
) -> ParentRun:
    tags = {"dist_bench.student": model, "dist_bench.data": ",".join(cfg.eval.tasks)}
    checks = preflight.evaluate(cfg, model) if checks is None else checks
    with pipeline_run(cfg, "eval", f"eval:{model}", tags, checks, model) as parent:
        eval_stage.run(parent, model=model, dtype=dtype)
    return parent


def validate(
    cfg: RunConfig, output_dir: Path | None = None, checks: list[preflight.Check] | None = None
) -> tuple[ParentRun, prerun.PrerunReport]:
    """Standalone pre-run validation; a critical finding fails the run (PrerunFailed), as a gate would."""
    gate = cfg.model_copy(update={"prerun": cfg.prerun.model_copy(update={"required": True})})
    checks = preflight.prerun(cfg, output_dir) if checks is None else checks
    with pipeline_run(gate, "prerun", f"{cfg.name}-prerun", {}, checks) as parent:
        _, report = prerun.run_stage(parent, output_dir)
    return parent, report
