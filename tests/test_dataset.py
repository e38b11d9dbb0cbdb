"""Training data: supervised positions line up with the completion, bad records name file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_bench.config import DataConfig
from dist_bench.dataset import DataError, collate, encode, load_examples, read_records
from dist_bench.tinyworld.tokenizer import build_tokenizer


def write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_targets_are_the_completion_and_eos(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    data = write(
        tmp_path / "d.jsonl",
        [{"prompt": "Q: 1+1?", "completion": " 2"}, {"prompt": "Hi", "completion": " yo"}],
    )
    examples = load_examples(DataConfig(train=str(data)), tokenizer)
    batch = collate(examples, [0, 1], tokenizer.pad_token_id)
    # Row 0: targets are " ", "2", EOS; predicted from the positions just before them.
    assert tokenizer.decode(batch.targets[:3]) == " 2" + tokenizer.eos_token
    assert batch.predict_mask[0].nonzero().flatten().tolist() == [6, 7, 8]
    assert batch.tokens == 10 + 6 and batch.padded_tokens == 2 * 10
    assert batch.supervised_tokens == 3 + 4


def test_supervise_all_and_truncation(tmp_path: Path) -> None:
    tokenizer = build_tokenizer()
    data = write(tmp_path / "d.jsonl", [{"prompt": "abcdef", "completion": "ghij"}])
    examples = load_examples(DataConfig(train=str(data), supervise="all", max_length=8), tokenizer)
    assert len(examples[0].input_ids) == 8
    assert examples[0].supervised == [False] + [True] * 7
    assert examples[0].labels == [-100, *examples[0].input_ids[1:]] and examples[0].supervised_tokens == 7


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["{not json"], r"d\.jsonl:1: not valid JSON"),
        (
            [{"prompt": "a", "completion": "b"}, {"prompt": "a"}],
            r"d\.jsonl:2: row 1: field 'completion' missing or not a string$",
        ),
        (
            [{"prompt": "a", "completion": "b"}, "", {"prompt": 7, "completion": "b"}],
            r"d\.jsonl:3: field 'prompt': a number here, a string on .*d\.jsonl:1 ",
        ),
        ([{"question": "a", "answer": "b"}], r"d\.jsonl:1: row 0: field 'prompt' missing \(the data has"),
        ([], r"d\.jsonl: no records"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path: Path, rows: list[object], message: str) -> None:
    data = write(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError, match=message):
        load_examples(DataConfig(train=str(data)), build_tokenizer())


def test_prompt_longer_than_max_length_is_an_error(tmp_path: Path) -> None:
    data = write(tmp_path / "d.jsonl", [{"prompt": "x" * 50, "completion": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: row 0: prompt fills data.max_length=8"):
        load_examples(DataConfig(train=str(data), max_length=8), build_tokenizer())


def test_pairs_tokenized_in_batches_are_the_pairs_tokenized_one_by_one(tmp_path: Path) -> None:
    """load_examples tokenizes READ_BATCH prompts and completions per call; the ids must be each text's own."""
    tokenizer = build_tokenizer()
    rows = [{"prompt": f"Q{i}: " + "ab " * (i % 5), "completion": f" {i}" * (1 + i % 3)} for i in range(2500)]
    cfg = DataConfig(train=str(write(tmp_path / "d.jsonl", rows)), max_length=26)  # some cut, none empty
    batched = load_examples(cfg, tokenizer)
    one_by_one = [encode(record, tokenizer, cfg) for record in read_records(cfg)]
    assert len(batched) == 2500 and batched == one_by_one
