"""The `dist-bench` command. Subcommands mirror the MLproject entry points one to one.

    dist-bench kd --config configs/experiments/tiny_kd.yaml train.optimizer.lr=1e-3 kd.temperature=2
    dist-bench cache_logits --config ...
    dist-bench eval --model tinyworld:teacher --config ...
    dist-bench report --experiment dist-bench
    dist-bench main                     # kd on the embedded default (what a bare `mlflow run .` runs)

    dist-bench validate kd --config ...  # only the pre-flight checks, listed

Every pipeline first runs the pre-flight pass (preflight/) over all of its inputs, before any MLflow run
opens. Every expected failure ends with one line on stderr, credentials masked, and an exit code:

    0  done          1  failed while running (the stage is FAILED in MLflow, never FINISHED; prerun gate)
    2  bad input (config, data, arguments, paths, URIs, devices), found before anything started
    130  interrupted (Ctrl-C, SIGTERM): the stage is KILLED, its committed work kept; rerun to resume

The traceback is shown only with `dist-bench --debug ...` or DIST_BENCH_DEBUG=1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer

from dist_bench.config import ConfigError, RunConfig, load_config
from dist_bench.redact import redact

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="experiment YAML (merged over configs/base.yaml)")
]
RegisterOption = Annotated[
    str | None,
    typer.Option(
        help="register the final model under this name at the end (dist-bench register does it later)"
    ),
]
AliasOption = Annotated[
    str | None, typer.Option(help="the registered model alias to point at the new version")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train.optimizer.lr=1e-3")]
FAILED, BAD_INPUT, INTERRUPTED = 1, 2, 130
# the commands that run on several ranks (--nproc, torchrun)
DATA_PARALLEL = ("cache_logits", "generate", "kd", "sft", "dpo", "eval")
T = TypeVar("T")


AblationsFlag = Annotated[
    bool, typer.Option("--ablations", help="one parent per point of the experiment's ablations grid")
]
NprocOption = Annotated[
    int,
    typer.Option(
        "--nproc",
        min=1,
        help="processes (ranks) on this host, one per GPU: the command runs under torch.distributed.run "
        "after its pre-flight pass (torchrun, accelerate launch and srun start ranks themselves)",
    ),
]


@app.command("main")
def main_(overrides: Overrides = None, nproc: NprocOption = 1) -> None:
    """The KD pipeline on the embedded offline tiny world."""
    kd(config=None, overrides=overrides, nproc=nproc)


@app.command("kd")
def kd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    ablations: AblationsFlag = False,
    register: RegisterOption = None,
    alias: AliasOption = None,
    nproc: NprocOption = 1,
) -> None:
    """Logit caching -> KD student training -> evaluation, as one parent run with nested stage runs."""
    _student_pipeline("kd", config, overrides, ablations, register, alias, nproc)


@app.command("sft")
def sft(
    config: ConfigOption = None,
    overrides: Overrides = None,
    ablations: AblationsFlag = False,
    register: RegisterOption = None,
    alias: AliasOption = None,
    nproc: NprocOption = 1,
) -> None:
    """Teacher-written data (generation.enabled) or the data itself -> SFT student training -> evaluation
    (the same trainer, precision and token budget as kd)."""
    _student_pipeline("sft", config, overrides, ablations, register, alias, nproc)


@app.command("dpo")
def dpo(
    config: ConfigOption = None,
    overrides: Overrides = None,
    ablations: AblationsFlag = False,
    register: RegisterOption = None,
    alias: AliasOption = None,
    nproc: NprocOption = 1,
) -> None:
    """Preference pairs built by the teacher (preferences.method) or read (preferences.path) -> DPO of the
    policy (student.model) -> evaluation (the same optimizer, precision and token budget rule as kd and sft)."""
    _student_pipeline("dpo", config, overrides, ablations, register, alias, nproc)


def _student_pipeline(
    name: str,
    config: Path | None,
    overrides: list[str] | None,
    ablations: bool,
    register: str | None = None,
    alias: str | None = None,
    nproc: int = 1,
) -> None:
    """kd, sft or dpo: pre-flight, then the pipeline, or every point of the config's ablations grid (each
    pre-flight checked before the first runs); a failed prerun gate stops it before any teacher work.
    `register`: the registered model name the final model goes under at the end (registry.py)."""
    if register is not None and ablations:
        _fail("--register: one model per command; register a sweep's points with `dist-bench register --run`")
    if alias is not None and register is None:
        _fail("--alias: needs --register <name>")
    _one_gpu(nproc)
    cfg = _load(config, overrides)
    checks = None if ablations else _preflight(cfg, name)  # before the heavy imports: bad input fails fast
    flags = (["--ablations"] if ablations else []) + (["--register", register] if register else [])
    _distribute(
        cfg, nproc, [name, *_config_args(config, overrides), *flags, *(["--alias", alias] if alias else [])]
    )
    from dist_bench import distributed, pipeline
    from dist_bench.prerun import PrerunFailed

    def runs() -> list:
        if not ablations:
            return [{"kd": pipeline.kd, "sft": pipeline.sft, "dpo": pipeline.dpo}[name](cfg, checks)]
        return pipeline.sweep(config, [*(overrides or []), *_detach_from_mlflow_run()], name)

    try:
        done = _guarded(runs, passthrough=(PrerunFailed,))
    except PrerunFailed as err:  # the gate: nothing of the teacher's was started
        _fail(f"prerun failed, pipeline stopped: {err}", FAILED)
    if not distributed.is_main():  # rank 0 reports and registers
        return
    for run in done:
        _print_stages(run)
    if register is not None:
        _register(done[0].run_id, register, alias)


@app.command("register")
def register_(
    run: Annotated[str, typer.Option(help="the parent run id of a finished kd, sft or dpo pipeline")],
    name: Annotated[str, typer.Option(help="the registered model's name")],
    alias: AliasOption = None,
) -> None:
    """Register a pipeline's final model (an MLflow transformers model) with its energy label as tags."""
    _register(run, name, alias)


def _register(run_id: str, name: str, alias: str | None) -> None:
    from dist_bench import preflight

    _guarded(preflight.tracking_store)
    from dist_bench import registry

    version = _guarded(lambda: registry.register(run_id, name, alias))
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version.version}"
    outer = os.environ.get("MLFLOW_RUN_ID")
    if outer and outer != run_id:  # `mlflow run . -e register`: its run says what it did (not a table row)
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        client.set_tag(outer, "dist_bench.role", "register")
        client.set_tag(outer, "dist_bench.registered", uri)
    typer.echo(f"registered: {uri} (version {version.version} of {name}; energy label in its tags)")


def _detach_from_mlflow_run() -> list[str]:
    """Several parents from one command: under `mlflow run`, the run it opened records the group (role
    "sweep", left out of the report) and each parent is a run of its own. Returns the override that puts
    them in that run's experiment (the one `mlflow run --experiment-name` chose)."""
    outer = os.environ.pop("MLFLOW_RUN_ID", None)
    if not outer:
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    client.set_tag(outer, "dist_bench.role", "sweep")
    experiment_id = client.get_run(outer).info.experiment_id
    if experiment_id == "0":  # no --experiment-name: MLflow's Default, not a choice; the config's stands
        return []
    experiment = client.get_experiment(experiment_id).name
    return [f"tracking.experiment_name={json.dumps(experiment)}"]  # quoted: any name parses as a string


@app.command("generate")
def generate(
    config: ConfigOption = None,
    overrides: Overrides = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="print requests, a token bound and the worst-case cost; run nothing"),
    ] = False,
    nproc: NprocOption = 1,
) -> None:
    """The teacher writes completions for the data's prompts, filtered (a later sft with the same settings reuses it)."""
    _one_gpu(nproc)
    cfg = _load(config, overrides)
    checks = _preflight(cfg, "generate")
    if dry_run:
        _guarded(lambda: typer.echo(_generation_plan(cfg)))
        return
    _distribute(cfg, nproc, ["generate", *_config_args(config, overrides)])
    from dist_bench import pipeline

    _print_stages(_guarded(lambda: pipeline.generate(cfg, checks)))


def _generation_plan(cfg: RunConfig) -> str:
    """What teacher_generation would ask for: requests, a bound on the tokens, and (API) the worst case."""
    from dist_bench.teacher.api import prompt_token_bound, worst_case_cost
    from dist_bench.teacher.generation import read_prompts

    gen, api = cfg.generation, cfg.teacher.api
    prompts = read_prompts(cfg)
    endpoint = api.endpoint if api is not None else "chat"
    prompt_tokens = sum(prompt_token_bound(p, endpoint) for p in prompts) * gen.n
    new_tokens = len(prompts) * gen.n * gen.max_new_tokens
    lines = [
        f"requests: {len(prompts) * gen.n} ({len(prompts)} prompts x {gen.n} completions)",
        f"tokens at most: {prompt_tokens} prompt + {new_tokens} completion (prompt bound: UTF-8 bytes + "
        "template overhead)",
    ]
    if api is not None:
        worst = worst_case_cost(api, prompt_tokens, new_tokens)
        budget = f"; budget {api.budget:g}" if api.budget is not None else "; no budget limit"
        lines.append(f"worst-case cost: {worst:.4f} at {api.price.input_per_million:g} / "
                     f"{api.price.output_per_million:g} per million prompt / completion tokens{budget}")  # fmt: skip
        lines.append("(responses already cached or journaled cost nothing and are counted here all the same)")
    return "\n".join(lines)


@app.command("preferences")
def preferences(config: ConfigOption = None, overrides: Overrides = None, nproc: NprocOption = 1) -> None:
    """The teacher builds preference pairs (preferences.method); a later dpo with the same settings reuses them."""
    _one_gpu(nproc)
    cfg = _load(config, overrides)
    checks = _preflight(cfg, "preferences")
    _distribute(cfg, nproc, ["preferences", *_config_args(config, overrides)])
    from dist_bench import pipeline

    _print_stages(_guarded(lambda: pipeline.build_preferences(cfg, checks)))


@app.command("cache_logits")
def cache_logits(config: ConfigOption = None, overrides: Overrides = None, nproc: NprocOption = 1) -> None:
    """Cache the teacher's top-k log-probs over the training set (the kd pipeline reuses it)."""
    _one_gpu(nproc)
    cfg = _load(config, overrides)
    checks = _preflight(cfg, "cache_logits")
    _distribute(cfg, nproc, ["cache_logits", *_config_args(config, overrides)])
    from dist_bench import pipeline

    _print_stages(_guarded(lambda: pipeline.cache_logits(cfg, checks)))


@app.command("eval")
def eval_(
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="HF model id, local or checkpoint dir, tinyworld:<name> or runs:/<id>/<path>; several: repeat "
            "the option or separate them by commas (one parent run each, all checked first)"
        ),
    ] = None,
    config: ConfigOption = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="tasks to run instead of eval.tasks, comma-separated (gsm8k,mmlu,alpaca_eval); 'list': show "
            "every task with where its data comes from and whether its dependencies are installed"
        ),
    ] = None,
    max_samples: Annotated[
        int | None, typer.Option(min=1, help="evaluate only the first N documents of each task (eval.limit)")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="output.run_dir: stage folders, and benchmark_summary.json with every task's scores"
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="resolve tasks, data and model, print the plan, run nothing")
    ] = False,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    overrides: Overrides = None,
    nproc: NprocOption = 1,
) -> None:
    """Evaluate models on eval.tasks: lm-eval tasks, OLMES, judge benchmarks (per model a parent run with one
    `eval` stage, each task in its own energy window). With --nproc N, lm-eval splits each task's documents
    among N ranks; judge benchmarks run on rank 0."""
    flags = [*(overrides or [])]
    if tasks is not None and tasks != "list":
        flags.append(f"eval.tasks={json.dumps([t.strip() for t in tasks.split(',') if t.strip()])}")
    if max_samples is not None:
        flags.append(f"eval.limit={max_samples}")
    if run_dir is not None:
        flags.append(f"output.run_dir={json.dumps(str(run_dir))}")
    _one_gpu(nproc)
    cfg = _load(config, flags)
    if tasks == "list":
        from dist_bench.evaluation.listing import task_table

        typer.echo(_guarded(lambda: task_table(cfg.eval)))
        return
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        _fail(f"--dtype: '{dtype}' is not one of auto, float32, bfloat16, float16")
    names = [name.strip() for given in model or [] for name in given.split(",")]
    if not names or not all(names):
        _fail("--model: required (a model spec; several separated by commas)")
    checked = [(name, _preflight(cfg, "eval", eval_model=name)) for name in names]
    if dry_run:
        for name, checks in checked:
            typer.echo(f"dry run: {name}: nothing was run")
            for check in checks:
                typer.echo(f"  ok  {check.name}: {check.detail}")
        return
    _distribute(
        cfg, nproc, ["eval", "--model", ",".join(names), "--dtype", dtype, *_config_args(config, flags)]
    )
    from dist_bench import distributed, pipeline

    if len(names) > 1:
        cfg = _load(config, [*flags, *_detach_from_mlflow_run()])
    runs = []
    for name, checks in checked:
        run = _guarded(lambda name=name, checks=checks: pipeline.evaluate(cfg, name, dtype, checks))
        _print_stages(run)
        runs.append(run)
    if run_dir is not None and distributed.is_main():  # rank 0 reports
        from dist_bench.evaluation.listing import write_benchmark_summary

        typer.echo(f"benchmark summary: {write_benchmark_summary(runs, run_dir)}")


@app.command("prerun")
def prerun_(
    config: ConfigOption = None,
    quick: Annotated[bool, typer.Option("--quick", help="reduced durations")] = False,
    output_dir: Annotated[Path | None, typer.Option(help="where the report tree is written")] = None,
    idle_duration: Annotated[float | None, typer.Option(help="idle baseline minutes")] = None,
    burn_in_steps: Annotated[int | None, typer.Option(help="burn-in training steps")] = None,
    expected_gpu: Annotated[str | None, typer.Option(help="substring of the GPU name, e.g. H100")] = None,
    expected_vram: Annotated[float | None, typer.Option(help="minimum GiB of VRAM per GPU")] = None,
    skip_idle: Annotated[bool, typer.Option("--skip-idle")] = False,
    skip_burn_in: Annotated[bool, typer.Option("--skip-burn-in")] = False,
    skip_sampling: Annotated[bool, typer.Option("--skip-sampling")] = False,
    overrides: Overrides = None,
) -> None:
    """Pre-run validation (seed 000): idle baseline, burn-in, sampling-interval check, hardware assertions."""
    flags = {
        "quick": quick or None,
        "idle_duration_minutes": idle_duration,
        "burn_in_steps": burn_in_steps,
        "expected_gpu": expected_gpu,
        "expected_vram_gb": expected_vram,
        "skip_idle": skip_idle or None,
        "skip_burn_in": skip_burn_in or None,
        "skip_sampling": skip_sampling or None,
    }
    given = [f"prerun.{key}={value}" for key, value in flags.items() if value is not None]
    cfg = _load(config, [*(overrides or []), *given])
    checks = _preflight(cfg, "prerun", output_dir=output_dir)
    from dist_bench import pipeline
    from dist_bench.prerun import PrerunFailed, summary_text

    try:
        run, report = _guarded(
            lambda: pipeline.validate(cfg, output_dir, checks), passthrough=(PrerunFailed,)
        )
    except PrerunFailed as err:
        typer.echo(summary_text(err.report))
        _fail(f"prerun failed: {err}", FAILED)
    typer.echo(summary_text(report))
    _print_stages(run)


@app.command("validate")
def validate(
    pipeline: Annotated[
        Literal["kd", "sft", "dpo", "generate", "preferences", "cache_logits", "eval", "prerun", "report"],
        typer.Argument(help="what would be run"),
    ],
    config: ConfigOption = None,
    model: Annotated[str | None, typer.Option(help="the model to evaluate (eval only)")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="prerun's report folder (prerun only)")] = None,
    overrides: Overrides = None,
) -> None:
    """Only the pre-flight pass of a pipeline: every input checked, nothing run, nothing written."""
    cfg = _load(config, overrides)
    checks = _preflight(cfg, pipeline, eval_model=model, output_dir=output_dir)
    width = max(len(check.name) for check in checks)
    for check in checks:
        typer.echo(redact(f"ok  {check.name:<{width}}  {check.detail}"))
    typer.echo(f"{pipeline}: all {len(checks)} pre-flight checks passed")


@app.command("report")
def report(
    experiment: Annotated[list[str] | None, typer.Option(help="experiment name(s); default: all")] = None,
    output_dir: Annotated[Path, typer.Option(help="where table.md/.csv/.html/.tex are written")] = Path(
        "report"
    ),
    filter_string: Annotated[
        str | None,
        typer.Option(
            "--filter",
            help="only parent runs matching this MLflow search filter, e.g. "
            "\"params.`train.token_budget` = '3000000'\"",
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            help="build the table from the experiment_summary.json files here, without a tracking server"
        ),
    ] = None,
) -> None:
    """Aggregate the parent runs into the standard table (Markdown here; CSV/HTML/LaTeX as report-run
    artifacts, or only as files with --run-dir)."""
    from dist_bench import preflight

    if run_dir is not None:
        if filter_string or experiment:
            _fail("--run-dir: reads files, not a tracking server; --filter and --experiment do not apply")
        if not run_dir.is_dir():
            _fail(f"--run-dir: {run_dir} is not a folder")
        _guarded(lambda: preflight.writable_dir("--output-dir", output_dir))
        from dist_bench import report as report_module

        typer.echo(_guarded(lambda: report_module.from_run_dir(run_dir, output_dir)))
        return
    _guarded(lambda: preflight.report(output_dir))  # a dead server is answered before MLflow's retries
    from dist_bench import report as report_module

    table = _guarded(lambda: report_module.run(experiment or [], output_dir, filter_string))
    typer.echo(table)


data_app = typer.Typer(no_args_is_help=True, help="Training data: public datasets -> project JSON-lines")
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def data_prepare(
    recipe: Annotated[str, typer.Option(help="tulu3 | openr1_math | codeforces")],
    source: Annotated[str, typer.Option(help="data file or folder, save_to_disk folder, or Hub id org/name")],
    out: Annotated[Path, typer.Option(help="output folder: <split>.jsonl and manifest.json")],
    split: Annotated[str, typer.Option(help="split of a Hub dataset, DatasetDict or split folder")] = "train",
    subset: Annotated[str | None, typer.Option(help="Hub dataset config, e.g. default")] = None,
    limit: Annotated[int | None, typer.Option(help="read only the first N source rows")] = None,
) -> None:
    """Convert a public dataset, in its real schema, into <out>/<split>.jsonl plus manifest.json."""
    from dist_bench.data.recipes import prepare
    from dist_bench.errors import DataError

    try:
        manifest = _guarded(
            lambda: prepare(recipe, source, out, split=split, subset=subset, limit=limit),
            passthrough=(DataError,),
        )
    except DataError as err:  # already one line naming the source (and file:line, row, field)
        _fail(str(err))
    dropped = ", ".join(f"{why} {n}" for why, n in manifest["rows_dropped"].items() if n) or "none"
    typer.echo(
        f"{recipe}: {manifest['rows_written']} of {manifest['rows_read']} rows written to "
        f"{out / manifest['output']} (dropped: {dropped})"
    )


def _one_gpu(nproc: int) -> None:
    """A one-process command uses one GPU, the others hidden before CUDA starts (distributed.py says why)."""
    if nproc > 1:
        return
    from dist_bench import distributed

    pinned = distributed.one_gpu_per_process()
    if pinned is not None:
        typer.echo(
            f"dist-bench: one process, one GPU: CUDA_VISIBLE_DEVICES={pinned} (--nproc N: N GPUs)", err=True
        )


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    return cfg


def _preflight(cfg: RunConfig, pipeline: str, **inputs: object) -> list:
    from dist_bench import preflight

    return _guarded(lambda: preflight.run(cfg, pipeline, **inputs))  # type: ignore[arg-type]


def _distribute(cfg: RunConfig, nproc: int, argv: list[str]) -> None:
    """`--nproc N` (N > 1) in a plain process, its pre-flight pass done: run `dist-bench <argv>` as N ranks
    on this host and exit with their exit code. In a rank (ours, or one torchrun, accelerate or srun
    started): join the job's process group (distributed.py)."""
    from dist_bench import distributed

    if (nproc > 1 or distributed.launched()) and argv[0] not in DATA_PARALLEL:
        _fail(
            f"--nproc {nproc}: `{argv[0]}` does not run on several processes yet (only: {', '.join(DATA_PARALLEL)})"
        )
    ranks = nproc if nproc > 1 else int(os.environ.get("WORLD_SIZE", "1"))
    if argv[0] in ("kd", "sft", "dpo") and ranks > 1:
        from dist_bench.preflight import training_ranks

        _guarded(lambda: training_ranks(cfg, ranks))
    if nproc > 1 and not distributed.launched():
        raise typer.Exit(distributed.launch(nproc, argv))
    distributed.init_from_env(cfg.train.device)


def _config_args(config: Path | None, overrides: list[str] | None) -> list[str]:
    return [*(["--config", str(config)] if config else []), *(overrides or [])]


def _guarded(call: Callable[[], T], passthrough: tuple[type[Exception], ...] = ()) -> T:
    """Run a command's work; an expected failure becomes one redacted line and its exit code.
    `passthrough`: exceptions the command reports itself (the prerun gate prints its findings)."""
    try:
        return call()
    except passthrough:
        raise
    except (FileNotFoundError, ValueError) as err:
        # PreflightError and ConfigError; DataError and the like for what only the work itself can see.
        _fail(_describe(err), BAD_INPUT)
    except KeyboardInterrupt:
        _fail("interrupted; the stage is KILLED and its committed work kept: rerun to resume", INTERRUPTED)
    except Exception as err:  # a failure while running: the stage and pipeline runs are FAILED
        _fail(f"{_describe(err)} (dist-bench --debug shows the traceback)", FAILED)
    raise AssertionError("unreachable")


def _describe(err: BaseException) -> str:
    from dist_bench.preflight import PreflightError

    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return first if isinstance(err, PreflightError | ConfigError) else f"{type(err).__name__}: {first}"


def _fail(message: str, code: int = BAD_INPUT) -> None:
    if _debug() and sys.exc_info()[0] is not None:
        typer.echo(redact(traceback.format_exc()), err=True)
    line = message.strip().splitlines()[0] if message.strip() else "failed"
    typer.echo(f"dist-bench: error: {redact(line)}", err=True)
    raise typer.Exit(code)


def _debug() -> bool:
    return os.environ.get("DIST_BENCH_DEBUG", "").lower() in ("1", "true", "yes")


def _print_stages(run: object) -> None:
    from dist_bench import distributed

    if not distributed.is_main():  # one report per job: rank 0's
        return
    for stage in run.stages:  # type: ignore[attr-defined]
        how = "reused" if stage.reused else "ran"
        energy = stage.metrics.get("total_energy_j")
        shown = f"{energy:.1f} J" if energy is not None else "energy n/a"
        typer.echo(
            f"{stage.stage:>14}: {how} (run {stage.run_id}) {stage.metrics.get('duration_s', 0):.1f} s, {shown}"
        )
    typer.echo(f"parent run: {run.run_id}")  # type: ignore[attr-defined]
    from dist_bench.headline import view_url
    from dist_bench.preflight import tracking_uri

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        typer.echo(f"in the MLflow UI, headline columns: {redact(view_url(uri, run.experiment_id))}")  # type: ignore[attr-defined]
    else:  # a local store: the UI is `mlflow ui` on it, at its default address
        url = view_url("http://127.0.0.1:5000", run.experiment_id)  # type: ignore[attr-defined]
        typer.echo(f"in the MLflow UI (mlflow ui --backend-store-uri {uri}), headline columns: {url}")


@app.callback()
def _prepare_process(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks (also DIST_BENCH_DEBUG=1)")] = False,
) -> None:
    """Runs before every subcommand; cheap on purpose (bad input must fail fast)."""
    if debug:
        os.environ["DIST_BENCH_DEBUG"] = "1"
    # Schedulers (SLURM, Kubernetes) stop jobs with SIGTERM: raise KeyboardInterrupt so the running stage is
    # marked KILLED and its committed work is kept for the resume, instead of a run left RUNNING forever.
    signal.signal(signal.SIGTERM, _interrupt)
    # Progress bars and INFO chatter from MLflow, transformers, datasets and lm-eval drown the lines that
    # matter (and the one-line errors). Environment variables, so the libraries need not be imported here.
    quiet = {
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    for name, value in quiet.items():
        os.environ.setdefault(name, value)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_entry_point(subcommand: str) -> None:
    """For entry_points/*.py: `--overrides "a=1 b=2"` (one MLproject parameter) becomes dotted arguments."""
    try:
        args = _entry_point_args(sys.argv[1:])
    except typer.Exit as stop:  # raised outside the app: exit as the app would
        sys.exit(stop.exit_code)
    app([subcommand, *args])


def _entry_point_args(argv: list[str]) -> list[str]:
    import shlex

    args = _boolean_flags(argv)
    if "--overrides" in args:
        at = args.index("--overrides")
        given = args[at + 1] if at + 1 < len(args) else ""
        try:
            args = args[:at] + shlex.split(given) + args[at + 2 :]
        except ValueError as err:  # an unbalanced quote: shlex's "No closing quotation"
            _fail(f"--overrides: {err} in {given!r}")
    return args


BOOLEAN_FLAGS = ("--quick", "--skip-idle", "--skip-burn-in", "--skip-sampling", "--ablations")


def _boolean_flags(args: list[str]) -> list[str]:
    """MLproject parameters always carry a value: `--quick true` -> `--quick`, `--quick false` -> nothing,
    and an option given as "" (a parameter left at its empty default) is left out."""
    out: list[str] = []
    items = iter(args)
    for arg in items:
        if arg.startswith("--") and arg not in BOOLEAN_FLAGS and arg != "--overrides":
            value = next(items, None)
            if value not in (None, ""):
                out += [arg, value]
        elif arg in BOOLEAN_FLAGS:
            value = next(items, "true").strip().lower()
            if value not in ("true", "false", "1", "0", "yes", "no"):
                _fail(f"{arg}: expected true or false, got '{value}'")
            if value in ("true", "1", "yes"):
                out.append(arg)
        else:
            out.append(arg)
    return out
