"""The standard table: one row per finished parent run, energy by role, quality per task.

    dist-bench report --experiment dist-bench

Roles group stages as in the stage-wise protocol: prerun / teacher (logit_caching, teacher_generation) /
student (student_train, dpo_training) / eval. Energy figures that include an estimated component (CPU or
RAM from CodeCarbon's estimate) carry a `~`; a figure that could not be measured is shown as `n/a`, never
0. Teacher energy is amortised over the distinct students trained on the same teacher output (stage
run); `reused` names the stages a row took from earlier runs instead of recomputing; break-even is the
number of students that must share one teacher output before its amortised cost per student falls below
one student's training energy. `gpu_uncertainty_pct` is the half-width of the GPU energy interval (counter
resolution, the sensor's +-5%, counter-vs-integration gap); `flags` lists stage warnings such as
`counter_integration_mismatch` or `below_resolution`. Markdown goes to the terminal; CSV, HTML and a Pareto plot of energy
against quality (the frontier drawn, points labelled) are artifacts of a `dist_bench.role=report` run, with
the table as LaTeX (booktabs) and as one self-contained HTML page with the plot inline.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from dist_bench import preflight
from dist_bench.headline import ROLES
from dist_bench.redact import redact
from dist_bench.tracking import ROLE, open_store, tracking_uri

# What the eval stage logs per task beside its scores (evaluation/stage.py): costs, not quality columns.
TASK_COSTS = ("energy_j", "duration_s", "tokens", "j_per_token", "judge_tokens", "judge_spend_usd")

ESTIMATED = "~"


FILES = ("table.csv", "table.md", "table.html", "table.tex")


def run(experiments: list[str], output_dir: Path, filter_string: str | None = None) -> str:
    """Build the table from the tracking server, write the files, log them as a report run; return Markdown.
    `filter_string`: more conditions in MLflow's search syntax (`params.train.token_budget = '3000000'`)."""
    preflight.report(output_dir)
    open_store()
    client = MlflowClient()
    experiment_ids = _experiment_ids(client, experiments)
    query = f"tags.`{ROLE}` = 'pipeline' and attributes.status = 'FINISHED'"
    try:
        parents = client.search_runs(
            experiment_ids=experiment_ids,
            filter_string=f"{query} and {filter_string}" if filter_string else query,
            order_by=["attributes.start_time ASC"],
        )
    except mlflow.exceptions.MlflowException as err:  # a filter MLflow cannot parse: bad input, not a failure
        if not filter_string:
            raise
        raise ValueError(f"--filter: {filter_string!r}: {err.message.splitlines()[0]}") from None
    if not parents:
        raise ValueError(
            f"no finished pipeline runs in experiment(s) {', '.join(experiments) or '(all)'}"
            + (f" matching --filter {filter_string!r}" if filter_string else "")
        )
    rows = [_row_facts(run) for run in parents]
    rows.sort(key=lambda r: r["sweep"] or "")  # a sweep's points side by side, each group in run order
    table = build_table(rows)
    markdown = to_markdown(table)
    plot = _write_files(table, markdown, output_dir)
    with mlflow.start_run(experiment_id=experiment_ids[0], run_name="report") as report_run:
        mlflow.set_tags({ROLE: "report", "dist_bench.rows": str(len(table))})
        mlflow.log_param("experiments", ",".join(experiments) or "(all)")
        if filter_string:
            mlflow.log_param("filter", filter_string)
        for name in FILES:
            mlflow.log_artifact(str(output_dir / name), "report")
        if plot:
            mlflow.log_artifact(str(plot), "report")
    return markdown + f"\n\nreport run: {report_run.info.run_id}; files in {output_dir}/"


def from_run_dir(run_dir: Path, output_dir: Path) -> str:
    """The same table from the `experiment_summary.json` files under `run_dir` (output.run_dir/pipelines/),
    for users without a tracking server: the files are written to output_dir, nothing is logged."""
    runs = []
    for path in sorted(Path(run_dir).rglob("experiment_summary.json")):
        summary = json.loads(path.read_text())
        if "start_time" not in summary.get("run", {}):
            raise ValueError(
                f"--run-dir: {path} was written before summaries carried their run's tags and metrics"
            )
        data = SimpleNamespace(
            tags=summary["run"]["tags"],
            metrics=summary["run"]["metrics"],
            params=summary["run"].get("params", {}),
        )
        info = SimpleNamespace(
            run_name=summary["run"]["name"], run_id=summary["run_id"], start_time=summary["run"]["start_time"]
        )
        runs.append((summary.get("stages", {}), SimpleNamespace(info=info, data=data)))
    if not runs:
        raise ValueError(f"--run-dir: no experiment_summary.json under {run_dir}")
    runs.sort(key=lambda item: item[1].info.start_time)  # the order of the tracking server's table
    rows = [_row_facts(run) for _, run in runs]
    rows.sort(key=lambda r: r["sweep"] or "")
    table = build_table(rows)
    markdown = to_markdown(table)
    _write_files(table, markdown, output_dir)
    return (
        markdown
        + f"\n\nfrom {len(rows)} experiment_summary.json files under {run_dir}; files in {output_dir}/"
    )


def _write_files(table: pd.DataFrame, markdown: str, output_dir: Path) -> Path | None:
    output_dir.mkdir(parents=True, exist_ok=True)
    plot = _pareto_plot(table, output_dir / "pareto.png")
    table.to_csv(output_dir / "table.csv", index=False)
    (output_dir / "table.md").write_text(markdown + "\n")
    (output_dir / "table.html").write_text(to_html(table, plot))
    (output_dir / "table.tex").write_text(to_latex(table))
    return plot


def to_html(table: pd.DataFrame, plot: Path | None) -> str:
    """One self-contained page: the table, and the Pareto plot inline (base64), so it can be mailed or
    attached as it is."""
    import base64
    import html

    figure = ""
    if plot is not None:
        data = base64.b64encode(plot.read_bytes()).decode()
        figure = f'<h2>Total energy against quality</h2>\n<img alt="Pareto plot" src="data:image/png;base64,{data}">'
    body = table.drop(columns=["estimated_energy"], errors="ignore").to_html(
        index=False, na_rep="n/a", float_format=lambda value: f"{value:.6g}"
    )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>dist-bench: the standard table</title>'
        "<style>body{font-family:sans-serif} td,th{padding:2px 6px;text-align:right}</style></head><body>\n"
        f"<h1>{html.escape('dist-bench: the standard table')}</h1>\n{body}\n{figure}\n</body></html>\n"
    )


def to_latex(table: pd.DataFrame) -> str:
    """The table for a paper: booktabs rules (\\toprule, \\midrule, \\bottomrule), the cells as Markdown
    shows them (n/a, ~ on estimated energy), LaTeX special characters escaped."""
    shown = table.drop(columns=["run_id", "estimated_energy"], errors="ignore")
    estimated = table.get("estimated_energy", pd.Series([False] * len(table)))
    cells = pd.DataFrame(
        [
            [_cell(c, row[c], bool(est)) for c in shown.columns]
            for (_, row), est in zip(shown.iterrows(), estimated, strict=True)
        ],
        columns=shown.columns,
    )
    styler = cells.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    return styler.to_latex(hrules=True, column_format="l" * len(cells.columns))


def _experiment_ids(client: MlflowClient, names: list[str]) -> list[str]:
    if not names:
        return [e.experiment_id for e in client.search_experiments()]
    ids = []
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise ValueError(f"--experiment: no experiment named '{name}' at {redact(tracking_uri())}")
        ids.append(experiment.experiment_id)
    return ids


def _row_facts(run: Any) -> dict[str, Any]:
    """What one parent run contributes: identity, per-role energy, totals, quality, teacher stage id."""
    metrics, tags = run.data.metrics, run.data.tags
    facts: dict[str, Any] = {
        "run": run.info.run_name,
        "run_id": run.info.run_id,
        "pipeline": tags.get("dist_bench.pipeline"),
        "teacher": tags.get("dist_bench.teacher"),
        "student": tags.get("dist_bench.student"),
        "data": tags.get("dist_bench.data"),
        "sweep": tags.get("dist_bench.sweep"),
        "ablation": tags.get("dist_bench.ablation"),
        "tokens": metrics.get("total/tokens"),
        "token_budget": _int(run.data.params.get("train.token_budget"))
        if run.data.params.get("pipeline") in TRAINING
        else None,
        "wall_s": metrics.get("total/duration_s"),
        "gpu_kwh": _kwh(metrics.get("total/gpu_energy_j")),
        "total_kwh": metrics.get("total/total_energy_kwh"),
        "net_kwh": _kwh(metrics.get("total/net_energy_j")),
        "gpu_uncertainty_pct": _percent(
            metrics.get("total/gpu_energy_uncertainty_j"), metrics.get("total/gpu_energy_j")
        ),
        "flags": ",".join(
            sorted({f for s in _stages() for f in tags.get(f"{s}/energy.flags", "").split(",") if f})
        )
        or None,
        "co2e_kg": metrics.get("total/co2e_kg"),
        "j_per_token": metrics.get("total/j_per_token"),
        "estimated": any(
            tags.get(f"{s}/energy.{c}.source") == "estimated" for s in _stages() for c in ("cpu", "ram")
        ),
        "teacher_stage_run": next((tags[t] for t in _teacher_stage_tags() if t in tags), None),
        "student_stage_run": next((tags[t] for t in _student_stage_tags() if t in tags), None),
        "reused": "+".join(s for s in _stages() if f"dist_bench.reused.{s}" in tags) or "-",
    }
    for role, stages in ROLES.items():
        joules = [metrics[f"{s}/total_energy_j"] for s in stages if f"{s}/total_energy_j" in metrics]
        facts[f"{role}_kwh"] = _kwh(sum(joules)) if joules else None
    tasks = tags.get(EVAL_TASKS)
    facts["quality"] = quality_columns(metrics, tasks.split(",") if tasks else None)
    task_names = tasks.split(",") if tasks else sorted({c.split("/")[0] for c in facts["quality"]})
    facts["task_energy"] = {  # each task's share of the eval stage (evaluation/stage.py splits it)
        f"eval_kwh:{task}": metrics[f"eval/{task}/energy_j"] / 3.6e6
        for task in task_names
        if f"eval/{task}/energy_j" in metrics
    }
    return facts


TRAINING = ("kd", "sft", "dpo")  # pipelines that train a student under train.token_budget


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "None") else None
    except ValueError:
        return None


EVAL_TASKS = "dist_bench.eval_tasks"  # parent tag: the task names the eval stage ran (evaluation/stage.py)


def quality_columns(metrics: dict[str, float], tasks: list[str] | None) -> dict[str, float]:
    """A parent's scores as table columns: "<task>/<metric>" of each task it ran (not a group's subtasks,
    mmlu's 57 subjects), or "<task>/<filter>/<metric>" for a task that reports its metric only per filter
    (gsm8k's strict-match and flexible-extract); no stderrs, no per-task costs. `tasks` None (runs from
    before the tag): every two-level name."""
    scores = {
        name.removeprefix("eval/"): value
        for name, value in metrics.items()
        if name.startswith("eval/")
        and not name.endswith("_stderr")
        and name.rpartition("/")[2] not in TASK_COSTS
    }
    if tasks is None:
        return {name: value for name, value in scores.items() if name.count("/") == 1}
    columns: dict[str, float] = {}
    for task in tasks:
        own = {name: v for name, v in scores.items() if name.startswith(f"{task}/")}
        flat = {name: v for name, v in own.items() if name.count("/") == 1}
        columns |= flat or {name: v for name, v in own.items() if name.count("/") == 2}
    return columns


def build_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    # Students per teacher output: distinct student training runs, so a repeated pipeline that reused
    # everything does not pretend to have trained another student.
    students_of: dict[str, set[str]] = {}
    for r in rows:
        if r["teacher_stage_run"] and r["student_stage_run"]:
            students_of.setdefault(r["teacher_stage_run"], set()).add(r["student_stage_run"])
    records = []
    for r in rows:
        record = {
            k: r[k]
            for k in (
                "run",
                "sweep",
                "ablation",
                "pipeline",
                "teacher",
                "student",
                "data",
                "token_budget",
                "tokens",
                "reused",
            )
        }
        for role in ROLES:
            record[f"{role}_kwh"] = r[f"{role}_kwh"]
        record.update(
            {
                k: r[k]
                for k in (
                    "gpu_kwh",
                    "total_kwh",
                    "net_kwh",
                    "gpu_uncertainty_pct",
                    "co2e_kg",
                    "wall_s",
                    "j_per_token",
                    "flags",
                )
            }
        )
        students = len(students_of.get(r["teacher_stage_run"], ()))
        teacher, student = r["teacher_kwh"], r["student_kwh"]
        record["teacher_kwh_amortised"] = teacher / students if teacher is not None and students else None
        record["students_sharing_teacher"] = students or None
        record["break_even_students"] = (
            math.ceil(teacher / student) if teacher is not None and student else None
        )
        record.update(r["quality"])
        record.update(r["task_energy"])
        record["estimated_energy"] = r["estimated"]
        record["run_id"] = r["run_id"]
        records.append(record)
    table = pd.DataFrame.from_records(records)
    # Columns no row fills (e.g. prerun before anyone ran one) would only be noise. GPU energy stays: a table
    # made without GPUs must say so (n/a), not silently leave the column out.
    empty = [c for c in table.columns if table[c].isna().all() and c != "gpu_kwh"]
    return table.drop(columns=empty)


def to_markdown(table: pd.DataFrame) -> str:
    shown = table.drop(columns=["run_id", "estimated_energy"], errors="ignore")
    header = list(shown.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for index, row in shown.iterrows():
        estimated = bool(table.loc[index].get("estimated_energy", False))
        cells = [_cell(column, row[column], estimated) for column in header]
        lines.append("| " + " | ".join(cells) + " |")
    if table.get("estimated_energy") is not None and table["estimated_energy"].any():
        lines.append("")
        lines.append(
            f"{ESTIMATED} includes CPU/RAM energy estimated by CodeCarbon (no readable RAPL); GPU energy, where "
            "present, is from NVML's energy counter."
        )
    budgets = table["token_budget"].dropna().unique() if "token_budget" in table else []
    if len(budgets) > 1:
        lines.append(
            "token_budget differs between training rows ("
            + ", ".join(f"{b:,.0f}" for b in sorted(budgets))
            + "): compare methods at equal budget (--filter on params.`train.token_budget`)."
        )
    if table["gpu_kwh"].isna().any():
        lines.append(
            "gpu_kwh n/a: not measured (no NVIDIA GPU visible, or NVML failed; each stage run's energy.gpu.note "
            "says why), and never counted as 0 in a total."
        )
    return "\n".join(lines)


ENERGY_COLUMNS = {"gpu_kwh", "prerun_kwh", "teacher_kwh", "student_kwh", "eval_kwh", "total_kwh", "net_kwh",
                  "co2e_kg", "j_per_token", "teacher_kwh_amortised"}  # fmt: skip


def _cell(column: str, value: Any, estimated: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        energy = column in ENERGY_COLUMNS or column.startswith("eval_kwh:")
        text = f"{value:.3g}" if energy or abs(value) < 1 else f"{value:,.0f}"
        if column in {"wall_s"}:
            text = f"{value:.1f}"
        if column == "gpu_uncertainty_pct":
            return f"±{value:.1f}%"
        if column.count("/") == 1:  # quality: task/metric
            text = f"{value:.3f}"
        return f"{ESTIMATED}{text}" if estimated and energy else text
    return str(value)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none with less or equal energy (x) and more or equal
    quality (y), better in one. In order of energy; of exact duplicates the first counts."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _pareto_plot(table: pd.DataFrame, path: Path) -> Path | None:
    """Total energy against each quality column: every row a labelled point, the frontier drawn."""
    quality = [c for c in table.columns if c.count("/") >= 1]
    if not quality or "total_kwh" not in table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(quality), figsize=(4.5 * len(quality), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], quality, strict=False):
        points = table[["run", "total_kwh", metric]].dropna()
        ax.scatter(points["total_kwh"], points[metric])
        for _, p in points.iterrows():
            ax.annotate(str(p["run"]), (p["total_kwh"], p[metric]), fontsize=7)
        front = points.iloc[pareto_front(list(zip(points["total_kwh"], points[metric], strict=True)))]
        ax.step(front["total_kwh"], front[metric], where="post", color="tab:red", label="Pareto frontier")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_xlabel("total energy (kWh)")
        ax.set_ylabel(metric)
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _percent(part: float | None, whole: float | None) -> float | None:
    return 100 * part / whole if part is not None and whole else None


def _kwh(joules: float | None) -> float | None:
    return joules / 3.6e6 if joules is not None else None


def _stages() -> list[str]:
    return [s for stages in ROLES.values() for s in stages]


def _teacher_stage_tags() -> list[str]:
    return [f"dist_bench.stage_run.{s}" for s in ROLES["teacher"]]


def _student_stage_tags() -> list[str]:
    return [f"dist_bench.stage_run.{s}" for s in ROLES["student"]]
