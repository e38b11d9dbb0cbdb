"""Pre-flight: one pass over every input of a pipeline before any MLflow run opens or any stage starts.

    checks = preflight.run(cfg, "kd")          # a list of Check; raises PreflightError naming the culprit
    dist-bench validate kd --config configs/experiments/tiny_kd.yaml      # runs only this, prints the checks

A mistake that a check of seconds can find must not be found after hours of paid teacher work. The order
is cheap first, so that the commonest mistakes (a path, a typo'd id, a dead server) are answered in about a
second: tracking store, run dir, model specs, data file, devices; then what needs transformers and lm-eval
(configs, tokenizers, vocabularies, top-k, tasks, generation length) and the disk the logit cache will
fill. Nothing here loads weights or writes a file. Every stage adds its checks to its pipeline's function
below.

    __init__.py    the pipelines: which checks each runs, in which order
    store.py       tracking store, folders, devices
    models.py      model specs, vocabularies, top-k
    data.py        training data, generation settings, cache disk
    evaluation.py  lm-eval tasks
"""

from __future__ import annotations

from pathlib import Path

from dist_bench.config import ModelSpec, RunConfig
from dist_bench.preflight.base import Check, PreflightError, located
from dist_bench.preflight.data import (
    DataScan,
    cache_disk,
    data_records,
    planned_cache_bytes,
    preference_generation,
    preference_pairs,
    teacher_generation,
)
from dist_bench.preflight.evaluation import eval_tasks, judge_check
from dist_bench.preflight.models import (
    ModelFacts,
    ModelSource,
    model_facts,
    model_source,
    same_vocabulary,
    student_kernels,
    top_k,
)
from dist_bench.preflight.store import (
    DEFAULT_TRACKING_URI,
    device,
    energy_devices,
    tracking_store,
    tracking_uri,
    training_ranks,
    writable_dir,
)

__all__ = [
    "DEFAULT_TRACKING_URI", "PIPELINES", "Check", "DataScan", "ModelFacts", "ModelSource", "PreflightError",
    "cache_logits", "data_records", "evaluate", "generate", "kd", "model_facts", "model_source",
    "planned_cache_bytes", "preferences", "prerun", "report", "run", "sft", "tracking_uri", "training_ranks",
]  # fmt: skip

PIPELINES = ("kd", "sft", "dpo", "generate", "preferences", "cache_logits", "eval", "prerun", "report")


def run(
    cfg: RunConfig, pipeline: str, *, eval_model: str | None = None, output_dir: Path | None = None
) -> list[Check]:
    """Every check of `pipeline`; the first failure raises PreflightError, led by the config file and line
    of the field it names."""
    try:
        checks = _checks(cfg, pipeline, eval_model, output_dir)
        # every stage a pipeline runs measures its energy; report runs none
        return checks if pipeline == "report" else [*checks, *energy_devices(cfg)]
    except PreflightError as err:
        raise located(err, cfg) from None


def _checks(cfg: RunConfig, pipeline: str, eval_model: str | None, output_dir: Path | None) -> list[Check]:
    if pipeline == "kd":
        return kd(cfg)
    if pipeline == "sft":
        return sft(cfg)
    if pipeline == "dpo":
        return dpo(cfg)
    if pipeline == "cache_logits":
        return cache_logits(cfg)
    if pipeline == "generate":
        return generate(cfg)
    if pipeline == "preferences":
        return preferences(cfg)
    if pipeline == "eval":
        if not eval_model:
            raise PreflightError("--model: required for the eval pipeline")
        return evaluate(cfg, eval_model)
    if pipeline == "prerun":
        return prerun(cfg, output_dir)
    if pipeline == "report":
        return report(output_dir or Path("report"))
    raise PreflightError(f"pipeline: '{pipeline}' is not one of {', '.join(PIPELINES)}")


# ---- the pipelines ------------------------------------------------------------------------------------


def kd(cfg: RunConfig) -> list[Check]:
    """logit_caching -> student_train -> eval: both models, their shared vocabulary, data, tasks, disk."""
    checks = [
        pipeline_matches(cfg, "kd"),
        tracking_store(),
        writable_dir("output.run_dir", cfg.output.run_dir),
    ]
    teacher_source = model_source("teacher.model", cfg.teacher)
    student_source = model_source("student.model", cfg.student)
    checks += [teacher_source.check, student_source.check]
    data = data_records(cfg, trained_on=True)
    checks += [data.check, device("train.device", cfg.train.device), device("eval.device", cfg.eval.device)]
    teacher = model_facts(teacher_source, cfg.teacher)
    student = model_facts(student_source, cfg.student)
    checks += [top_k(cfg, teacher), same_vocabulary(teacher, student), *student_kernels(cfg, student)]
    checks += [eval_tasks(cfg.eval, student), *judge_check(cfg.eval), cache_disk(cfg, teacher, data)]
    return checks


def sft(cfg: RunConfig) -> list[Check]:
    """student_train -> eval: the student (any tokenizer), data, devices, tasks."""
    checks = [
        pipeline_matches(cfg, "sft"),
        tracking_store(),
        writable_dir("output.run_dir", cfg.output.run_dir),
    ]
    student_source = model_source("student.model", cfg.student)
    data = data_records(cfg, trained_on=True)  # or on the teacher's completions of its prompts
    checks += [student_source.check, data.check]
    if cfg.generation.enabled:  # the teacher writes the data first
        checks += teacher_generation(cfg, data)
    checks += [device("train.device", cfg.train.device), device("eval.device", cfg.eval.device)]
    student = model_facts(student_source, cfg.student)
    return [*checks, *student_kernels(cfg, student), eval_tasks(cfg.eval, student), *judge_check(cfg.eval)]


def dpo(cfg: RunConfig) -> list[Check]:
    """teacher_generation? -> dpo_training -> eval: the policy; the models that build the pairs, or the pairs
    (every row, TRL's form); devices, tasks."""
    checks = [
        pipeline_matches(cfg, "dpo"),
        tracking_store(),
        writable_dir("output.run_dir", cfg.output.run_dir),
    ]
    policy_source = model_source("student.model", cfg.student)
    checks.append(policy_source.check)
    if cfg.preferences.method is not None:  # the teacher builds the pairs first
        data = data_records(cfg, trained_on=False)
        checks += [data.check, *preference_generation(cfg, data)]
    else:
        checks.append(preference_pairs(cfg))
    checks += [device("train.device", cfg.train.device), device("eval.device", cfg.eval.device)]
    policy = model_facts(policy_source, cfg.student)
    return [*checks, *student_kernels(cfg, policy), eval_tasks(cfg.eval, policy), *judge_check(cfg.eval)]


def generate(cfg: RunConfig) -> list[Check]:
    """teacher_generation alone: the teacher, the prompts, the decoding and filter settings."""
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    data = data_records(cfg, trained_on=False)
    checks += [data.check, *teacher_generation(cfg, data), device("train.device", cfg.train.device)]
    return checks


def preferences(cfg: RunConfig) -> list[Check]:
    """teacher_generation in preference mode alone: every model that writes, the prompts, the method."""
    if cfg.preferences.method is None:
        raise PreflightError(
            "preferences.method: unset; the preferences entry point builds pairs (verified, "
            "teacher_vs_student or judge)"
        )
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    data = data_records(cfg, trained_on=False)
    return [*checks, data.check, *preference_generation(cfg, data), device("train.device", cfg.train.device)]


def pipeline_matches(cfg: RunConfig, pipeline: str) -> Check:
    if cfg.pipeline != pipeline:
        raise PreflightError(
            f"pipeline: the config is for '{cfg.pipeline}' but this is the {pipeline} entry point "
            f"(run dist-bench {cfg.pipeline}, or set pipeline={pipeline})"
        )
    return Check("pipeline", pipeline)


def cache_logits(cfg: RunConfig) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    teacher_source = model_source("teacher.model", cfg.teacher)
    data = data_records(cfg, trained_on=True)
    checks += [teacher_source.check, data.check, device("train.device", cfg.train.device)]
    teacher = model_facts(teacher_source, cfg.teacher)
    return [*checks, top_k(cfg, teacher), cache_disk(cfg, teacher, data)]


def evaluate(cfg: RunConfig, model: str) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    source = model_source("--model", ModelSpec(model=model))
    checks += [source.check, device("eval.device", cfg.eval.device)]
    facts = model_facts(source, ModelSpec(model=model))
    return [*checks, eval_tasks(cfg.eval, facts), *judge_check(cfg.eval)]


def prerun(cfg: RunConfig, output_dir: Path | None) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    if output_dir is not None:
        checks.append(writable_dir("--output-dir", output_dir))
    return checks


def report(output_dir: Path) -> list[Check]:
    return [tracking_store(), writable_dir("--output-dir", output_dir)]
