"""The MLflow UI as a user comparing pipelines sees it: a real `mlflow server`, the kd, sft and dpo pipelines
of the tiny world logged to it, and headless Chromium (Debian's `chromium` package, driven by playwright)
on the runs table (the experiment's shared view, the link every pipeline prints) and on the compare page of
the three parents. Both must show the headline metrics without picking columns by hand.

Screenshots go to the test's tmp dir; with DIST_BENCH_SCREENSHOTS=docs/img they also go there (how the
ones in docs/mlflow_ui.md were made)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, SMALL
from dist_bench import headline, pipeline
from dist_bench.config import load_config
from dist_bench.energy.nvml_sim import SimulatedNvml

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt install chromium)")


def tiny(name: str, workdir: Path, *more: str) -> object:
    overrides = [*SMALL, "energy.codecarbon=true", f"output.run_dir={workdir / 'runs'}", *more]
    return load_config(PROJECT / "configs" / "experiments" / f"{name}.yaml", overrides)


@pytest.fixture
def three_parents(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simulated_gpu: SimulatedNvml
) -> tuple[str, list[str]]:
    """kd, sft and dpo parents on the server, with energy (a simulated GPU) and quality."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(server)
    parents = [
        pipeline.kd(tiny("tiny_kd", tmp_path)),
        pipeline.sft(tiny("tiny_sft", tmp_path)),
        pipeline.dpo(tiny("tiny_dpo", tmp_path, "dpo.heldout_pairs=8")),
    ]
    return parents[0].experiment_id, [p.run_id for p in parents]


def test_runs_table_and_compare_page_show_the_headline_metrics(
    server: str, three_parents: tuple[str, list[str]], tmp_path: Path
) -> None:
    experiment_id, run_ids = three_parents
    client = MlflowClient(server)
    runs = [client.get_run(run_id) for run_id in run_ids]
    names = [r.info.run_name for r in runs]
    assert names == ["tiny-kd", "tiny-sft", "tiny-dpo"]
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 2600, "height": 800})
        # The runs table through the shared view: parents only, the headline columns selected.
        page.goto(headline.view_url(server, experiment_id))
        table = page.locator(".ag-root")
        for name in names:
            table.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        _close_assistant(page)
        header = table.locator(".ag-header").inner_text()
        for column in (
            "energy_wh",
            "co2e_g",
            "j_per_token",
            "student_energy_wh",
            "eval/tiny_arith/exact_match",
        ):
            assert column in header, column
        shown = table.locator(".ag-center-cols-container").inner_text()
        for run in runs:  # each parent's energy, as logged (four significant digits), is on screen
            assert _shown(run.data.metrics["energy_wh"]) in shown
        assert "tiny-kd/eval" not in table.inner_text()  # stage runs are filtered out
        page.screenshot(path=str(shots / "mlflow_runs_table.png"))
        # The compare page of the three parents: a row per metric (a virtual list, scrolled as a user
        # scrolls it), a column per parent; each headline metric with the three values as logged.
        ids = quote(json.dumps(run_ids))
        page.goto(f"{server}/#/compare-runs?runs={ids}&experiments={quote(json.dumps([experiment_id]))}")
        page.get_by_text("Comparing 3 Runs").wait_for(timeout=60_000)
        _close_assistant(page)
        absent = {"prerun_energy_wh", "net_energy_wh"}  # no prerun stage, no idle power measured here
        for name in (*(h for h in headline.HEADLINE if h not in absent), "eval/tiny_arith/exact_match"):
            expected = [_compare_page_number(run.data.metrics[name]) for run in runs]
            assert _compare_page_row(page, name) == expected, name
        _compare_page_top(page)
        page.screenshot(path=str(shots / "mlflow_compare_runs.png"))
        browser.close()
    if os.environ.get("DIST_BENCH_SCREENSHOTS"):
        out = Path(os.environ["DIST_BENCH_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        for shot in shots.iterdir():
            shutil.copy(shot, out / shot.name)


def _shown(value: float) -> str:
    """A metric as the UI prints it: the logged float, without a trailing .0."""
    return f"{value:g}" if value == float(f"{value:g}") else repr(value)


def _compare_page_number(value: float) -> str:
    """A metric as the compare page prints it: MLflow's Utils.formatMetric, in Python."""
    if value == 0:
        return "0"
    if abs(value) < 0.001:
        mantissa, exponent = f"{value:.3e}".split("e")
        return f"{mantissa}e{int(exponent):+d}"
    digits = 3 if abs(value) < 10 else 2 if abs(value) < 100 else 1
    rounded = math.floor(value * 10**digits + 0.5) / 10**digits  # JavaScript's Math.round
    return str(int(rounded)) if rounded.is_integer() else repr(rounded)


# The compare page's metric table is two virtual lists (react-virtualized), names and values, whose cells
# sit at the same `top` (a row's offset); each renders only the rows near its scroll offset, and the names
# follow the values' scrolling one wheel event late. So: find the row's offset among the names, then bring
# the values there and read the cells at that offset.
NAME_TOP = """(names, name) => {
  const link = [...names.querySelectorAll("a[title='Plot chart']")].find(a => a.innerText.trim() === name);
  return link ? parseFloat(link.parentElement.style.top) : null;
}"""
CELLS_AT = """(values, top) => [...values.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
  .filter(cell => parseFloat(cell.style.top) === top)
  .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
  .map(cell => cell.innerText.trim())"""


def _compare_page_row(page: object, name: str) -> list[str] | None:
    """Scroll the compare page's metric table with the mouse wheel, as a user does, to the row `name`;
    return its values, one per run, as shown."""
    grids = page.locator(".ReactVirtualized__Grid")  # type: ignore[attr-defined]
    names = grids.filter(has=page.locator("a[title='Plot chart']")).first  # type: ignore[attr-defined]
    values = grids.nth(1)

    def wheel(delta: float) -> None:
        values.scroll_into_view_if_needed()
        values.hover()
        page.mouse.wheel(0, delta)  # type: ignore[attr-defined]
        page.wait_for_timeout(40)  # type: ignore[attr-defined]

    wheel(-100_000)  # to the top
    end = values.evaluate("grid => grid.scrollHeight - grid.clientHeight")
    for _ in range(end // 180 + 3):
        top = names.evaluate(NAME_TOP, name)
        if top is not None:
            wheel(top - values.evaluate("grid => grid.scrollTop") - 90)  # the row in the values' view
            return values.evaluate(CELLS_AT, top) or None
        wheel(180)
    return None


def _compare_page_top(page: object) -> None:
    """The metric table at its top with names and values in line (the names end one wheel event late:
    1 px down and up leaves them 1 px apart)."""
    values = page.locator(".ReactVirtualized__Grid").nth(1)  # type: ignore[attr-defined]
    values.scroll_into_view_if_needed()
    values.hover()
    for delta in (-100_000, 1, -1):
        page.mouse.wheel(0, delta)  # type: ignore[attr-defined]
        page.wait_for_timeout(100)  # type: ignore[attr-defined]


def _close_assistant(page: object) -> None:
    """MLflow 3.17 opens an assistant panel beside the table; it hides columns in a screenshot."""
    close = page.get_by_role("button", name="Close")  # type: ignore[attr-defined]
    if close.count():
        close.first.click()
