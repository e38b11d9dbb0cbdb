"""What the MLflow UI shows first: a parent's headline metrics, its one-line result, and a runs-table view.

A parent run carries 200-odd metrics (`<stage>/<metric>` per stage, `total/<metric>`, `eval/<task>/...`).
A user comparing pipelines came for two things: what it cost and what it bought. So every parent also
carries a few headline metrics, named the same for every pipeline, in units that read well at tiny-world
and at real scale (the UI rounds to two decimals: 3e-6 kWh shows as 0.00, 10.8 J as 0.003 Wh, 0.0031):

    energy_wh, net_energy_wh, gpu_energy_wh       every stage of the pipeline, gross / idle subtracted / GPU
    <role>_energy_wh                               prerun, teacher, student, eval (seed 001's roles)
    co2e_g, j_per_token, wall_time_min
    eval/<task>/<metric>                           quality, as logged by the eval stage (unchanged)

the tag `dist_bench.energy_covers` saying which stages and measurement sources the total covers, and a
run description (`mlflow.note.content`) with the one-line result.

The experiment gets a shared view (MLflow's own "share view" state, an experiment tag
`mlflow.sharedViewState.<key>`): the runs table filtered to pipeline parents with the headline columns
selected. `view_url` is the link the pipelines print.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from mlflow.tracking import MlflowClient

from dist_bench.redact import redact

# Seed 001's four roles: which stage ids each one groups (the report's energy-by-role columns, too).
ROLES = {
    "prerun": ("prerun",),
    "teacher": ("logit_caching", "teacher_generation"),
    "student": ("student_train", "dpo_training"),
    "eval": ("eval",),
}
ENERGY = ("energy_wh", "net_energy_wh", "gpu_energy_wh", *(f"{role}_energy_wh" for role in ROLES))
OTHERS = ("co2e_g", "j_per_token", "wall_time_min")
HEADLINE = (*ENERGY, *OTHERS)
COVERS = "dist_bench.energy_covers"
NOTE = "mlflow.note.content"  # what the MLflow UI shows as a run's description
VIEW_KEY = "dist-bench"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
J_PER_WH = 3600.0


def metrics(totals: dict[str, float], stages: dict[str, dict[str, float]]) -> dict[str, float]:
    """The headline metrics (four significant digits) from the parent's totals (`total/<name>` without the prefix) and each stage's
    metrics. A figure the totals lack (a component that could not be measured) is absent, never 0."""
    out: dict[str, float] = {}
    for name, total in (("energy_wh", "total_energy_j"), ("net_energy_wh", "net_energy_j"),
                        ("gpu_energy_wh", "gpu_energy_j")):  # fmt: skip
        if total in totals:
            out[name] = totals[total] / J_PER_WH
    for role, role_stages in ROLES.items():
        joules = [stages[s]["total_energy_j"] for s in role_stages if "total_energy_j" in stages.get(s, {})]
        if joules:
            out[f"{role}_energy_wh"] = sum(joules) / J_PER_WH
    if "co2e_kg" in totals:
        out["co2e_g"] = totals["co2e_kg"] * 1000
    if "j_per_token" in totals:
        out["j_per_token"] = totals["j_per_token"]
    if "duration_s" in totals:
        out["wall_time_min"] = totals["duration_s"] / 60
    # Four significant digits: the runs table shows a value as logged (0.06313770055009324), and these are
    # for reading; the exact figures stay in total/<metric> and <stage>/<metric>.
    return {name: float(f"{value:.4g}") for name, value in out.items()}


def covers(stages: list[tuple[str, bool, dict[str, str]]]) -> str:
    """What the total covers: each stage (reused ones counted at their original cost) and the energy
    sources of its components. `stages`: (stage id, reused, {component: source})."""
    parts = []
    for stage, reused, sources in stages:
        source = ", ".join(f"{c} {sources.get(c, 'unavailable')}" for c in ("gpu", "cpu", "ram"))
        parts.append(f"{stage} ({source}{'; reused, at its original cost' if reused else ''})")
    return "all stages: " + "; ".join(parts)


def description(
    pipeline: str, run_name: str, tags: dict[str, str], headline: dict[str, float], quality: dict[str, float]
) -> str:
    """The one-line result, as the run description (Markdown)."""
    teacher, student = tags.get("dist_bench.teacher"), tags.get("dist_bench.student")
    who = f"{teacher} → {student}" if pipeline in ("kd", "sft", "dpo") else (student or teacher or "")
    energy = [f"{_number(headline['energy_wh'])} Wh" if "energy_wh" in headline else "energy n/a"]
    if "net_energy_wh" in headline:
        energy.append(f"net {_number(headline['net_energy_wh'])} Wh")
    roles = [f"{r} {_number(headline[f'{r}_energy_wh'])}" for r in ROLES if f"{r}_energy_wh" in headline]
    parts = [", ".join(energy) + (f" ({', '.join(roles)} Wh)" if len(roles) > 1 else "")]
    if "co2e_g" in headline:
        parts.append(f"{_number(headline['co2e_g'])} g CO2e")
    if "j_per_token" in headline:
        parts.append(f"{_number(headline['j_per_token'])} J/token")
    if "wall_time_min" in headline:
        parts.append(f"{headline['wall_time_min']:.1f} min")
    scores = "; ".join(f"{name} {value:.3f}" for name, value in quality.items())
    line = f"**{pipeline}** `{run_name}`: {who}. " + ", ".join(parts) + "."
    return redact(line + (f" Quality: {scores}." if scores else ""))


def update_view(client: MlflowClient, experiment_id: str, quality: list[str]) -> None:
    """The experiment's shared runs-table view: pipeline parents, newest first, the model and pipeline
    params, the headline metrics and every quality column seen so far (kept from earlier pipelines)."""
    experiment = client.get_experiment(experiment_id)
    earlier = _view_state(experiment.tags.get(VIEW_TAG))
    columns = [
        "params.`pipeline`",
        "params.`model`",
        *(f"metrics.`{name}`" for name in HEADLINE),
        *(f"metrics.`eval/{name}`" for name in quality),
    ]
    columns += [c for c in earlier.get("selectedColumns", []) if c not in columns]
    state = {
        "selectedColumns": columns,
        "searchFilter": "tags.`dist_bench.role` = 'pipeline'",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }
    client.set_experiment_tag(experiment_id, VIEW_TAG, json.dumps(state))


def view_url(ui: str, experiment_id: str) -> str:
    """The runs table with the headline columns (`ui`: the tracking server's address)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={quote(VIEW_KEY)}"


def _view_state(value: str | None) -> dict[str, Any]:
    try:
        return json.loads(value) if value else {}
    except json.JSONDecodeError:  # someone else's state under our key: start afresh
        return {}


def _number(value: float) -> str:
    """Three significant digits, without scientific notation for the usual range."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
