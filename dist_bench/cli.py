"""The `dist-bench` command. Subcommands mirror the MLproject entry points one to one.

    dist-bench kd --config configs/experiments/tiny_kd.yaml train.optimizer.lr=1e-3 kd.temperature=2
    dist-bench cache_logits --config ...
    dist-bench eval --model tinyworld:teacher --config ...
    dist-bench report --experiment dist-bench
    dist-bench main                     # kd on the embedded default (what a bare `mlflow run .` runs)

Bad input (config, data, arguments) ends with one line on stderr and exit code 2, before any work where
it can be caught that early; a stage that fails is marked FAILED in MLflow, never FINISHED.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from dist_bench.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="experiment YAML (merged over configs/base.yaml)")
]
Overrides = Annotated[list[str] | None, typer.Argument(help="dotted overrides, e.g. train.optimizer.lr=1e-3")]
BAD_INPUT = 2


@app.command("main")
def main_(overrides: Overrides = None) -> None:
    """The KD pipeline on the embedded offline tiny world."""
    kd(config=None, overrides=overrides)


@app.command("kd")
def kd(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Logit caching -> KD student training -> evaluation, as one parent run with nested stage runs."""
    cfg = _load(config, overrides)  # before the heavy imports: bad input fails in a second
    from dist_bench import pipeline
    from dist_bench.prerun import PrerunFailed

    try:
        run = _guarded(lambda: pipeline.kd(cfg))
    except PrerunFailed as err:  # the gate: nothing of the teacher's was started
        typer.echo(f"dist-bench: error: prerun failed, pipeline stopped: {err}", err=True)
        raise typer.Exit(1) from None
    _print_stages(run)


@app.command("cache_logits")
def cache_logits(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Cache the teacher's top-k log-probs over the training set (the kd pipeline reuses it)."""
    cfg = _load(config, overrides)
    from dist_bench import pipeline

    run = _guarded(lambda: pipeline.cache_logits(cfg))
    _print_stages(run)


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Option(help="HF model id, local dir, tinyworld:<name> or runs:/<id>/<path>")],
    config: ConfigOption = None,
    dtype: Annotated[str, typer.Option(help="auto|float32|bfloat16|float16")] = "auto",
    overrides: Overrides = None,
) -> None:
    """Evaluate one model on the config's lm-eval tasks (a parent run with one `eval` stage)."""
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        _fail(f"--dtype: '{dtype}' is not one of auto, float32, bfloat16, float16")
    if not model.strip():
        _fail("--model: empty")
    cfg = _load(config, overrides)
    from dist_bench import pipeline

    run = _guarded(lambda: pipeline.evaluate(cfg, model, dtype))
    _print_stages(run)


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
    from dist_bench import pipeline
    from dist_bench.prerun import PrerunFailed, summary_text

    try:
        run, report = _guarded(lambda: pipeline.validate(cfg, output_dir))
    except PrerunFailed as err:
        typer.echo(summary_text(err.report))
        typer.echo(f"dist-bench: error: prerun failed: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(summary_text(report))
    _print_stages(run)


@app.command("report")
def report(
    experiment: Annotated[list[str] | None, typer.Option(help="experiment name(s); default: all")] = None,
    output_dir: Annotated[Path, typer.Option(help="where table.md/.csv/.html are written")] = Path("report"),
) -> None:
    """Aggregate the parent runs into the standard table (Markdown here; CSV/HTML as report-run artifacts)."""
    from dist_bench import report as report_module

    table = _guarded(lambda: report_module.run(experiment or [], output_dir))
    typer.echo(table)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    return cfg


def _guarded(call):
    try:
        return call()
    except (FileNotFoundError, ValueError) as err:  # ConfigError, DataError and VocabMismatch are ValueErrors
        _fail(f"{type(err).__name__}: {err}")


def _fail(message: str) -> None:
    typer.echo(f"dist-bench: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    raise typer.Exit(BAD_INPUT)


def _print_stages(run: object) -> None:
    for stage in run.stages:  # type: ignore[attr-defined]
        how = "reused" if stage.reused else "ran"
        energy = stage.metrics.get("total_energy_j")
        shown = f"{energy:.1f} J" if energy is not None else "energy n/a"
        typer.echo(
            f"{stage.stage:>14}: {how} (run {stage.run_id}) {stage.metrics.get('duration_s', 0):.1f} s, {shown}"
        )
    typer.echo(f"parent run: {run.run_id}")  # type: ignore[attr-defined]


@app.callback()
def _prepare_process() -> None:
    """Runs before every subcommand; cheap on purpose (bad input must fail fast)."""
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
    import shlex

    args = _boolean_flags(sys.argv[1:])
    if "--overrides" in args:
        at = args.index("--overrides")
        args = args[:at] + shlex.split(args[at + 1] if at + 1 < len(args) else "") + args[at + 2 :]
    app([subcommand, *args])


BOOLEAN_FLAGS = ("--quick", "--skip-idle", "--skip-burn-in", "--skip-sampling")


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
