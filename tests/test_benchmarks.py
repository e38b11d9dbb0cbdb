"""The benchmarks users cite, run by the eval stage on local files in each benchmark's real schema with the
Hub off limits: exact scores from models whose answers are known, energy per task summing to the stage,
resume after a failed task, the benchmark-only harness (--tasks list, --dry-run, --run-dir) and pre-flight."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from api_server import MODEL_ID, ApiServer, Behaviour
from benchmark_files import (
    IFEVAL_EMPTY_RESPONSE,
    alpaca_eval_rows,
    arc_rows,
    gsm8k_rows,
    hellaswag_rows,
    ifeval_rows,
    mmlu_rows,
    mt_bench_101_rows,
    write_gsm8k_snapshot,
    write_jsonl,
)
from mlflow.tracking import MlflowClient
from test_evaluation import constant_llama, save_model
from test_preflight import assert_rejected, dist_bench

from conftest import small_config
from dist_bench import pipeline
from dist_bench.evaluation import stage as eval_stage
from dist_bench.evaluation import tasks as task_plan
from dist_bench.tinyworld import ASSETS

MMLU_SUBJECTS = sorted(
    p.stem.removeprefix("mmlu_") for p in (task_plan.builtin_root() / "mmlu" / "default").glob("mmlu_*.yaml")
)


def sums(count: int) -> list[dict]:
    path = ASSETS / "data" / "arith_eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def skewed(rows: list[dict], key: str, values: list) -> list[dict]:
    """Answers not spread evenly, so that a model that always picks one position scores a known fraction
    that no other position would."""
    return [{**row, key: values[i % len(values)]} for i, row in enumerate(rows)]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("benchmark-files")
    return {
        "gsm8k": write_gsm8k_snapshot(folder / "gsm8k", gsm8k_rows(sums(8)), gsm8k_rows(sums(4))),
        "mmlu": write_jsonl(folder / "mmlu" / "all_test.jsonl", mmlu_rows(MMLU_SUBJECTS, 1)),
        "ifeval": write_jsonl(folder / "ifeval" / "ifeval_input_data.jsonl", ifeval_rows()),
        # ARC: choice A is the shortest, D the longest; 5 of 8 answers are A, 3 are D
        "arc_easy": write_jsonl(folder / "arc.jsonl", skewed(arc_rows(8), "answerKey", list("AADAADAD"))),
        "hellaswag": write_jsonl(folder / "hellaswag.jsonl", skewed(hellaswag_rows(8), "label", list("00300303"))),
    }  # fmt: skip


def bench_config(workdir: Path, files: dict[str, Path], tasks: list[str], *extra: str) -> list[str]:
    data = {name: str(files[name]) for name in tasks if name in files}
    return [
        f"eval.tasks={json.dumps(tasks)}",
        f"eval.data={json.dumps(data)}",
        "eval.limit=null",
        "eval.max_length=1536",  # IFEval generates up to 1280 tokens (lm-eval's own setting)
        "eval.batch_size=16",
        "energy.codecarbon=true",  # no RAPL here: CodeCarbon's estimate is the CPU figure to split
        *extra,
    ]


def test_builtin_tasks_on_local_files_score_exactly_with_energy_per_task(
    workdir: Path, files: dict[str, Path]
) -> None:
    # A model that always says "C": in MMLU it answers C; in ARC and HellaSwag every other character costs
    # the same, so the shortest choice has the highest log-likelihood (acc) and the longest the highest
    # per-character one (acc_norm); in IFEval it writes one long word of C's and no comma.
    model = save_model(constant_llama("C"), workdir / "always-C")
    tasks = ["mmlu", "arc_easy", "hellaswag", "ifeval"]
    cfg = small_config(workdir, *bench_config(workdir, files, tasks))
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    parent = pipeline.evaluate(cfg, model)

    stage = parent.stages[-1]
    metrics = stage.metrics
    assert metrics["eval/mmlu/acc"] == pytest.approx(sum(i % 4 == 2 for i in range(57)) / 57)
    assert metrics["eval/mmlu_abstract_algebra/acc"] == 0.0  # row 0: answer A
    assert metrics["eval/mmlu_anatomy/acc"] == 0.0 and metrics["eval/mmlu_astronomy/acc"] == 1.0  # rows 1, 2
    assert metrics["eval/arc_easy/acc"] == 5 / 8 and metrics["eval/arc_easy/acc_norm"] == 3 / 8
    assert metrics["eval/hellaswag/acc"] == 5 / 8 and metrics["eval/hellaswag/acc_norm"] == 3 / 8
    for name, value in IFEVAL_EMPTY_RESPONSE.items():
        assert metrics[f"eval/ifeval/{name}"] == pytest.approx(value)

    # energy per task: every task has its own figures, and they add up to the stage's
    for name in tasks:
        for metric in ("energy_j", "tokens", "j_per_token", "duration_s"):
            assert metrics[f"eval/{name}/{metric}"] > 0, (name, metric)
    assert sum(metrics[f"eval/{t}/energy_j"] for t in tasks) == pytest.approx(
        metrics["total_energy_j"], rel=1e-9
    )
    assert sum(metrics[f"eval/{t}/duration_s"] for t in tasks) == pytest.approx(
        metrics["duration_s"], rel=1e-9
    )
    assert sum(metrics[f"eval/{t}/tokens"] for t in tasks) == metrics["tokens"]
    logged = MlflowClient().get_run(parent.run_id).data.metrics  # rolled up to the parent
    assert MlflowClient().get_run(parent.run_id).data.tags["dist_bench.eval_tasks"] == ",".join(tasks)
    assert logged["eval/ifeval/energy_j"] == pytest.approx(metrics["eval/ifeval/energy_j"])
    assert logged["eval/mmlu/acc"] == pytest.approx(metrics["eval/mmlu/acc"])

    # the task files are lm-eval's task with only the data source replaced
    override = Path(stage.outputs["lm_eval"]).parent / "task_overrides" / "ifeval.yaml"
    text = override.read_text()
    assert "include:" in text and "lm_eval/tasks/ifeval/ifeval.yaml" in text and "dataset_path: json" in text


def test_gsm8k_from_a_hub_snapshot_folder_scores_the_teachers_sums(
    workdir: Path, files: dict[str, Path]
) -> None:
    # The tiny teacher gets every tiny-world sum right; every other reference is off by one. Zero-shot,
    # lm-eval's GSM8K prompt is the tiny world's ("Question: ...\nAnswer:").
    cfg = small_config(workdir, *bench_config(workdir, files, ["gsm8k"], "eval.num_fewshot=0"))
    metrics = pipeline.evaluate(cfg, "tinyworld:teacher").stages[-1].metrics
    assert metrics["eval/gsm8k/strict-match/exact_match"] == 0.5
    assert metrics["eval/gsm8k/tokens"] == metrics["tokens"]


def test_a_failed_task_resumes_without_redoing_the_finished_ones(
    workdir: Path, files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_bench.evaluation import harness

    model = save_model(constant_llama("C"), workdir / "always-C")
    cfg = small_config(workdir, *bench_config(workdir, files, ["arc_easy", "hellaswag"]))
    calls: list[str] = []
    real = harness.run_lm_eval

    def failing_second(lm, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(name)
        if name == "hellaswag" and calls.count("hellaswag") == 1:
            raise RuntimeError("the node went away")
        return real(lm, name, *args, **kwargs)

    monkeypatch.setattr(harness, "run_lm_eval", failing_second)
    with pytest.raises(RuntimeError, match="went away"):
        pipeline.evaluate(cfg, model)
    metrics = pipeline.evaluate(cfg, model).stages[-1].metrics
    assert calls == ["arc_easy", "hellaswag", "hellaswag"]  # arc_easy's record was kept
    assert metrics["eval/arc_easy/acc"] == 5 / 8 and metrics["eval/hellaswag/acc"] == 5 / 8
    # the failed attempt's energy is in the stage, and the tasks still add up to it
    total = metrics["eval/arc_easy/energy_j"] + metrics["eval/hellaswag/energy_j"]
    assert total == pytest.approx(metrics["total_energy_j"], rel=1e-9)


def test_energy_split_shares_what_lies_outside_the_tasks_by_duration() -> None:
    from dist_bench.energy import EnergyReading

    records = [
        eval_stage.TaskRecord("a", {}, 100, 90, 10, span_s=1.0, span_energy_j=10.0),
        eval_stage.TaskRecord("b", {}, 50, 50, 0, span_s=3.0, span_energy_j=50.0),
    ]
    stage = EnergyReading(duration_s=6.0, gpu_energy_j=80.0, cpu_energy_j=0.0, ram_energy_j=0.0)
    split = eval_stage.split_energy(records, stage)
    assert split["eval/a/energy_j"] == 10.0 + 20.0 * 0.25 and split["eval/b/energy_j"] == 50.0 + 20.0 * 0.75
    assert split["eval/a/duration_s"] == 1.5 and split["eval/b/duration_s"] == 4.5
    assert split["eval/a/j_per_token"] == 15.0 / 100
    unmeasured = eval_stage.split_energy(records, EnergyReading(duration_s=6.0))
    assert "eval/a/energy_j" not in unmeasured and unmeasured["eval/a/duration_s"] == 1.5


def test_punkt_tab_is_shipped_and_found_offline() -> None:
    english = task_plan.NLTK_DATA / "tokenizers" / "punkt_tab" / "english"
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(english.iterdir())}
    assert digest == {
        "abbrev_types.txt": "92a3e070f43d9b4c",
        "collocations.tab": "8e2da1225e4dd2cc",
        "ortho_context.tab": "4bbcca25ed3d3f06",
        "sent_starters.txt": "f3f8535483e1dba4",
    }
    # a fresh interpreter with an empty NLTK search path and no network: IFEval's module imports and splits
    code = (
        "import dist_bench.evaluation.harness\n"
        "import lm_eval.tasks.ifeval.instructions_util as u\n"
        "print(u.count_sentences('Hello Mr. Smith. How are you? Fine.'))\n"
    )
    env = {**os.environ, "HOME": "/nonexistent", "NLTK_DATA": ""}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "3"
    assert "Downloaded" not in done.stdout + done.stderr


def test_tasks_list_keeps_a_tasks_error_on_its_own_row(tmp_path: Path) -> None:
    """--tasks list resolves every task at once; where that fails, each task alone, so one bad entry does not
    hide the others."""
    from dist_bench.config import load_config
    from dist_bench.evaluation.listing import task_table

    cfg = load_config(None, ["eval.data=" + json.dumps({"gsm8k": str(tmp_path / "missing.jsonl")})])
    rows = {line.split()[0]: line for line in task_table(cfg.eval).splitlines()[1:]}
    assert rows["gsm8k"].split()[1] == "?" and "missing.jsonl not found" in rows["gsm8k"]
    assert rows["tiny_arith"].split()[1] == "task_dir" and rows["mmlu"].split()[1] == "builtin"
    assert sum("error:" in row for row in rows.values()) == 1


def test_tasks_list_dry_run_and_run_dir(tmp_path: Path, files: dict[str, Path]) -> None:
    listing = dist_bench(
        tmp_path, "eval", "--tasks", "list", f"eval.data={json.dumps({'gsm8k': str(files['gsm8k'])})}"
    )
    assert listing.returncode == 0, listing.stderr[-2000:]
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[1:]}
    for name in ["tiny_arith", "gsm8k", "mmlu", "ifeval", "arc_challenge", "hellaswag", "olmes", "alpaca_eval",
                 "mt_bench_101"]:  # fmt: skip
        assert name in rows, listing.stdout
    assert f"local {files['gsm8k']}" in rows["gsm8k"]
    assert "hub cais/mmlu (not cached)" in rows["mmlu"]
    assert "missing (eval.data.alpaca_eval)" in rows["alpaca_eval"]
    assert all("installed" in rows[n] for n in ("ifeval", "alpaca_eval"))

    data = json.dumps({"arc_easy": str(files["arc_easy"])})
    dry = dist_bench(tmp_path, "eval", "--model", "tinyworld:teacher", "--tasks", "arc_easy,tiny_mc", "--dry-run",
                     f"eval.data={data}")  # fmt: skip
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "dry run: tinyworld:teacher" in dry.stdout and f"arc_easy: local {files['arc_easy']}" in dry.stdout
    assert not (tmp_path / "runs").exists()
    if (tmp_path / "mlflow.db").exists():
        assert not list(sqlite3.connect(tmp_path / "mlflow.db").execute("select run_uuid from runs"))

    bench = dist_bench(tmp_path, "eval", "--model", "tinyworld:teacher", "--tasks", "arc_easy", "--max-samples",
                       "4", "--run-dir", str(tmp_path / "bench"), f"eval.data={data}", "energy.codecarbon=false")  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-2000:]
    summary = json.loads((tmp_path / "bench" / "benchmark_summary.json").read_text())
    [entry] = summary["models"]
    assert entry["tasks"]["arc_easy"]["acc"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert {"tokens", "duration_s", "acc_norm"} <= set(entry["tasks"]["arc_easy"])
    task_json = Path(entry["task_files"]) / "arc_easy" / "tasks" / "arc_easy.json"
    assert json.loads(task_json.read_text())["n-samples"]["effective"] == 4
    assert Path(entry["task_files"]).is_relative_to(tmp_path / "bench")


JUDGE_LOCAL = 'eval.judge={"model": "tinyworld:teacher"}'


@pytest.mark.parametrize(
    ("extra", "culprit"),
    [
        (["--tasks", "gsm8k"], ("gsm8k", "openai/gsm8k", "eval.data.gsm8k")),  # Hub data, offline, not cached
        (["--tasks", "nope_task"], ("eval.tasks", "nope_task")),
        (
            ["--tasks", "arc_easy", 'eval.data={"arc_easy": "/no/such/file.jsonl"}'],
            ("eval.data.arc_easy", "/no/such"),
        ),
        (["--tasks", "arc_easy", 'eval.data={"gsm8k": "x.jsonl"}'], ("eval.data", "gsm8k")),
        (["--tasks", "alpaca_eval", 'eval.data={"alpaca_eval": "{file}"}'], ("eval.judge", "alpaca_eval")),
        (["--tasks", "mmlu", 'eval.data={"mmlu": "{few_subjects}"}'], ("mmlu_", "subject")),
        (
            ["--tasks", "gsm8k", 'eval.data={"gsm8k": "{empty_train}"}'],
            ("eval.data.gsm8k", "train.jsonl has no rows"),
        ),
        (
            ["--tasks", "arc_easy", 'eval.data={"arc_easy": "{broken}"}'],
            ("eval.data.arc_easy", "broken.jsonl:2", "not JSON"),
        ),
        (
            ["--tasks", "alpaca_eval", 'eval.data={"alpaca_eval": "{bad_alpaca}"}', JUDGE_LOCAL],
            ("eval.data.alpaca_eval", "record 2 has no output"),
        ),
        (
            ["--tasks", "mt_bench_101", 'eval.data={"mt_bench_101": "{bad_mt}"}', JUDGE_LOCAL],
            ("eval.data.mt_bench_101", "unknown task", "XX"),
        ),
    ],
)
def test_preflight_names_the_bad_benchmark_input(
    tmp_path: Path, files: dict[str, Path], extra: list[str], culprit: tuple[str, ...]
) -> None:
    given = {
        "{file}": files["arc_easy"],
        "{few_subjects}": write_jsonl(tmp_path / "mmlu_few.jsonl", mmlu_rows(MMLU_SUBJECTS[:3], 1)),
        "{empty_train}": write_jsonl(
            tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "#### 1"}]
        ).parent,
        "{broken}": tmp_path / "broken.jsonl",
        "{bad_alpaca}": write_jsonl(
            tmp_path / "alpaca.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
        ),
        "{bad_mt}": write_jsonl(
            tmp_path / "mt.jsonl", [{"task": "XX", "id": 1, "history": [{"user": "u", "bot": "b"}]}]
        ),
    }
    (tmp_path / "gsm8k" / "train.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\n{"id": \n')
    arguments = []
    for argument in extra:
        for placeholder, path in given.items():
            argument = argument.replace(placeholder, str(path))
        arguments.append(argument)
    done = dist_bench(tmp_path, "eval", "--model", "tinyworld:teacher", *arguments)
    assert_rejected(done, tmp_path, *culprit)


def test_olmes_on_the_files_that_serve_lm_evals_own_arc(workdir: Path, files: dict[str, Path]) -> None:
    # eval.data names the OLMES group of the task; both formulations read the same ARC file
    cfg = small_config(
        workdir,
        *bench_config(workdir, files, ["olmes_arc_easy"]),
        f"eval.data={json.dumps({'olmes_arc_easy': str(files['arc_easy'])})}",
        "eval.max_length=2048",  # OLMES' five curated shots
    )
    metrics = pipeline.evaluate(cfg, save_model(constant_llama("C"), workdir / "always-C")).stages[-1].metrics
    mc, rc = metrics["eval/olmes/arc_easy/mc"], metrics["eval/olmes/arc_easy/rc"]
    assert mc == 0.0  # always " C"; the answers are A and D
    assert metrics["eval/olmes/arc_easy"] == max(mc, rc)
    assert metrics["eval/olmes_arc_easy/energy_j"] == pytest.approx(metrics["total_energy_j"], rel=1e-9)


JUDGE_ENV = "DIST_BENCH_BENCHMARK_JUDGE_KEY"


def judge_verdict(body: dict) -> str | None:
    """MT-Bench-101's judge rates every turn 7; AlpacaEval's prefers the model on even questions and the
    reference ("The answer is ...") on odd ones; anything else (none here) gets the default words."""
    text = " ".join(str(m.get("content")) for m in body.get("messages", []))
    if "Please act as an impartial judge" in text:
        return "Fine. Rating: [[7]]"
    if '"model_identifier"' in text:
        import re

        number = int(re.search(r"What is (\d+) \+", text).group(1))
        shown = dict(re.findall(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', text, re.DOTALL))
        reference = next(k for k, v in shown.items() if v.startswith("The answer is"))
        other = "M" if reference == "m" else "m"
        return other if number % 2 == 0 else reference
    return None


def test_judge_benchmarks_through_the_eval_stage_with_an_http_judge(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(JUDGE_ENV, "sk-test-key")
    alpaca = write_jsonl(workdir / "alpaca_eval.jsonl", alpaca_eval_rows(6))
    mt_bench = write_jsonl(workdir / "mtbench101.jsonl", mt_bench_101_rows())
    with ApiServer(Behaviour(answer=judge_verdict)) as server:
        judge = {"model": "api-judge", "api": {"base_url": server.base_url, "model": MODEL_ID,
                 "api_key_env": JUDGE_ENV, "price": {"input_per_million": 1.0, "output_per_million": 2.0}}}  # fmt: skip
        cfg = small_config(
            workdir,
            'eval.tasks=["alpaca_eval", "mt_bench_101"]',
            f"eval.data={json.dumps({'alpaca_eval': str(alpaca), 'mt_bench_101': str(mt_bench)})}",
            f"eval.judge={json.dumps(judge)}",
            "eval.max_new_tokens=12",
            "eval.judge_max_new_tokens=16",
            "energy.codecarbon=true",
        )
        stage = pipeline.evaluate(cfg, "tinyworld:teacher").stages[-1]
        judged = [r.body for r in server.log if r.status == 200 and r.body]
    metrics = stage.metrics
    assert metrics["eval/alpaca_eval/win_rate"] == 50.0 and metrics["eval/alpaca_eval/n_total"] == 6
    # CM judges its second turn only, SI its one turn: both 7
    assert metrics["eval/mt_bench_101/score"] == 7.0 and metrics["eval/mt_bench_101/judged_turns"] == 2
    assert len(judged) == 6 + 2  # the model under test is local; every request went to the judge
    # the judge's tokens and spend are the server's own count (a token is a word; 4 more per message)
    prompt = sum(len(str(m["content"]).split()) + 4 for b in judged for m in b["messages"])
    completion = sum(min(len(judge_verdict(b).split()), b["max_tokens"]) for b in judged)  # type: ignore[union-attr]
    tasks = ("alpaca_eval", "mt_bench_101")
    assert sum(metrics[f"eval/{t}/judge_tokens"] for t in tasks) == prompt + completion
    spend = sum(metrics[f"eval/{t}/judge_spend_usd"] for t in tasks)
    assert spend == pytest.approx((prompt * 1.0 + completion * 2.0) / 1e6)
    # an API judge's tokens are not the stage's: its energy is not in this machine's window
    assert metrics["tokens"] == metrics["prefill_tokens"] + metrics["decode_tokens"]
    assert sum(metrics[f"eval/{t}/tokens"] for t in ("alpaca_eval", "mt_bench_101")) == metrics["tokens"]
    assert sum(metrics[f"eval/{t}/energy_j"] for t in ("alpaca_eval", "mt_bench_101")) == pytest.approx(
        metrics["total_energy_j"], rel=1e-9
    )


CITED_LM_EVAL = ["gsm8k", "ifeval", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "piqa", "boolq",
                 "openbookqa", "commonsense_qa", "social_iqa"]  # fmt: skip


@pytest.mark.parametrize("name", CITED_LM_EVAL)
def test_every_cited_task_takes_a_local_file_for_its_evaluation_split(name: str, tmp_path: Path) -> None:
    from lm_eval.tasks._yaml_loader import load_yaml

    from dist_bench.config import EvalConfig

    data = write_jsonl(tmp_path / "data.jsonl", [{"x": 1}])
    plan = task_plan.resolve(EvalConfig(tasks=[name], data={name: str(data)}))
    [leaf] = plan.tasks[0].leaves
    original = load_yaml(leaf.yaml_path, resolve_func=False)
    evaluated = original.get("test_split") or original["validation_split"]
    assert leaf.data_files == {evaluated: [str(data)]} and leaf.builder == "json"
    shots = original.get("fewshot_split") or original.get("training_split")
    # shots from the same file (lm-eval never shows a document as its own example); none if none were asked
    assert leaf.splits["fewshot_split"] == (evaluated if shots else None)
    assert all(split in (None, evaluated) for split in leaf.splits.values())
    written = load_yaml(task_plan._write_override(leaf, tmp_path), resolve_func=False)
    assert written["dataset_path"] == "json" and written["dataset_kwargs"]["data_files"] == leaf.data_files
    for key in ("doc_to_text", "doc_to_target", "metric_list", "output_type"):  # lm-eval's own, untouched
        assert written.get(key) == original.get(key), key


def test_the_tables_quality_columns_are_the_tasks_run_not_their_subtasks_or_costs() -> None:
    from dist_bench.report import quality_columns

    metrics = {
        "eval/mmlu/acc": 0.3, "eval/mmlu/acc_stderr": 0.01, "eval/mmlu_anatomy/acc": 0.2,
        "eval/mmlu/energy_j": 5.0, "eval/mmlu/tokens": 100.0,
        "eval/gsm8k/strict-match/exact_match": 0.5, "eval/gsm8k/flexible-extract/exact_match": 0.6,
        "eval/olmes/average": 0.4, "eval/olmes/arc_easy": 0.45, "eval/olmes/arc_easy/mc": 0.45,
        "eval/olmes_arc_easy_mc/acc": 0.45, "total/total_energy_j": 9.0,
    }  # fmt: skip
    assert quality_columns(metrics, ["mmlu", "gsm8k", "olmes"]) == {
        "mmlu/acc": 0.3,
        "gsm8k/strict-match/exact_match": 0.5,
        "gsm8k/flexible-extract/exact_match": 0.6,
        "olmes/average": 0.4,
        "olmes/arc_easy": 0.45,
    }
    # a run from before the tag: every two-level score
    assert set(quality_columns(metrics, None)) == {
        "mmlu/acc", "mmlu_anatomy/acc", "olmes/average", "olmes/arc_easy", "olmes_arc_easy_mc/acc"
    }  # fmt: skip


def test_a_local_judges_work_counts_in_the_tasks_tokens(workdir: Path) -> None:
    # the tiny teacher answers and judges (its verdicts carry no rating): both generate inside the window
    data = write_jsonl(workdir / "mtbench101.jsonl", mt_bench_101_rows())
    cfg = small_config(
        workdir,
        'eval.tasks=["mt_bench_101"]',
        f"eval.data={json.dumps({'mt_bench_101': str(data)})}",
        'eval.judge={"model": "tinyworld:teacher"}',
        "eval.max_new_tokens=8",
        "eval.judge_max_new_tokens=8",
    )
    metrics = pipeline.evaluate(cfg, "tinyworld:teacher").stages[-1].metrics
    assert metrics["eval/mt_bench_101/judged_turns"] == 2 and metrics["eval/mt_bench_101/unrated"] == 2
    judge = metrics["eval/mt_bench_101/judge_tokens"]
    assert 0 < judge < metrics["tokens"] == metrics["eval/mt_bench_101/tokens"]
    assert metrics["tokens"] == metrics["prefill_tokens"] + metrics["decode_tokens"]
    # the judge's prompts (MT-Bench-101's rubric, a byte per token here) are in prefill_tokens: the model's
    # own two prompts are a few dozen bytes each
    assert metrics["prefill_tokens"] > 2000 and metrics["decode_tokens"] >= 4
    assert "eval/mt_bench_101/judge_spend_usd" not in metrics  # a local judge costs energy, not money
