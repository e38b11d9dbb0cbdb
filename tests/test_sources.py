"""Data sources: every supported place loads through `datasets`; every bad one is one line naming it."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_bench.data.sources import load_rows, open_source
from dist_bench.errors import DataError

ROWS = [{"text": "alpha", "n": 1}, {"text": "beta", "n": 2}, {"text": "gamma", "n": 3}]


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in lines))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_arrow(path: Path, rows: list[dict], *, stream: bool) -> Path:
    table = pa.Table.from_pylist(rows)
    opener = pa.ipc.new_stream if stream else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, opener(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def data_error(source: str, **kwargs: object) -> str:
    with pytest.raises(DataError) as caught:
        load_rows(source, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_jsonl_json_parquet_and_arrow_files_load(tmp_path: Path) -> None:
    sources = [
        write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], "", ROWS[1], "  ", ROWS[2]]),  # blank lines skipped
        tmp_path / "rows.json",
        write_parquet(tmp_path / "rows.parquet", ROWS),
        write_arrow(tmp_path / "stream.arrow", ROWS, stream=True),  # what save_to_disk writes
        write_arrow(tmp_path / "file.arrow", ROWS, stream=False),  # Arrow IPC file (Feather v2)
    ]
    (tmp_path / "rows.json").write_text(json.dumps(ROWS))
    for source in sources:
        rows = load_rows(str(source))
        assert isinstance(rows, datasets.Dataset)
        assert rows.to_list() == ROWS, source


def test_folder_of_files_loads_in_name_order(tmp_path: Path) -> None:
    write_parquet(tmp_path / "shards" / "part-b.parquet", ROWS[2:])
    write_parquet(tmp_path / "shards" / "part-a.parquet", ROWS[:2])
    write_parquet(tmp_path / "shards" / ".hidden" / "part-c.parquet", ROWS)  # skipped
    assert load_rows(str(tmp_path / "shards")).to_list() == ROWS


def test_folder_laid_out_in_splits_gives_only_the_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "snap" / "data" / "train-00000-of-00002.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "snap" / "data" / "train-00001-of-00002.jsonl", ROWS[1:2])
    write_jsonl(tmp_path / "snap" / "data" / "test-00000-of-00001.jsonl", ROWS[2:])
    assert load_rows(str(tmp_path / "snap")).to_list() == ROWS[:2]
    assert load_rows(str(tmp_path / "snap"), split="test").to_list() == ROWS[2:]
    message = data_error(str(tmp_path / "snap"), split="validation")
    assert message == f"{tmp_path / 'snap'}: split 'validation' not found (has: test, train)"


SNAPSHOT_CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
- config_name: extended
  data_files:
  - split: train
    path: extended/train-*
---
# A dataset card, as downloaded with the snapshot
"""


def test_hub_snapshot_folder_with_subset_reads_the_cards_configs(tmp_path: Path) -> None:
    write_parquet(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet", ROWS[:1])
    write_parquet(tmp_path / "snap" / "extended" / "train-00000-of-00001.parquet", ROWS[1:])
    (tmp_path / "snap" / "README.md").write_text(SNAPSHOT_CARD)
    assert load_rows(str(tmp_path / "snap"), subset="extended").to_list() == ROWS[1:]
    assert load_rows(str(tmp_path / "snap"), subset="default").to_list() == ROWS[:1]
    message = data_error(str(tmp_path / "snap"), subset="all")
    assert message.startswith(f"{tmp_path / 'snap'}: cannot be loaded as a Hub snapshot (")


def test_save_to_disk_dataset_and_datasetdict(tmp_path: Path) -> None:
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert load_rows(str(tmp_path / "saved")).to_list() == ROWS
    both = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    )
    both.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict")).to_list() == ROWS[:2]
    assert load_rows(str(tmp_path / "dict"), split="test").to_list() == ROWS[2:]
    message = data_error(str(tmp_path / "dict"), split="dev")
    assert message == f"{tmp_path / 'dict'}: split 'dev' not found (has: test, train)"


@pytest.mark.parametrize(
    ("lines", "said"),
    [
        ([ROWS[0], '{"text": "beta", "n": 2'], ":2: not valid JSON (Expecting ',' delimiter at column 24)"),
        ([ROWS[0], "", "[1, 2]"], ":3: not a JSON object (a JSON list)"),
        ([], ": no records"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, lines: list[object], said: str) -> None:
    write_jsonl(tmp_path / "rows.jsonl", lines)
    assert data_error(str(tmp_path / "rows.jsonl")) == f"{tmp_path / 'rows.jsonl'}{said}"


def test_field_that_changes_type_names_both_lines(tmp_path: Path) -> None:
    # Valid JSON on every line, but Arrow keeps one type per column: its own error names no line.
    write_jsonl(tmp_path / "d" / "a.jsonl", [ROWS[0], {"text": None, "n": 2}])
    write_jsonl(tmp_path / "d" / "b.jsonl", ["", {"text": ["gamma"], "n": 3.5}])
    assert data_error(str(tmp_path / "d")) == (
        f"{tmp_path / 'd' / 'b.jsonl'}:2: field 'text': a list here, a string on {tmp_path / 'd' / 'a.jsonl'}:1 "
        "(a field keeps one type on every line)"
    )


def test_bad_utf8_names_file_line_and_byte(tmp_path: Path) -> None:
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    message = data_error(str(tmp_path / "rows.jsonl"))
    assert message == f"{tmp_path / 'rows.jsonl'}:2: not valid UTF-8 (byte 0xff at column 11)"


def test_bad_line_in_a_folder_names_that_file(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", ROWS)
    write_jsonl(tmp_path / "d" / "b.jsonl", [ROWS[0], "{oops"])
    assert data_error(str(tmp_path / "d")).startswith(f"{tmp_path / 'd' / 'b.jsonl'}:2: not valid JSON")


def test_missing_unknown_empty_and_mixed_sources(tmp_path: Path) -> None:
    assert (
        data_error(str(tmp_path / "nope.jsonl"))
        == f"{tmp_path / 'nope.jsonl'}: not found (no such file or folder)"
    )
    (tmp_path / "rows.csv").write_text("text,n\nalpha,1\n")
    message = data_error(str(tmp_path / "rows.csv"))
    assert (
        message
        == f"{tmp_path / 'rows.csv'}: unknown file kind '.csv' (expected .jsonl, .json, .parquet, .arrow)"
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not data")
    assert (
        data_error(str(tmp_path / "empty"))
        == f"{tmp_path / 'empty'}: folder has no .jsonl, .json, .parquet, .arrow files"
    )
    write_jsonl(tmp_path / "mixed" / "a.jsonl", ROWS)
    write_parquet(tmp_path / "mixed" / "b.parquet", ROWS)
    assert data_error(str(tmp_path / "mixed")) == (
        f"{tmp_path / 'mixed'}: folder mixes file kinds (jsonl, parquet); keep one kind per folder"
    )
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert data_error(str(tmp_path / "broken.parquet")).startswith(
        f"{tmp_path / 'broken.parquet'}: cannot be read as parquet ("
    )
    message = data_error(str(tmp_path / "rows.csv"), subset="default")
    assert message.startswith(
        f"{tmp_path / 'rows.csv'}: subset 'default' needs a Hub id or a Hub snapshot folder"
    )


@pytest.mark.skipif(
    not datasets.config.HF_HUB_OFFLINE, reason="needs HF_HUB_OFFLINE=1 (tests/conftest.py sets it)"
)
def test_hub_id_offline_and_not_cached_is_one_clean_line() -> None:
    message = data_error("dist-bench-test/surely-not-cached-anywhere", subset="default")
    assert message.startswith(
        "dist-bench-test/surely-not-cached-anywhere: not a local path, nor loadable from the Hub (ConnectionError: "
    )


def test_where_maps_rows_to_file_and_line(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d" / "a.jsonl", [ROWS[0], "", ROWS[1]])
    write_jsonl(tmp_path / "d" / "b.jsonl", ["", ROWS[2]])
    source = open_source(str(tmp_path / "d"))
    assert [source.where(i) for i in range(3)] == [
        f"{tmp_path / 'd' / 'a.jsonl'}:1: row 0",
        f"{tmp_path / 'd' / 'a.jsonl'}:3: row 1",
        f"{tmp_path / 'd' / 'b.jsonl'}:2: row 2",
    ]
    write_parquet(tmp_path / "p" / "a.parquet", ROWS[:2])
    write_parquet(tmp_path / "p" / "b.parquet", ROWS[2:])
    assert (
        open_source(str(tmp_path / "p")).where(2)
        == f"{tmp_path / 'p'}: row 2 ({tmp_path / 'p' / 'b.parquet'} row 0)"
    )
    assert open_source(str(tmp_path / "p" / "a.parquet")).where(1) == f"{tmp_path / 'p' / 'a.parquet'}: row 1"
