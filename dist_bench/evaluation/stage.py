"""Stage `eval`: every task of eval.tasks for one model, each task in its own energy window.

    dist-bench eval --model tinyworld:teacher --config configs/experiments/tiny_kd.yaml
    dist-bench eval --model <dir> --tasks gsm8k,mmlu,alpaca_eval --max-samples 100 --run-dir runs/bench

In a pipeline the model is the training stage's final model (its content hash is the reuse key, so a
retrained student is always re-evaluated). Tasks run in the order written: lm-eval tasks on one loaded
model (tasks.py says which YAML and which data), judge benchmarks (alpaca_eval, mt_bench_101) with the
same weights answering through the Teacher interface and eval.judge grading.

Energy per task: each task's span (from its first request to its results) is read off the stage's energy
window; what lies outside every span (loading the model and the judge, indexing tasks) is shared among the
tasks in proportion to their spans' durations, so `eval/<task>/energy_j` and `eval/<task>/duration_s` sum
to the stage's `total_energy_j` and `duration_s`. `eval/<task>/tokens` are the evaluated model's tokens, plus
a local judge's, in prefill_tokens and decode_tokens too (its energy is in the window; an API judge's is not,
nor are its tokens: they are eval/<task>/judge_tokens, beside its spend).

Resume: a finished task's record (`tasks_done/<task>.json`) is written before the next starts, and within
an lm-eval task the answers are kept with their tokens (`request_cache/`, written between batches every few
seconds, the energy committed right after: harness.AnswerLog, COMMIT_EVERY_S). A killed stage asks the
model only what it had not answered (any rank's answers serve any rank, so a resume may have another number
of processes). A task with perplexity requests (loglikelihood_rolling) keeps no log and resumes whole. The energy an earlier attempt spent inside a task is in
the stage's total and is shared among the tasks like loading time, since a task's span covers this
attempt's part of it. The answer logs are removed once every task is done.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from dist_bench import distributed, models
from dist_bench.config import RunConfig, flatten
from dist_bench.energy import EnergyReading
from dist_bench.energy.distributed import combine_ranks
from dist_bench.evaluation import tasks as task_plan
from dist_bench.progress import Progress
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

if TYPE_CHECKING:
    from dist_bench.evaluation.harness import CountingHFLM
    from dist_bench.evaluation.judged import JudgedOutcome

STAGE = "eval"


@dataclass
class TaskRecord:
    """One finished task: its scores, its tokens, and its own span of the stage's energy window."""

    task: str
    metrics: dict[str, float]  # "<task>/<metric>" (a group: also its subtasks' "<subtask>/<metric>")
    tokens: int
    prefill_tokens: int
    decode_tokens: int
    span_s: float
    span_energy_j: float | None  # None: the window measures no energy (energy.enabled false, no meter)
    judge_tokens: int = 0
    judge_spend_usd: float | None = None


def run(parent: ParentRun, model: str, fingerprint: str | None = None, dtype: str = "auto") -> StageResult:
    cfg = parent.cfg
    device = models.pick_device(cfg.eval.device)
    params = {
        **flatten(cfg.eval.model_dump(exclude={"judge"}), "eval."),
        **data_fingerprints(cfg),
        "seed": str(cfg.seed),
        "model": model if fingerprint is None else "<upstream final_model>",
        "model.fingerprint": fingerprint or models.fingerprint(model),
        "model.dtype": dtype,
        "device": device.type,
    }
    if cfg.eval.judge is not None and any(name in task_plan.JUDGED for name in cfg.eval.tasks):
        from dist_bench.teacher.generation import writer_params

        params |= writer_params(cfg.eval.judge, "eval.judge", device)
    result = execute_stage(
        parent,
        STAGE,
        params,
        lambda ctx: evaluate(cfg, ctx, model, dtype),
        tags={"dist_bench.eval_model": model},
        data_parallel=True,
    )
    if distributed.is_main():  # the report's quality columns: these tasks' scores, not their subtasks'
        MlflowClient().set_tag(parent.run_id, "dist_bench.eval_tasks", ",".join(cfg.eval.tasks))
    return result


def data_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """Content hashes of what the scores depend on beside the model: every local data source, the task
    YAMLs of eval.task_dir, and lm-eval's version (its built-in tasks): the stage reruns when one changes,
    not only when a path does."""
    from importlib.metadata import version

    folder = task_plan.task_dir_path(cfg.eval.task_dir)
    yamls = sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    out = {
        "eval.task_dir.sha256": models.hash_files(yamls, root=folder),
        "lm_eval.version": version("lm_eval"),
    }
    for name, source in sorted(cfg.eval.data.items()):
        paths = [Path(p) for p in (source.values() if isinstance(source, dict) else [source])]
        files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        out[f"eval.data.{name}.sha256"] = models.hash_files(files)
    return out


def evaluate(cfg: RunConfig, ctx: StageContext, model: str, dtype: str) -> StageWork:
    """Every rank of a job runs this (the stage is data-parallel): lm-eval tasks on all ranks, each scoring
    its share of the documents; judge benchmarks on rank 0 alone, the others waiting in the next reading.
    Rank 0 keeps the records; a task's span is every rank's (energy/distributed.py adds them up)."""
    plan = task_plan.resolve(cfg.eval)
    out = ctx.stage_dir / "lm_eval"
    done_dir = ctx.stage_dir / "tasks_done"
    answers = ctx.stage_dir / "request_cache"  # answer logs, per task and rank, until every task is done
    main = distributed.is_main()
    if main:
        done_dir.mkdir(parents=True, exist_ok=True)
    # rank 0's reading of what earlier attempts finished: every rank skips the same tasks
    records = distributed.broadcast({t.name: _read_record(done_dir / f"{t.name}.json") for t in plan.tasks})
    lm: CountingHFLM | None = None
    manager = None
    done = sum(r is not None for r in records.values())
    progress = Progress(STAGE, len(plan.tasks), "tasks", done=done, shown=main)  # every rank, the same tasks
    for task in plan.tasks:
        if records[task.name] is not None:
            continue  # finished by an earlier attempt
        if task.kind == "judge":
            start = _reading(ctx)
            record = TaskRecord(task.name, {}, 0, 0, 0, 0.0, None)  # the other ranks' part: their GPUs' wait
            if main:
                with distributed.alone():
                    lm = lm or _load_lm(model, cfg, dtype)
                    outcome = _judged(task, lm, cfg, out / task.name)
                record = _judged_record(task.name, outcome, cfg)
        else:
            lm = lm or _load_lm(model, cfg, dtype)
            if manager is None:
                if main:
                    manager = task_plan.materialize(plan, ctx.stage_dir)
                distributed.barrier()  # the task YAMLs rank 0 wrote, before the others index them
                manager = manager or task_plan.materialize(plan, ctx.stage_dir, write=False)
            from dist_bench.evaluation.harness import RequestCache, run_lm_eval

            rolling = task_plan.scored_by_rolling_loglikelihood(task)
            cache = None if rolling else RequestCache(answers / task.name, ctx.commit_energy)
            start = _reading(ctx)
            result = run_lm_eval(
                lm, task.name, manager, cfg.eval, out / task.name, seed=cfg.seed, cache=cache
            )
            if task.name.startswith("olmes"):  # the better formulation per task, MMLU macro-averaged
                from dist_bench.evaluation.olmes import summarize

                result.metrics.update(summarize(result.metrics))
            record = TaskRecord(task.name, result.metrics, result.tokens, result.prefill_tokens,
                                result.decode_tokens, 0.0, None)  # fmt: skip
        end = _reading(ctx)
        record.span_s = end.duration_s - start.duration_s
        if end.total_energy_j is not None and start.total_energy_j is not None:
            record.span_energy_j = end.total_energy_j - start.total_energy_j
        if main:
            _write_record(done_dir / f"{task.name}.json", record)
        ctx.commit_energy()
        records[task.name] = record
        progress.advance()
    progress.close()
    if main:  # every rank has closed its files: each passed the last task's closing reading
        shutil.rmtree(answers, ignore_errors=True)
    finished = [r for r in records.values() if r is not None]
    metrics: dict[str, float] = {}
    for record in finished:
        # a score that could not be computed (NaN: too few verdicts for a GLM) is absent, not logged
        metrics.update({f"eval/{k}": v for k, v in record.metrics.items() if math.isfinite(v)})
        if record.judge_tokens:
            metrics[f"eval/{record.task}/judge_tokens"] = record.judge_tokens
        if record.judge_spend_usd is not None:
            metrics[f"eval/{record.task}/judge_spend_usd"] = record.judge_spend_usd
    metrics["prefill_tokens"] = sum(r.prefill_tokens for r in finished)
    metrics["decode_tokens"] = sum(r.decode_tokens for r in finished)
    return StageWork(
        tokens=sum(r.tokens for r in finished),
        outputs={"lm_eval": out},
        fingerprints={},
        metrics=metrics,
        details={
            "model": model,
            "tasks": {t.name: t.source for t in plan.tasks},
            "per_task": {r.task: asdict(r) for r in finished},
        },
        artifacts={"tasks_done": done_dir},
        energy_split=lambda energy: split_energy(finished, energy),
    )


def split_energy(records: list[TaskRecord], energy: EnergyReading) -> dict[str, float]:
    """eval/<task>/{energy_j,duration_s,tokens,j_per_token}: each task's span plus its share (by span
    duration) of the stage's time and energy outside every span, so that the tasks sum to the stage."""
    metrics: dict[str, float] = {}
    spans_s = sum(r.span_s for r in records)
    outside_s = max(energy.duration_s - spans_s, 0.0)
    total_j = energy.total_energy_j
    measured = total_j is not None and all(r.span_energy_j is not None for r in records)
    outside_j = total_j - sum(r.span_energy_j for r in records) if measured else None  # type: ignore[misc,operator]
    for record in records:
        share = record.span_s / spans_s if spans_s > 0 else 1.0 / len(records)
        metrics[f"eval/{record.task}/tokens"] = record.tokens
        metrics[f"eval/{record.task}/duration_s"] = record.span_s + outside_s * share
        if measured:
            joules = record.span_energy_j + outside_j * share  # type: ignore[operator]
            metrics[f"eval/{record.task}/energy_j"] = joules
            if record.tokens:
                metrics[f"eval/{record.task}/j_per_token"] = joules / record.tokens
    return metrics


def _reading(ctx: StageContext) -> EnergyReading:
    """The window's figures so far, after the GPU has finished what was queued (a span ends with its work):
    every rank's, combined as at the window's end (a collective: every rank reads at the same points)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return combine_ranks(ctx.window.read())


def _load_lm(model: str, cfg: RunConfig, dtype: str) -> CountingHFLM:
    from dist_bench.evaluation.harness import load_lm

    return load_lm(model, cfg.eval, dtype)


def _judged(task: task_plan.TaskPlan, lm: CountingHFLM, cfg: RunConfig, out: Path) -> JudgedOutcome:
    """A judge benchmark: the model under test (the weights lm-eval holds, no second load) answers through
    the Teacher interface, eval.judge grades."""
    from dist_bench.evaluation import alpaca_eval, mt_bench_101
    from dist_bench.teacher.generation import load_writer
    from dist_bench.teacher.local import LocalTeacher, resolve_backend

    assert cfg.eval.judge is not None and isinstance(task.data, str)  # pre-flight: judge set, data a file
    device = models.pick_device(cfg.eval.device)
    model = LocalTeacher(
        lm.model,
        lm.tokenizer,
        cfg.eval.batch_size,
        identity={"model": str(lm.model.name_or_path)},
        backend=resolve_backend(cfg.generation.backend, device, type(lm.model)),
    )
    judge = load_writer(cfg, cfg.eval.judge, out / "judge-api-samples", device, own_template=True)
    benchmark = {"alpaca_eval": alpaca_eval.run, "mt_bench_101": mt_bench_101.run}[task.name]
    outcome = benchmark(
        model,
        judge,
        Path(task.data),
        out,
        model_chat=bool(getattr(lm.tokenizer, "chat_template", None)),
        judge_chat=_reads_chat(cfg, judge),
        max_samples=cfg.eval.limit,
        max_new_tokens=cfg.eval.max_new_tokens,
        judge_max_new_tokens=cfg.eval.judge_max_new_tokens,
        seed=cfg.seed,
    )
    del judge
    models.free_memory()
    return outcome


def _reads_chat(cfg: RunConfig, judge: Any) -> bool:
    """An API judge on the chat endpoint, or a local judge with a chat template, takes instructions as a user
    turn; a base model reads text."""
    spec = cfg.eval.judge
    if spec is not None and spec.api is not None:
        return spec.api.endpoint == "chat"
    return bool(getattr(getattr(judge, "tokenizer", None), "chat_template", None))


def _judged_record(name: str, outcome: JudgedOutcome, cfg: RunConfig) -> TaskRecord:
    """The tokens of the work done here: the model under test's, and a local judge's (an API judge's are
    counted apart, in judge_tokens, as their energy is not in this window)."""
    local = cfg.eval.judge is not None and cfg.eval.judge.api is None
    prefill = outcome.prefill_tokens + (outcome.judge_prefill_tokens if local else 0)
    decode = outcome.decode_tokens + (outcome.judge_decode_tokens if local else 0)
    return TaskRecord(
        task=name,
        metrics=outcome.metrics,
        tokens=prefill + decode,
        prefill_tokens=prefill,
        decode_tokens=decode,
        span_s=0.0,
        span_energy_j=None,
        judge_tokens=outcome.judge_prefill_tokens + outcome.judge_decode_tokens,
        judge_spend_usd=outcome.judge_spend_usd,
    )


def _read_record(path: Path) -> TaskRecord | None:
    return TaskRecord(**json.loads(path.read_text())) if path.is_file() else None


def _write_record(path: Path, record: TaskRecord) -> None:
    tmp = path.with_suffix(f".tmp{time.monotonic_ns()}")
    tmp.write_text(json.dumps(asdict(record), indent=2, sort_keys=True))
    tmp.replace(path)
