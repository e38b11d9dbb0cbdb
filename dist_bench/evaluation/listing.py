"""The benchmark-only harness's two outputs beyond the MLflow runs (seed 001):

dist-bench eval --tasks list                          -> task_table(cfg.eval): every task, its data, deps
dist-bench eval --model M --run-dir DIR [--tasks ...] -> DIR/benchmark_summary.json (write_benchmark_summary)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_bench.config import EvalConfig
from dist_bench.evaluation import tasks as task_plan
from dist_bench.tracking import ParentRun

SUMMARY_FORMAT = "dist-bench-benchmark-summary/1"


def task_table(cfg: EvalConfig) -> str:
    """One line per task: the task_dir's own (groups and standalone tasks), the cited benchmarks, and any
    named in eval.tasks or eval.data; where its data comes from (local, hub, missing) and its dependencies."""
    rows = [("task", "kind", "dependencies", "data")]
    names = _listed_names(cfg)
    try:  # all at once: each resolve indexes the task folders (~0.5 s)
        every = cfg.model_copy(
            update={"tasks": names, "data": {n: cfg.data[n] for n in names if n in cfg.data}}
        )
        resolved: dict[str, task_plan.TaskPlan] = {t.name: t for t in task_plan.resolve(every).tasks}
    except task_plan.TaskError:  # one at a time, so that the error stays on the task it is about
        resolved = {}
    for name in names:
        task = resolved.get(name)
        if task is None:
            data = {name: cfg.data[name]} if name in cfg.data else {}
            try:
                task = task_plan.resolve(cfg.model_copy(update={"tasks": [name], "data": data})).tasks[0]
            except task_plan.TaskError as err:
                rows.append((name, "?", "", f"error: {err}"))
                continue
        missing = task_plan.missing_dependencies(name)
        deps = "missing: " + ", ".join(missing) if missing else "installed"
        rows.append((name, task.kind, deps, task_plan.data_source(task)))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)) + "  " + row[3]
        for row in rows
    )


def _listed_names(cfg: EvalConfig) -> list[str]:
    from lm_eval.tasks import TaskManager

    own = TaskManager(include_path=str(task_plan.task_dir_path(cfg.task_dir)), include_defaults=False)
    in_groups = {
        leaf for group in own.all_groups for leaf, _ in task_plan._leaves(own, group) if leaf != group
    }
    nested = {name for group in own.all_groups for name in task_plan.group_members(own, group)}
    standalone = [name for name in own.all_subtasks if name not in in_groups]
    groups = [name for name in own.all_groups if name not in nested]
    return list(dict.fromkeys([*standalone, *groups, *task_plan.CITED, *cfg.tasks, *cfg.data]))


def write_benchmark_summary(runs: list[ParentRun], run_dir: Path) -> Path:
    """run_dir/benchmark_summary.json: per model its parent run, every task's scores, tokens, energy and time,
    and where the per-task lm-eval JSON files are."""
    models = []
    for run in runs:
        stage = next(s for s in run.stages if s.stage == "eval")
        per_task: dict[str, dict[str, Any]] = {}
        for name, value in stage.metrics.items():
            if name.startswith("eval/"):
                task, _, metric = name.removeprefix("eval/").partition("/")
                per_task.setdefault(task, {})[metric] = value
        models.append({
            "model": stage.summary.get("model") or run.cfg.name,
            "parent_run_id": run.run_id,
            "eval_run_id": stage.run_id,
            "reused": stage.reused,
            "tasks": per_task,
            "stage": {k: v for k, v in stage.metrics.items() if not k.startswith("eval/")},
            "task_files": str(stage.outputs.get("lm_eval", "")),
        })  # fmt: skip
    path = Path(run_dir) / "benchmark_summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": SUMMARY_FORMAT, "models": models}, indent=2, sort_keys=True))
    return path
