"""MLflow: the parent run of a pipeline, one nested child run per stage, stage reuse (the roll-up onto the
parent is rollup.py's).

    with pipeline_run(cfg, pipeline="kd", run_name=cfg.name) as parent:
        cache = execute_stage(parent, "logit_caching", params, work=...)   # a StageResult
        ...
    # parent carries <stage>/<metric>, total/<metric>, eval/<task>/<metric>, the headline metrics and
    # experiment_summary.json; its params are the pipeline's config sections and its model

A stage is reused, not recomputed, when a FINISHED run of the same stage id exists whose params (compared
as strings, as MLflow's multistep example does) and code version match and whose outputs are still on
disk with the recorded content hashes; upstream outputs enter the params as their hashes, so a changed
teacher cache invalidates everything downstream. Stage working files live in
`<output.run_dir>/<stage>/<stage key>/`; a stage killed half-way resumes from them on the next call.

Runs are created with their tags in one call, and every pipeline and stage run names the lock file its
process holds while it lives (liveness.py): the next pipeline marks the runs of a process that died without
ending them (SIGKILL, the OOM killer, a lost node) KILLED instead of leaving them RUNNING for ever.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

import mlflow
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from dist_bench import distributed, environment, headline, liveness, models, rollup
from dist_bench.config import RunConfig, config_hash, flatten
from dist_bench.energy import EnergyReading, EnergyWindow, committed, stage_metrics, stage_tags
from dist_bench.energy.gpu import measure_idle_power_w
from dist_bench.energy.outputs import StageSeries, plot_timeline, write_timeline_csv
from dist_bench.preflight import Check, tracking_uri
from dist_bench.redact import has_credentials, redact

ROLE = "dist_bench.role"
STAGE = "dist_bench.stage"
STAGE_KEY = "dist_bench.stage_key"
DONE = "DONE.json"  # written last: the stage's outputs are complete


@dataclass
class StageWork:
    """What a stage's work function returns."""

    tokens: int
    outputs: dict[str, Path]  # name -> file or dir; logged as artifacts, handed to later stages
    fingerprints: dict[str, str]  # name -> content hash, for the reuse keys of later stages
    unlogged: tuple[str, ...] = ()  # outputs handed on but not uploaded (too large: say why where it is set)
    metrics: dict[str, float] = field(default_factory=dict)  # stage-specific metrics for the run and parent
    details: dict[str, Any] = field(default_factory=dict)  # extra fields for stages/<stage>.json
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact dir -> local path, beyond outputs
    # Metrics that need the stage's final energy reading (all attempts), which exists only once the window
    # has closed: eval splits it among its tasks.
    energy_split: Callable[[EnergyReading], dict[str, float]] | None = None
    # Outputs to fingerprint (models.fingerprint, into `fingerprints`) once the window has closed: hashing a
    # trained model is the harness's provenance bookkeeping, not the method's work (its inputs are hashed
    # before the window opens too). ~2 s for a 0.5B fp32 student, which no GPU count shortens.
    hash_after: dict[str, Path] = field(default_factory=dict)


@dataclass
class StageResult:
    stage: str
    run_id: str
    reused: bool
    outputs: dict[str, Path]
    fingerprints: dict[str, str]
    metrics: dict[str, float]  # energy/time/token metrics and the stage's own
    summary: dict[str, Any]  # the content of stages/<stage>.json


@dataclass
class StageContext:
    """Handed to a stage's work function."""

    stage: str
    run_id: str
    stage_dir: Path  # persistent working files: resume reads them back
    window: EnergyWindow
    prior_energy: EnergyReading | None  # committed energy of earlier interrupted attempts
    attempt: str  # this attempt's id (energy/committed.py)

    def commit_energy(self) -> None:
        """Call right after committing work to disk (any rank): a later resume then counts the energy spent
        on it (energy/committed.py)."""
        committed.commit(self.stage_dir, self.attempt, distributed.rank(), self.window.read())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not distributed.is_main():  # only rank 0 talks to the tracking server
            return
        MlflowClient().log_batch(
            self.run_id, metrics=[rollup.metric(k, v, step) for k, v in metrics.items()], synchronous=True
        )


@dataclass
class ParentRun:
    run_id: str
    experiment_id: str
    cfg: RunConfig
    pipeline: str
    name: str  # the run's name; its stage runs are "<name>/<stage>"
    stages: list[StageResult] = field(default_factory=list)
    idle_power_w: float | None = None  # per GPU, for the stages' net energy
    idle_source: str = "none"  # config | measured | prerun | none
    timeline: list[StageSeries] = field(default_factory=list)
    liveness_lock: Path | None = None  # held by this process while the pipeline runs (see liveness.py)


def experiment_id(name: str) -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # another pipeline created it a moment ago
        return client.get_experiment_by_name(name).experiment_id


def open_store() -> None:
    """Point MLflow at the tracking URI; create a new sqlite store under a file lock.

    Two pipelines started at the same moment against a fresh mlflow.db would otherwise both create its
    tables and one would die on "table ... already exists".
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if has_credentials(uri):  # MLflow prints "View run at <tracking URI>/#/..." with the password in it
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        db.parent.mkdir(parents=True, exist_ok=True)
        with _locked(db.with_name(db.name + ".lock")):
            MlflowClient().search_experiments(max_results=1)  # creates or migrates the tables


def code_version() -> str:
    """Git commit of the dist_bench checkout, plus a hash of its diff when dirty; without git, a source hash."""
    checkout = Path(__file__).resolve().parent.parent
    commit, dirty = environment.git_state(checkout)
    if commit is None:  # an installed copy or a bare copy of the tree: the source itself is the version
        from dist_bench.models import hash_files  # here: models imports torch, which the report never needs

        package = Path(__file__).resolve().parent
        return "src." + hash_files(sorted(package.rglob("*.py")), root=package)[:16]
    if not dirty:
        return commit
    # Uncommitted edits change what the code does: key them by the diff of the package source.
    diff = subprocess.run(
        ["git", "diff", "HEAD", "--", "dist_bench"], cwd=checkout, capture_output=True, check=False
    ).stdout
    return f"{commit}+dirty.{hashlib.sha256(diff).hexdigest()[:12]}"


# The config sections each pipeline's result depends on. They (with the model) are the parent's params and
# its config hash, so an eval parent does not carry the KD settings and evals of two models differ; the
# whole config is in the artifact config/merged.yaml.
PIPELINE_SECTIONS: dict[str, tuple[str, ...]] = {
    "kd": ("teacher", "student", "data", "logits", "train", "kd", "eval", "energy", "prerun"),
    "sft": ("teacher", "student", "data", "generation", "train", "eval", "energy", "prerun"),
    "dpo": ("teacher", "student", "data", "preferences", "dpo", "train", "eval", "energy", "prerun"),
    "eval": ("eval", "energy"),
    "cache_logits": ("teacher", "data", "logits", "energy"),
    "generate": ("teacher", "data", "generation", "energy"),
    "preferences": ("teacher", "student", "data", "preferences", "energy"),
    "prerun": ("prerun", "energy"),
}


def pipeline_config(cfg: RunConfig, pipeline: str, model: str) -> dict[str, Any]:
    """What a pipeline's parent records as params and hashes: pipeline, model, seed, its sections."""
    tree = cfg.model_dump(mode="json")
    sections = PIPELINE_SECTIONS.get(
        pipeline, tuple(k for k in tree if k not in ("name", "tracking", "output"))
    )
    extra = {"ablations": tree["ablations"]} if tree.get("ablations") else {}
    for optional in ("prerun", "generation"):  # switched off: only that it was off applies
        if optional in sections and not tree[optional]["enabled"] and pipeline != optional:
            tree[optional] = {"enabled": False}
    return {
        "pipeline": pipeline,
        "model": model,
        "seed": tree["seed"],
        **{k: tree[k] for k in sections},
        **extra,
    }


@contextmanager
def pipeline_run(
    cfg: RunConfig,
    pipeline: str,
    run_name: str,
    tags: dict[str, str] | None = None,
    checks: list[Check] | None = None,
    model: str = "none",
) -> Iterator[ParentRun]:
    """The parent run: config, params, environment snapshot; FINISHED only if every stage finished.
    `model`: the model the pipeline trains from or evaluates (the `model` param of every pipeline).
    Under several ranks (distributed.py) rank 0 opens and ends it; the others get its id."""
    if not distributed.is_main():
        run_id, experiment, idle_power_w, idle_source = distributed.broadcast(None)
        yield ParentRun(run_id, experiment, cfg, pipeline, run_name, idle_power_w=idle_power_w,
                        idle_source=idle_source)  # fmt: skip
        return
    open_store()
    liveness.close_dead_runs()
    commit, dirty = environment.git_state(Path(__file__).resolve().parent.parent)
    recorded = pipeline_config(cfg, pipeline, model)
    with liveness.hold_lock(cfg.output.run_dir) as lock:
        run_tags = {
            ROLE: "pipeline",
            "dist_bench.pipeline": pipeline,
            "dist_bench.config_hash": config_hash(recorded),
            "dist_bench.git_commit": commit or "none",
            "dist_bench.git_dirty": str(dirty).lower(),
            "dist_bench.world_size": str(distributed.world_size()),  # processes of the job (distributed.py)
            **liveness.tags(lock),
            **(tags or {}),
        }
        if _continue_mlflow_run(cfg):  # under `mlflow run`: continue the run it created, in its experiment
            run = mlflow.start_run(run_name=run_name, tags=run_tags)
        else:
            # Not mlflow.set_experiment: it exports MLFLOW_EXPERIMENT_ID, which would pin every later pipeline
            # of this process (and its subprocesses) to the first experiment. The tags go in with the create
            # call, so not even a kill in the first instant leaves an untagged run behind.
            experiment = experiment_id(cfg.tracking.experiment_name)
            run = mlflow.start_run(experiment_id=experiment, run_name=run_name, tags=run_tags)
        parent = ParentRun(
            run.info.run_id, run.info.experiment_id, cfg, pipeline, run_name, liveness_lock=lock
        )
        try:
            _log_params(parent.run_id, flatten(recorded))
            mlflow.log_text(
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/merged.yaml"
            )
            mlflow.log_dict(environment.snapshot(), "environment.json")
            if checks is not None:
                mlflow.log_dict([asdict(check) for check in checks], "preflight.json")
            _set_idle_power(parent)
            distributed.broadcast(
                (parent.run_id, parent.experiment_id, parent.idle_power_w, parent.idle_source)
            )
            yield parent
            rollup.log_totals(parent)
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            mlflow.set_tag("dist_bench.error", redact(f"{type(err).__name__}: {err}")[:5000])
            mlflow.end_run(status)
            raise
        mlflow.end_run("FINISHED")


def _continue_mlflow_run(cfg: RunConfig) -> bool:
    """Under `mlflow run`, continue the run it created: in the experiment `--experiment-name` chose. Without
    that option MLflow puts the run in Default before any of our code runs, and a run cannot move: it is
    then marked a launcher (a note links the pipeline) and the pipeline's runs go to the configured
    experiment, with everything else of that config."""
    outer = os.environ.get("MLFLOW_RUN_ID")
    if not outer:
        return False
    client = MlflowClient()
    launched = client.get_run(outer)
    if launched.info.experiment_id != "0" or cfg.tracking.experiment_name == "Default":
        return True
    os.environ.pop("MLFLOW_RUN_ID")
    client.set_tag(outer, ROLE, "launcher")
    client.set_tag(
        outer,
        headline.NOTE,
        f"`mlflow run` without --experiment-name starts its run here, in Default; the pipeline's runs are in "
        f"the configured experiment '{cfg.tracking.experiment_name}' (tracking.experiment_name).",
    )
    return False


def execute_stage(
    parent: ParentRun,
    stage: str,
    params: dict[str, str],
    work: Callable[[StageContext], StageWork],
    tags: dict[str, str] | None = None,
    reusable: bool = True,
    gpu_unmeasured: str | None = None,
    data_parallel: bool = False,
) -> StageResult:
    """Reuse a matching finished run of this stage, or run `work` in a nested, energy-tracked child run.

    `reusable=False` for stages that measure the machine as it is now (prerun): never taken from the past.
    `gpu_unmeasured`: why the stage's GPU energy cannot be measured here (a remote teacher): the GPU
    figure is then unavailable with that note, not the idle draw of the local GPUs.

    Under several ranks (distributed.py) rank 0 decides, opens the run, logs, and hands the outputs on;
    `data_parallel` stages run `work` on every rank (each does its share), the others on rank 0 alone while
    the other ranks wait (their GPUs' energy counts: they are the job's). See _follow_stage.
    """
    if not distributed.is_main():
        return _follow_stage(parent, stage, work, gpu_unmeasured, data_parallel)
    cfg = parent.cfg
    params = {**params, "code_version": code_version()}
    key = config_hash({"stage": stage, "params": params})
    stage_dir = Path(cfg.output.run_dir).resolve() / stage / key
    stage_dir.mkdir(parents=True, exist_ok=True)
    # One process per stage key at a time: a second pipeline with the same inputs waits, then reuses.
    with _locked(stage_dir.parent / f"{key}.lock"):
        earlier = (
            _find_reusable(stage, key, params, stage_dir) if reusable and cfg.tracking.reuse_stages else None
        )
        if earlier is not None:
            result = _reuse(parent, stage, earlier, stage_dir)
            distributed.broadcast({"reused": True, "run_id": result.run_id})
        else:
            if (stage_dir / DONE).exists():  # complete outputs but no run to take their cost from
                shutil.rmtree(stage_dir)
                stage_dir.mkdir(parents=True)
            result = _run(
                parent, stage, key, params, stage_dir, work, tags or {}, gpu_unmeasured, data_parallel
            )
    # what later stages read: rank 0's record of the outputs (_follow_stage)
    distributed.broadcast((result.outputs, result.fingerprints))
    parent.stages.append(result)
    rollup.log_stage(parent, result)
    return result


def _run(
    parent: ParentRun,
    stage: str,
    key: str,
    params: dict[str, str],
    stage_dir: Path,
    work: Callable[[StageContext], StageWork],
    tags: dict[str, str],
    gpu_unmeasured: str | None = None,
    data_parallel: bool = False,
) -> StageResult:
    cfg = parent.cfg
    interrupted = _interrupted_attempts(key)
    prior, attempt = committed.start_attempt(stage_dir)
    started = _now()
    run_tags = {
        ROLE: "stage",
        STAGE: stage,
        STAGE_KEY: key,
        "dist_bench.pipeline": parent.pipeline,
        "dist_bench.git_commit": parent_tag(parent, "dist_bench.git_commit"),
        "dist_bench.code_version": params["code_version"],
        "dist_bench.stage_dir": str(stage_dir),
        "dist_bench.resumed": str(prior is not None).lower(),
        "dist_bench.ranks": str(distributed.world_size() if data_parallel else 1),  # ranks that did the work
        **({"dist_bench.resumed_from": ",".join(interrupted)} if interrupted else {}),
        **(liveness.tags(parent.liveness_lock) if parent.liveness_lock else {}),
        **tags,
    }
    # Created with its tags in one call: a kill in the next instant still leaves a run the next attempt finds.
    run = mlflow.start_run(
        run_name=f"{parent.name}/{stage}", nested=True, experiment_id=parent.experiment_id, tags=run_tags
    )
    run_id = run.info.run_id
    distributed.broadcast(
        {"reused": False, "run_id": run_id, "stage_dir": str(stage_dir), "attempt": attempt}
    )
    try:
        for earlier in interrupted:
            MlflowClient().set_tag(earlier, "dist_bench.resumed_by", run_id)
        _log_params(run_id, params)
        window = EnergyWindow(
            cfg.energy,
            stage_dir,
            stage,
            idle_power_w=parent.idle_power_w,
            idle_source=parent.idle_source,
            gpu_unmeasured=gpu_unmeasured,
        )
        with window:
            ctx = StageContext(stage, run_id, stage_dir, window, prior, attempt)
            with nullcontext() if data_parallel else distributed.alone():
                done = work(ctx)
        done.fingerprints.update(
            {name: models.fingerprint(str(path)) for name, path in done.hash_after.items()}
        )
        energy = prior + window.reading if prior else window.reading
        metrics = {**stage_metrics(energy, done.tokens), **done.metrics}
        if done.energy_split is not None:
            metrics.update(done.energy_split(energy))
        if done.metrics.get("decode_tokens"):  # a generating stage: what one new token cost
            decode = done.metrics["decode_tokens"]
            names = {"total_energy_j": "j_per_generated_token", "gpu_energy_j": "gpu_j_per_generated_token"}
            metrics.update({per: metrics[name] / decode for name, per in names.items() if name in metrics})
        summary = _stage_summary(stage, run_id, started, energy, done, metrics, bool(prior), stage_dir)
        # this attempt's window (unix s), to check the figure against the GPUs' own counters read outside
        # the tracker (bench/scale_out.py)
        summary["energy_window_unix_s"] = [window.started_at, window.ended_at]
        mlflow.log_metrics(metrics)
        mlflow.set_tags(stage_tags(energy))
        mlflow.set_tags(
            {f"dist_bench.fingerprint.{name}": value for name, value in done.fingerprints.items()}
        )
        mlflow.log_dict(summary, f"stages/{stage}.json")
        logged = {name: path for name, path in done.outputs.items() if name not in done.unlogged}
        for name, path in {**logged, **done.artifacts}.items():
            _log_artifact(path, name)
        _log_timeline(parent, stage, window, stage_dir)
        rollup.append_results_row(parent, stage, run_id, metrics, energy, tags)
        rollup.write_json_atomic(stage_dir / f"{stage}.json", summary)
        rollup.write_json_atomic(stage_dir / DONE, {"run_id": run_id, "fingerprints": done.fingerprints})
    except BaseException as err:
        # Ctrl-C / SIGTERM -> KILLED, anything else -> FAILED; never FINISHED. Work committed so far stays in
        # stage_dir for the next attempt to resume from.
        mlflow.set_tag("dist_bench.error", redact(f"{type(err).__name__}: {err}")[:5000])
        mlflow.end_run("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run("FINISHED")
    return StageResult(stage, run_id, False, done.outputs, done.fingerprints, metrics, summary)


def _follow_stage(
    parent: ParentRun,
    stage: str,
    work: Callable[[StageContext], StageWork],
    gpu_unmeasured: str | None,
    data_parallel: bool,
) -> StageResult:
    """A rank other than 0, in step with rank 0's execute_stage: its decision; unless reused, an energy
    window (rank 0 gathers every rank's reading when the windows close) around this rank's share of the
    work, or around the wait for rank 0; then the outputs rank 0 recorded. No tracking calls."""
    decision = distributed.broadcast(None)
    if not decision["reused"]:
        stage_dir = Path(decision["stage_dir"])
        window = EnergyWindow(parent.cfg.energy, stage_dir, stage, idle_power_w=parent.idle_power_w,
                              idle_source=parent.idle_source, gpu_unmeasured=gpu_unmeasured)  # fmt: skip
        with window:
            if data_parallel:
                work(StageContext(stage, decision["run_id"], stage_dir, window, None, decision["attempt"]))
    outputs, fingerprints = distributed.broadcast(None)
    result = StageResult(stage, decision["run_id"], decision["reused"], outputs, fingerprints, {}, {})
    parent.stages.append(result)
    return result


def _reuse(parent: ParentRun, stage: str, run: Any, stage_dir: Path) -> StageResult:
    done = json.loads((stage_dir / DONE).read_text())
    summary = json.loads((stage_dir / f"{stage}.json").read_text())
    outputs = {name: stage_dir / rel for name, rel in summary["outputs"].items()}
    mlflow.set_tag(f"dist_bench.reused.{stage}", run.info.run_id)
    return StageResult(
        stage, run.info.run_id, True, outputs, done["fingerprints"], dict(run.data.metrics), summary
    )


def _find_reusable(stage: str, key: str, params: dict[str, str], stage_dir: Path) -> Any | None:
    """The newest FINISHED run with this stage key, equal params and outputs intact on disk."""
    if not (stage_dir / DONE).exists():
        return None
    done = json.loads((stage_dir / DONE).read_text())
    runs = MlflowClient().search_runs(
        experiment_ids=_all_experiment_ids(),
        filter_string=f"tags.`{STAGE_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        same_params = run.data.params == params  # strings against strings, like MLflow's multistep example
        same_outputs = all(
            run.data.tags.get(f"dist_bench.fingerprint.{name}") == value
            for name, value in done["fingerprints"].items()
        )
        if (
            run.data.tags.get(STAGE) == stage
            and same_params
            and same_outputs
            and run.info.run_id == done["run_id"]
        ):
            return run
    return None


def _interrupted_attempts(key: str) -> list[str]:
    """Earlier attempts at this stage key that did not finish and that no later attempt has resumed.

    One still RUNNING died without ending its run (we hold the stage lock, so it is not running now): it is
    marked KILLED here. The new attempt resumes from their committed work and names them (resumed_from).
    """
    client = MlflowClient()
    runs = client.search_runs(
        experiment_ids=_all_experiment_ids(),
        filter_string=f"tags.`{STAGE_KEY}` = '{key}' and attributes.status != 'FINISHED'",
    )
    earlier = []
    for run in runs:
        if run.info.status == "RUNNING":
            liveness.mark_killed(client, run.info.run_id)
        if "dist_bench.resumed_by" not in run.data.tags:
            earlier.append(run.info.run_id)
    return earlier


def _stage_summary(
    stage: str,
    run_id: str,
    started: str,
    energy: EnergyReading,
    done: StageWork,
    metrics: dict[str, float],
    resumed: bool,
    stage_dir: Path,
) -> dict[str, Any]:
    """stages/<stage>.json, with seed 003's field names."""
    return {
        "stage": stage,
        "run_id": run_id,
        "started_at": started,
        "ended_at": _now(),
        "resumed": resumed,
        "duration_seconds": energy.duration_s,
        "tokens_processed": done.tokens,
        "tokens_per_second": metrics.get("tokens_per_s"),
        "gpu_energy_joules": energy.gpu_energy_j,
        "cpu_energy_joules": energy.cpu_energy_j,
        "ram_energy_joules": energy.ram_energy_j,
        "total_energy_joules": energy.total_energy_j,
        "total_energy_kwh": metrics.get("total_energy_kwh"),
        "joules_per_token": metrics.get("j_per_token"),
        "co2e_kg": energy.co2e_kg,
        "energy_sources": {"gpu": energy.gpu_source, "cpu": energy.cpu_source, "ram": energy.ram_source},
        "energy_notes": energy.notes,
        "energy": energy.to_dict(),
        "metrics": metrics,
        "fingerprints": done.fingerprints,
        # Relative to the stage dir, which may move between machines.
        "outputs": {name: _relative_if_inside(path, stage_dir) for name, path in done.outputs.items()},
        **done.details,
    }


def _relative_if_inside(path: Path, stage_dir: Path) -> str:
    # Inside the stage dir: relative, so the dir can move. Elsewhere (a user's --output-dir): absolute.
    return str(path.relative_to(stage_dir)) if path.is_relative_to(stage_dir) else str(path.resolve())


def parent_tag(parent: ParentRun, name: str) -> str:
    return MlflowClient().get_run(parent.run_id).data.tags.get(name, "")


def _set_idle_power(parent: ParentRun) -> None:
    """Idle draw per GPU for net energy: the config's value, else a short measurement if asked for."""
    energy = parent.cfg.energy
    if not energy.enabled:
        return
    if energy.idle_power_w is not None:
        parent.idle_power_w, parent.idle_source = energy.idle_power_w, "config"
    elif energy.idle_measure_s > 0:
        watts, how = measure_idle_power_w(energy.idle_measure_s)
        if watts is not None:
            parent.idle_power_w, parent.idle_source = watts, "measured"
        mlflow.set_tag("energy.idle.note", how)
    if parent.idle_power_w is not None:
        mlflow.log_metric("idle_power_w_per_gpu", parent.idle_power_w)
    mlflow.set_tag("energy.idle.source", parent.idle_source)


def _log_timeline(parent: ParentRun, stage: str, window: EnergyWindow, stage_dir: Path) -> None:
    """The stage's power timeline as CSV + PNG on its run; kept for the pipeline-wide plot."""
    if not window.samples or window.started_at is None or window.ended_at is None:
        why = window.reading.notes.get("gpu") if window.reading else None
        mlflow.log_text(
            f"No power timeline for this stage: it plots GPU power samples and none were taken "
            f"({why or 'energy sampling off or the stage too short'}).\n",
            "energy/power_timeline.txt",
        )
        return
    series = StageSeries(stage, window.started_at, window.ended_at, window.samples)
    parent.timeline.append(series)
    mlflow.log_artifact(
        str(write_timeline_csv(series, stage_dir / "energy" / "power_timeline.csv")), "energy"
    )
    plot = plot_timeline([series], stage_dir / "energy" / "power_timeline.png")
    if plot:
        mlflow.log_artifact(str(plot), "energy")


def _log_params(run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, redact(v)) for k, v in params.items()]
    client = MlflowClient()
    for start in range(0, len(items), 100):  # the tracking API takes at most 100 params per batch
        client.log_batch(run_id, params=items[start : start + 100], synchronous=True)


def _log_artifact(path: Path, name: str) -> None:
    """A folder's files under artifact path `name`; a file, keeping its own name, in `name`'s folder (the
    root when `name` has none: outputs such as "train_data" are single files)."""
    if path.is_dir():
        mlflow.log_artifacts(str(path), name)
    else:
        folder = PurePosixPath(name).parent
        mlflow.log_artifact(str(path), None if folder == PurePosixPath(".") else str(folder))


def _all_experiment_ids() -> list[str]:
    return [e.experiment_id for e in MlflowClient().search_experiments()]


@contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with lock_file.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
