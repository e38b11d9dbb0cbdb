"""Recipes: small files in each dataset's real Hub schema (Parquet, as the Hub stores them, and JSON-lines)
-> the exact training rows, drops counted by reason; a malformed row stops with one line."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_bench.data.recipes import prepare
from dist_bench.dataset import DataError

PROJECT = Path(__file__).resolve().parent.parent
MESSAGES = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))

# allenai/tulu-3-sft-mixture, dataset card dataset_info.features.
TULU3 = pa.schema([("id", pa.string()), ("messages", MESSAGES), ("source", pa.string())])
# open-r1/OpenR1-Math-220k, config default, dataset card dataset_info.features.
OPENR1 = pa.schema(
    [
        ("problem", pa.string()),
        ("solution", pa.string()),
        ("answer", pa.string()),
        ("problem_type", pa.string()),
        ("question_type", pa.string()),
        ("source", pa.string()),
        ("uuid", pa.string()),
        ("is_reasoning_complete", pa.list_(pa.bool_())),
        ("generations", pa.list_(pa.string())),
        ("correctness_math_verify", pa.list_(pa.bool_())),
        ("correctness_llama", pa.list_(pa.bool_())),
        ("finish_reasons", pa.list_(pa.string())),
        ("correctness_count", pa.int64()),
        ("messages", MESSAGES),
    ]
)
# open-r1/codeforces-cots, config solutions, dataset card dataset_info.features.
CODEFORCES_COTS = pa.schema(
    [
        ("id", pa.string()),
        ("aliases", pa.list_(pa.string())),
        ("contest_id", pa.string()),
        ("contest_name", pa.string()),
        ("contest_type", pa.string()),
        ("contest_start", pa.int64()),
        ("contest_start_year", pa.int64()),
        ("index", pa.string()),
        ("time_limit", pa.float64()),
        ("memory_limit", pa.int64()),
        ("title", pa.string()),
        ("description", pa.string()),
        ("input_format", pa.string()),
        ("output_format", pa.string()),
        ("examples", pa.list_(pa.struct([("input", pa.string()), ("output", pa.string())]))),
        ("note", pa.string()),
        ("editorial", pa.string()),
        ("prompt", pa.string()),
        ("generation", pa.string()),
        ("finish_reason", pa.string()),
        (
            "api_metadata",
            pa.struct(
                [
                    ("completion_tokens", pa.int64()),
                    ("prompt_tokens", pa.int64()),
                    ("prompt_tokens_details", pa.null()),
                    ("total_tokens", pa.int64()),
                ]
            ),
        ),
        ("messages", MESSAGES),
    ]
)


def turn(role: str | None, content: str | None) -> dict[str, str | None]:
    return {"content": content, "role": role}


def write(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> Path:
    """Parquet with the real schema, or JSON-lines with the same rows (every column, nulls included)."""
    full = [{name: row.get(name) for name in schema.names} for row in rows]
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(full, schema=schema), path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in full))
    return path


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


TULU3_ROWS = [
    {
        "id": "oasst1_1",
        "messages": [
            turn("system", "Be brief."),
            turn("user", "Hi?"),
            turn("assistant", "Hello."),
            turn("user", "Bye?"),
            turn("assistant", "Bye."),
        ],
        "source": "ai2-adapt-dev/oasst1_converted",
    },
    {"id": "flan_2", "messages": [turn("user", "Only a question")], "source": "flan"},
    {"id": "wild_3", "messages": [turn("user", "   "), turn("assistant", "x")], "source": "wildchat"},
    {"id": "wild_4", "messages": [turn("user", "q"), turn("assistant", None)], "source": "wildchat"},
    {
        "id": "tool_5",
        "messages": [turn("user", "q"), turn("tool", "{}"), turn("assistant", "a")],
        "source": "x",
    },
    {"id": "sci_6", "messages": [turn("user", "Q2"), turn("assistant", "A2 — ünïcode")], "source": "sciriff"},
]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_tulu3(tmp_path: Path, suffix: str) -> None:
    source = write(tmp_path / f"tulu{suffix}", TULU3_ROWS, TULU3)
    manifest = prepare("tulu3", str(source), tmp_path / "out")
    assert lines(tmp_path / "out" / "train.jsonl") == [
        {
            "id": "oasst1_1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye?"},
                {"role": "assistant", "content": "Bye."},
            ],
            "source": "ai2-adapt-dev/oasst1_converted",
        },
        {
            "id": "sci_6",
            "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2 — ünïcode"}],
            "source": "sciriff",
        },
    ]
    assert manifest["rows_read"] == 6 and manifest["rows_written"] == 2
    assert manifest["rows_dropped"] == {"unknown_role": 1, "empty_content": 2, "no_assistant_turn": 1}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    data = (tmp_path / "out" / "train.jsonl").read_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert {key: manifest[key] for key in ("recipe", "source", "split", "subset", "output", "format")} == {
        "recipe": "tulu3",
        "source": str(source),
        "split": "train",
        "subset": None,
        "output": "train.jsonl",
        "format": "messages",
    }
    assert manifest["created_at"].endswith("+00:00")


def openr1_row(
    uuid: str, problem: str, generations: list[str], verify: list[bool], **more: Any
) -> dict[str, Any]:
    return {
        "problem": problem,
        "solution": "reference solution",
        "answer": "4",
        "problem_type": "Algebra",
        "question_type": "math-word-problem",
        "source": "olympiads",
        "uuid": uuid,
        "is_reasoning_complete": [True] * len(generations),
        "generations": generations,
        "correctness_math_verify": verify,
        "correctness_llama": None,
        "finish_reasons": None,
        "correctness_count": sum(verify),
        "messages": [turn("user", problem), turn("assistant", "reference solution")],
        **more,
    }


OPENR1_ROWS = [
    openr1_row("u1", "2+2?", ["<think>5</think> 5", "<think>4</think> \\boxed{4}"], [False, True]),
    # Math-Verify could not parse it; the Llama judge says the first one is right.
    openr1_row(
        "u2",
        "x?",
        ["<think>a</think> a", "<think>b</think> b"],
        [False, False],
        correctness_llama=[True, False],
    ),
    openr1_row("u3", "y?", ["wrong", "also wrong"], [False, False], correctness_llama=[False, False]),
    # The correct trace ran out of tokens: not a trace to learn from.
    openr1_row("u4", "z?", ["<think>cut", "wrong"], [True, False], is_reasoning_complete=[False, True]),
    openr1_row("u5", " ", ["<think>4</think> 4"], [True]),
    # Flag lists shorter than the generations: the unmarked ones count as not correct.
    openr1_row(
        "u6", "w?", ["<think>no</think>", "<think>yes</think> yes"], [False], correctness_llama=[False, True]
    ),
    # No completeness flags for this row: unknown, so not held against the trace.
    openr1_row("u7", "v?", ["<think>ok</think> ok"], [True], is_reasoning_complete=None),
]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_openr1_math(tmp_path: Path, suffix: str) -> None:
    source = write(tmp_path / f"openr1{suffix}", OPENR1_ROWS, OPENR1)
    manifest = prepare("openr1_math", str(source), tmp_path / "out", subset=None)

    def pair(ident: str, problem: str, answer: str) -> dict[str, Any]:
        return {
            "id": ident,
            "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}],
        }

    assert lines(tmp_path / "out" / "train.jsonl") == [
        pair("u1", "2+2?", "<think>4</think> \\boxed{4}"),
        pair("u2", "x?", "<think>a</think> a"),
        pair("u6", "w?", "<think>yes</think> yes"),
        pair("u7", "v?", "<think>ok</think> ok"),
    ]
    assert (manifest["rows_read"], manifest["rows_written"]) == (7, 4)
    assert manifest["rows_dropped"] == {
        "empty_problem": 1,
        "no_correct_generation": 1,
        "no_complete_correct_generation": 1,
    }


def cf_row(ident: str, generation: str | None, finish: str | None = "stop", **more: Any) -> dict[str, Any]:
    return {
        "id": ident,
        "aliases": [ident],
        "contest_id": ident.split("/")[0],
        "contest_name": "Codeforces Round",
        "contest_type": "CF",
        "contest_start": 1700000000,
        "contest_start_year": 2023,
        "index": ident.split("/")[1],
        "time_limit": 1.0,
        "memory_limit": 256,
        "title": "Sum",
        "description": "Given $$$a$$$ and $$$b$$$, print $$$a+b$$$.",
        "input_format": "Two integers.\n",
        "output_format": "One integer.",
        "examples": [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}],
        "note": None,
        "editorial": "Add them.",
        "prompt": "You will be given a competitive programming problem. ...",
        "generation": generation,
        "finish_reason": finish,
        "api_metadata": {
            "completion_tokens": 10,
            "prompt_tokens": 5,
            "prompt_tokens_details": None,
            "total_tokens": 15,
        },
        "messages": [turn("user", "You will be given ..."), turn("assistant", generation)],
        **more,
    }


CF_STATEMENT = """# Sum

Time limit per test: 1 second
Memory limit per test: 256 megabytes

Given $$$a$$$ and $$$b$$$, print $$$a+b$$$.

## Input Format

Two integers.

## Output Format

One integer.

## Examples

```input
1 2
```

```output
3
```

```input
5 5
```

```output
10
```"""

CF_ROWS = [
    cf_row("1/A", "<think>add</think>\n```cpp\nint main(){}\n```"),
    cf_row("1/A", "<think>cut", finish="length"),
    cf_row("1/A", "<think>again</think> code"),
    cf_row("2/B", "", title="Empty"),
    cf_row("3/C", "<think>?</think>", description=None),
    cf_row(
        "4/D",
        "solution",
        title="Guess",
        time_limit=2.5,
        memory_limit=512,
        input_format=None,
        output_format=None,
        examples=None,
        interaction_format="Ask at most 20 queries.",
        note="Interactive.",
    ),
]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_codeforces(tmp_path: Path, suffix: str) -> None:
    schema = CODEFORCES_COTS.append(pa.field("interaction_format", pa.string()))  # only some subsets have it
    source = write(tmp_path / f"solutions{suffix}", CF_ROWS, schema)
    manifest = prepare("codeforces", str(source), tmp_path / "out")
    assert lines(tmp_path / "out" / "train.jsonl") == [
        {
            "id": "1/A#1",
            "prompt": CF_STATEMENT,
            "completion": "<think>add</think>\n```cpp\nint main(){}\n```",
        },
        {"id": "1/A#2", "prompt": CF_STATEMENT, "completion": "<think>again</think> code"},
        {
            "id": "4/D#1",
            "prompt": "# Guess\n\nTime limit per test: 2.5 seconds\nMemory limit per test: 512 megabytes\n\n"
            "Given $$$a$$$ and $$$b$$$, print $$$a+b$$$.\n\n## Interaction Format\n\nAsk at most 20 queries."
            "\n\n## Note\n\nInteractive.",
            "completion": "solution",
        },
    ]
    assert (manifest["rows_read"], manifest["rows_written"], manifest["format"]) == (
        6,
        3,
        "prompt_completion",
    )
    assert manifest["rows_dropped"] == {"no_statement": 1, "no_generation": 1, "unfinished_generation": 1}


def test_codeforces_on_the_problems_only_dataset_says_where_completions_are(tmp_path: Path) -> None:
    problems = CODEFORCES_COTS.remove(CODEFORCES_COTS.get_field_index("generation"))
    source = write(tmp_path / "codeforces.parquet", CF_ROWS[:1], problems)
    with pytest.raises(DataError) as caught:
        prepare("codeforces", str(source), tmp_path / "out")
    assert str(caught.value) == (
        f"{source}: no column 'generation'; recipe 'codeforces' reads open-r1/codeforces-cots (a solutions* subset)"
        " (columns id, description, generation); open-r1/codeforces has problem statements, editorials and tests"
        " but no solutions: use open-r1/codeforces-cots with a solutions subset, e.g. --subset solutions_decontaminated"
    )


def test_output_is_deterministic_and_rerun_overwrites_atomically(tmp_path: Path) -> None:
    parquet = write(tmp_path / "tulu.parquet", TULU3_ROWS, TULU3)
    jsonl = write(tmp_path / "tulu.jsonl", TULU3_ROWS, TULU3)
    first = prepare("tulu3", str(parquet), tmp_path / "a")
    again = prepare("tulu3", str(parquet), tmp_path / "a")
    other = prepare("tulu3", str(jsonl), tmp_path / "b")
    assert first["sha256"] == again["sha256"] == other["sha256"]
    assert (tmp_path / "a" / "train.jsonl").read_bytes() == (tmp_path / "b" / "train.jsonl").read_bytes()
    limited = prepare("tulu3", str(parquet), tmp_path / "a", limit=1)
    assert (limited["rows_read"], limited["rows_written"], limited["limit"]) == (1, 1, 1)
    assert (
        lines(tmp_path / "a" / "train.jsonl")[0]["id"] == "oasst1_1"
        and len(lines(tmp_path / "a" / "train.jsonl")) == 1
    )
    assert sorted(path.name for path in (tmp_path / "a").iterdir()) == [
        "manifest.json",
        "train.jsonl",
    ]  # no temp files


@pytest.mark.parametrize(
    ("recipe", "rows", "said"),
    [
        (
            "tulu3",
            [*TULU3_ROWS[:2], {"id": "x", "messages": "hello", "source": "s"}],
            ":3: row 2: field 'messages': expected a list of objects, got a string",
        ),
        (
            "tulu3",
            [TULU3_ROWS[0], {"id": 7, "messages": []}],
            ":2: row 1: field 'id': expected a string, got a number",
        ),
        (
            "tulu3",
            [{"id": "x", "messages": [{"role": "user", "content": ["a"]}], "source": "s"}],
            ":1: row 0: field 'messages[0].content': expected a string, got a list",
        ),
        (
            "openr1_math",
            [OPENR1_ROWS[0], {**OPENR1_ROWS[1], "correctness_math_verify": ["yes", False]}],
            ":2: row 1: field 'correctness_math_verify[0]': expected a boolean, got a string",
        ),
        (
            "codeforces",
            [CF_ROWS[0], {**CF_ROWS[0], "examples": "1 2 -> 3"}],
            ":2: row 1: field 'examples': expected a list of objects, got a string",
        ),
        (
            "codeforces",
            [{**CF_ROWS[0], "time_limit": "1 second"}],
            ":1: row 0: field 'time_limit': expected a number, got a string",
        ),
    ],
)
def test_malformed_jsonl_row_names_file_line_row_and_field(
    tmp_path: Path, recipe: str, rows: list[dict[str, Any]], said: str
) -> None:
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.jsonl").write_text("previous\n")
    with pytest.raises(DataError) as caught:
        prepare(recipe, str(source), tmp_path / "out")
    assert str(caught.value) == f"{source}{said}"
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["train.jsonl"]
    assert (tmp_path / "out" / "train.jsonl").read_text() == "previous\n"  # untouched


def test_malformed_parquet_column_names_source_row_and_field(tmp_path: Path) -> None:
    wrong = OPENR1.set(OPENR1.get_field_index("generations"), pa.field("generations", pa.string()))
    source = write(tmp_path / "openr1.parquet", [{**OPENR1_ROWS[0], "generations": "one trace"}], wrong)
    with pytest.raises(DataError) as caught:
        prepare("openr1_math", str(source), tmp_path / "out")
    assert (
        str(caught.value) == f"{source}: row 0: field 'generations': expected a list of strings, got a string"
    )


def test_unknown_recipe_missing_column_and_bad_limit(tmp_path: Path) -> None:
    source = write(tmp_path / "tulu.parquet", TULU3_ROWS, TULU3)
    with pytest.raises(
        DataError, match=r"^recipe 'alpaca': unknown \(known: tulu3, openr1_math, codeforces\)$"
    ):
        prepare("alpaca", str(source), tmp_path / "out")
    with pytest.raises(
        DataError, match=r"tulu\.parquet: no column 'problem', 'generations', 'correctness_math_verify'; "
    ):
        prepare("openr1_math", str(source), tmp_path / "out")
    with pytest.raises(DataError, match=r"^limit: must be at least 1, got 0$"):
        prepare("tulu3", str(source), tmp_path / "out", limit=0)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dist_bench", "data", "prepare", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_prepare_writes_files_and_reports_one_line(tmp_path: Path) -> None:
    source = write(tmp_path / "tulu.parquet", TULU3_ROWS, TULU3)
    done = run_cli("--recipe", "tulu3", "--source", str(source), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"tulu3: 2 of 6 rows written to {tmp_path / 'out' / 'train.jsonl'} "
        "(dropped: unknown_role 1, empty_content 2, no_assistant_turn 1)\n"
    )
    assert len(lines(tmp_path / "out" / "train.jsonl")) == 2
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["rows_written"] == 2

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(TULU3_ROWS[0]) + "\n" + '{"id": "x", "messages": "hello", "source": "s"}\n')
    failed = run_cli("--recipe", "tulu3", "--source", str(bad), "--out", str(tmp_path / "out2"))
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"dist-bench: error: {bad}:2: row 1: field 'messages': expected a list of objects, got a string"
    ]
