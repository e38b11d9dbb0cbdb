"""lm-eval tasks: they resolve, their data is there, their generations fit the model's context."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dist_bench.config import EvalConfig
from dist_bench.preflight.base import Check, PreflightError
from dist_bench.preflight.models import ModelFacts

# ---- evaluation ---------------------------------------------------------------------------------------


def eval_tasks(cfg: EvalConfig, model: ModelFacts) -> Check:
    """Every task resolves to a YAML, its data is there, and its generations fit the model's context."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length
    from lm_eval.tasks import TaskManager

    from dist_bench.evaluation.harness import task_dir_path, task_specs

    try:
        folder = task_dir_path(cfg.task_dir)
    except FileNotFoundError as err:
        raise PreflightError(str(err)) from None
    manager = TaskManager(include_path=str(folder), include_defaults=cfg.include_default_tasks)
    try:
        specs = task_specs(cfg.tasks, manager)
    except (ValueError, FileNotFoundError) as err:
        raise PreflightError(f"eval.tasks: {err}") from None
    max_length = cfg.max_length or resolve_max_length(
        model.config, model.tokenizer, default=HFLM._DEFAULT_MAX_LENGTH
    )
    for spec in specs:
        if isinstance(spec, dict):
            _task_data_present(spec)
            _generation_fits(spec, max_length, cfg, model)
    return Check("eval.tasks", f"{', '.join(cfg.tasks)} (data present; model context {max_length} tokens)")


def _generation_fits(task: dict[str, Any], max_length: int, cfg: EvalConfig, model: ModelFacts) -> None:
    # lm-eval keeps max_length - max_gen_toks tokens of context and asserts that this is positive.
    if task.get("output_type") != "generate_until":
        return
    kwargs = task.get("generation_kwargs") or {}
    aliases = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
    max_gen = next(
        (int(kwargs[key]) for key in aliases if kwargs.get(key) is not None), 256
    )  # HFLM's default
    if max_gen >= max_length:
        origin = "eval.max_length" if cfg.max_length else f"the context of {model.source.spec}"
        raise PreflightError(
            f"eval.tasks: task '{task['task']}' generates up to {max_gen} tokens but {origin} is {max_length} "
            "tokens; set eval.max_length above it (a model that supports it) or lower the task's max_gen_toks"
        )


def _task_data_present(task: dict[str, Any]) -> None:
    """Local dataset folders exist (data_files were checked by task_specs); Hub datasets are cached when the
    Hub is off limits."""
    dataset = str(task.get("dataset_path") or "")
    if not dataset or (task.get("dataset_kwargs") or {}).get("data_files") is not None:
        return
    if Path(dataset).is_absolute() or Path(dataset).exists():  # a local folder (made absolute by task_config)
        if not Path(dataset).exists():
            raise PreflightError(f"eval.tasks: task '{task['task']}': dataset folder {dataset} not found")
        return
    offline = any(
        os.environ.get(name, "").lower() in ("1", "true", "yes")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    if offline and not _dataset_cached(dataset):
        raise PreflightError(
            f"eval.tasks: task '{task['task']}' reads the Hub dataset '{dataset}', which is not in the local "
            "cache, and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
        )


def _dataset_cached(dataset: str) -> bool:
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub.is_dir() or (datasets_cache / dataset.replace("/", "___")).is_dir()
