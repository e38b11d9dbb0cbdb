"""Preference pairs: on hand-made generation rows, exactly the expected samples are chosen and rejected, every
drop is counted under its reason, and read_pairs round-trips TRL's two forms and names bad input's line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from dist_bench.errors import DataError
from dist_bench.generation.pairs import (
    JUDGE_TEMPLATE,
    Pair,
    PairReport,
    judge_pairs,
    judge_question,
    parse_rating,
    read_pairs,
    teacher_vs_student_pairs,
    verified_pairs,
)

CHAT = [{"role": "system", "content": "Answer with one letter."}, {"role": "user", "content": "A, B or C?"}]


def row(
    prompt_id: int,
    sample: int,
    completion: str,
    *,
    reference: str | None = None,
    finish: str = "stop",
    prompt: str | list[dict] | None = None,
) -> dict[str, Any]:
    """A row as the teacher_generation stage writes it (teacher/generation.py `_row`)."""
    return {
        "prompt_id": prompt_id,
        "sample": sample,
        "prompt": f"question {prompt_id}" if prompt is None else prompt,
        "reference": reference,
        "completion": completion,
        "finish_reason": finish,
        "prompt_tokens": 5,
        "completion_tokens": len(completion.split()),
        "teacher": {"model": "t"},
        "decoding": {"temperature": 1.0},
    }


def triples(pairs: list[Pair]) -> list[tuple[int, int | None, int | None]]:
    return [(p.prompt_id, p.chosen_sample, p.rejected_sample) for p in pairs]


VERIFIED_ROWS = [
    # 0, gsm8k: the error row would be the first "incorrect" (no answer) were it not ignored
    row(0, 0, "", reference="#### 42", finish="error"),
    row(0, 1, "6 * 7 = 42 #### 42", reference="#### 42"),
    row(0, 2, "6 * 7 = 41 #### 41", reference="#### 42"),
    row(0, 3, "#### 42.0", reference="#### 42"),
    row(0, 4, "it is 42, I think", reference="#### 42"),  # no answer: incorrect, but sample 2 is first
    # 1: only correct ("7" and "7.0" are one number)
    row(1, 0, "#### 7", reference="#### 7"),
    row(1, 1, "#### 7.0", reference="#### 7"),
    # 2: only wrong, or no answer at all
    row(2, 0, "#### 8", reference="#### 9"),
    row(2, 1, "nine", reference="#### 9", finish="length"),
    # 3: no reference
    row(3, 0, "#### 1"),
    row(3, 1, "#### 2"),
    # 4, boxed: lm-eval's hendrycks_math normalisation makes 0.5 equal 1/2
    row(4, 0, r"so $\boxed{\frac{1}{3}}$", reference=r"half: $\boxed{1/2}$"),
    row(4, 1, r"so $\boxed{0.5}$", reference=r"half: $\boxed{1/2}$"),
    # 5: a gsm8k-looking reference without a number: unreadable
    row(5, 0, "#### 3", reference="#### three"),
    # 6, exact, a chat prompt: whitespace collapsed, case kept
    row(6, 0, "  B ", reference="B", prompt=CHAT),
    row(6, 1, "b", reference="B", prompt=CHAT),
    row(6, 2, "C", reference="B", prompt=CHAT),
    # 7: every sample failed, so none is correct
    row(7, 0, "", reference="#### 1", finish="error"),
]


def test_verified_pairs_choose_the_first_correct_and_the_first_incorrect() -> None:
    # Input order must not matter: reversed rows give the same pairs, in prompt_id order.
    pairs, report = verified_pairs(list(reversed(VERIFIED_ROWS)))
    assert triples(pairs) == [(0, 1, 2), (4, 1, 0), (6, 0, 1)]
    assert [(p.chosen, p.rejected) for p in pairs] == [
        ("6 * 7 = 42 #### 42", "6 * 7 = 41 #### 41"),
        (r"so $\boxed{0.5}$", r"so $\boxed{\frac{1}{3}}$"),
        ("  B ", "b"),
    ]
    assert [p.prompt for p in pairs] == ["question 0", "question 4", CHAT]
    assert report == PairReport(
        prompts_in=8,
        pairs=3,
        dropped={"no_reference": 1, "unreadable_reference": 1, "no_correct": 2, "no_incorrect": 1},
    )
    assert report.metrics() == {
        "preferences/prompts": 8.0,
        "preferences/pairs": 3.0,
        "preferences/dropped/no_reference": 1.0,
        "preferences/dropped/unreadable_reference": 1.0,
        "preferences/dropped/no_correct": 2.0,
        "preferences/dropped/no_incorrect": 1.0,
    }
    assert report.to_json() == {
        "prompts_in": 8,
        "pairs": 3,
        "dropped": {"no_reference": 1, "unreadable_reference": 1, "no_correct": 2, "no_incorrect": 1},
    }
    assert json.loads(json.dumps(report.to_json())) == report.to_json()


def test_a_right_answer_cut_off_by_the_length_limit_is_never_chosen() -> None:
    rows = [
        row(0, 0, "3 + 4 = 7 #### 7 and then", reference="#### 7", finish="length"),
        row(0, 1, "#### 7", reference="#### 7"),
        row(0, 2, "#### 8", reference="#### 7"),
        row(1, 0, "#### 5 cut", reference="#### 5", finish="length"),
        row(1, 1, "#### 6", reference="#### 5"),
    ]
    pairs, report = verified_pairs(rows)
    assert triples(pairs) == [(0, 1, 2)]
    assert report.dropped["no_correct"] == 1


def test_verified_pairs_forced_mode_and_empty_input() -> None:
    # gsm8k forced on a boxed reference: the reference has no "#### n", so it cannot be read.
    pairs, report = verified_pairs([r for r in VERIFIED_ROWS if r["prompt_id"] in (0, 4)], verify="gsm8k")
    assert triples(pairs) == [(0, 1, 2)]
    assert report.dropped == {
        "no_reference": 0,
        "unreadable_reference": 1,
        "no_correct": 0,
        "no_incorrect": 0,
    }
    pairs, report = verified_pairs([])
    assert pairs == []
    assert report.metrics() == {
        "preferences/prompts": 0.0,
        "preferences/pairs": 0.0,
        "preferences/dropped/no_reference": 0.0,
        "preferences/dropped/unreadable_reference": 0.0,
        "preferences/dropped/no_correct": 0.0,
        "preferences/dropped/no_incorrect": 0.0,
    }


def test_verified_pairs_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="verify: 'none' is not one of gsm8k, boxed, exact, auto"):
        verified_pairs(VERIFIED_ROWS, verify="none")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompt 1 sample 0 occurs twice"):
        verified_pairs([*VERIFIED_ROWS, row(1, 0, "#### 7", reference="#### 7")])


def test_teacher_vs_student_pairs() -> None:
    teacher = [
        row(0, 0, "teacher 0"),
        row(0, 1, "teacher 0, second sample"),  # only sample 0 is used
        row(1, 0, "", finish="error"),  # teacher_failed
        row(2, 0, "the same answer"),
        row(3, 0, "teacher 3"),
        row(4, 0, "teacher 4"),  # no student row: missing_student
        row(5, 0, "  \n"),  # blank: teacher_failed
        row(8, 0, "teacher 8", prompt=CHAT),
    ]
    student = [
        row(8, 0, "student 8", prompt=CHAT),
        row(0, 1, "student 0, second sample"),
        row(0, 0, "student 0"),
        row(1, 0, "student 1"),
        row(2, 0, " the same answer\n"),  # identical once stripped
        row(3, 0, "partial", finish="error"),  # student_failed
        row(5, 0, "student 5"),
        row(6, 0, "student 6"),  # a prompt the teacher lacks: not counted
    ]
    pairs, report = teacher_vs_student_pairs(teacher, student)
    assert pairs == [
        Pair(0, "question 0", "teacher 0", "student 0", chosen_sample=0, rejected_sample=0),
        Pair(8, CHAT, "teacher 8", "student 8", chosen_sample=0, rejected_sample=0),
    ]
    assert report == PairReport(
        prompts_in=7,
        pairs=2,
        dropped={"teacher_failed": 2, "missing_student": 1, "student_failed": 1, "identical": 1},
    )
    assert report.metrics()["preferences/dropped/identical"] == 1.0
    assert set(report.metrics()) == {
        "preferences/prompts",
        "preferences/pairs",
        *(f"preferences/dropped/{r}" for r in report.dropped),
    }


def test_teacher_vs_student_refuses_rows_from_different_prompt_sets() -> None:
    with pytest.raises(ValueError, match="prompt_id 0: the teacher's and the student's rows have different"):
        teacher_vs_student_pairs([row(0, 0, "a")], [row(0, 0, "b", prompt="another question")])
    with pytest.raises(ValueError, match="prompt_id 0: the student's rows have no sample 0"):
        teacher_vs_student_pairs([row(0, 0, "a")], [row(0, 1, "b")])


JUDGED_ROWS = [
    # 0: ratings 4, 9, 2, 9 -> the first 9 (sample 1) against the 2 (sample 2)
    row(0, 0, "a"), row(0, 1, "b"), row(0, 2, "c"), row(0, 3, "d"),
    # 1: the best is unrated (no verdict), the error row takes no part: 3 against 1
    row(1, 0, "a"), row(1, 1, "b"), row(1, 2, "", finish="error"), row(1, 3, "d"),
    # 2: every rated sample 5: a tie
    row(2, 0, "a"), row(2, 1, "b"),
    # 3: one sample rated, one blank (failed): too few rated
    row(3, 0, "a"), row(3, 1, "   "),
    # 4: messages; two equal lowest, the first is rejected
    row(4, 0, "x", prompt=CHAT), row(4, 1, "y", prompt=CHAT), row(4, 2, "z", prompt=CHAT),
]  # fmt: skip
RATINGS: dict[tuple[int, int], float | None] = {
    (0, 0): 4, (0, 1): 9, (0, 2): 2, (0, 3): 9,
    (1, 0): 3, (1, 1): None, (1, 2): 10, (1, 3): 1,
    (2, 0): 5, (2, 1): 5,
    (3, 0): 7, (3, 1): 9,
    (4, 0): 8.5, (4, 1): 1, (4, 2): 1,
}  # fmt: skip


def test_judge_pairs_take_the_best_rated_against_the_worst() -> None:
    pairs, report = judge_pairs(JUDGED_ROWS, RATINGS)
    assert triples(pairs) == [(0, 1, 2), (1, 0, 3), (4, 0, 1)]
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "c"), ("a", "d"), ("x", "y")]
    assert pairs[2].prompt == CHAT
    assert report.to_json() == {"prompts_in": 5, "pairs": 3, "dropped": {"unrated": 1, "tie": 1}}
    assert report.metrics()["preferences/dropped/tie"] == 1.0


@pytest.mark.parametrize(
    ("verdict", "rating"),
    [
        ("Clear and correct. Rating: [[8]]", 8.0),
        ('The format is "[[rating]]", e.g. "Rating: [[5]]". Mine: Rating: [[3]]', 3.0),  # the last one
        ("Rating: [[7.5]]", 7.5),
        ("Rating: [[0]]", None),  # outside 1..10
        ("Rating: [[11]]", None),
        ("Rating: 8", None),  # not the required format
        ("", None),
    ],
)
def test_parse_rating(verdict: str, rating: float | None) -> None:
    assert parse_rating(verdict) == rating


def test_the_judge_reads_the_question_and_the_answer() -> None:
    assert judge_question("What is 2 + 2?") == "What is 2 + 2?"
    assert judge_question(CHAT) == "system: Answer with one letter.\nuser: A, B or C?"
    text = JUDGE_TEMPLATE.format(question="Q?", answer=" A.")
    assert "[Question]\nQ?\n" in text and "[The Start of Assistant's Answer]\n A.\n[The End" in text
    assert '"Rating: [[5]]"' in text


def test_to_trl_standard_and_conversational() -> None:
    standard = Pair(3, "2+2?", "#### 4", "#### 5", chosen_sample=1, rejected_sample=0)
    assert standard.to_trl() == {"prompt": "2+2?", "chosen": "#### 4", "rejected": "#### 5"}
    chat = Pair(4, CHAT, "B", "C", chosen_sample=None, rejected_sample=None)
    trl = chat.to_trl()
    assert trl == {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "B"}],
        "rejected": [{"role": "assistant", "content": "C"}],
    }
    trl["prompt"][0]["content"] = "changed"  # a copy: the pair's prompt is untouched
    assert chat.prompt[0]["content"] == "Answer with one letter."


STANDARD = [
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "", "chosen": "hello", "rejected": "bye"},  # an empty prompt is allowed
]
CONVERSATIONAL = [
    {
        "prompt": CHAT,
        "chosen": [{"role": "assistant", "content": "B"}],
        "rejected": [{"role": "assistant", "content": "C"}],
    },
    {
        # a key only one message has: Arrow gives the others None for it, read_pairs drops those again
        "prompt": [{"role": "user", "content": "hi", "name": "ann"}],
        "chosen": [{"role": "assistant", "content": "hello"}],
        "rejected": [{"role": "assistant", "content": "go away"}],
    },
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_pairs_round_trips_both_forms(tmp_path: Path) -> None:
    assert read_pairs(str(write_jsonl(tmp_path / "standard.jsonl", STANDARD))) == STANDARD
    assert read_pairs(str(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONAL))) == CONVERSATIONAL
    parquet = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(CONVERSATIONAL).to_parquet(str(parquet))
    assert read_pairs(str(parquet)) == CONVERSATIONAL
    # other columns are not kept: the rows are exactly TRL's
    extra = [{**r, "id": i} for i, r in enumerate(STANDARD)]
    assert read_pairs(str(write_jsonl(tmp_path / "extra.jsonl", extra))) == STANDARD


GOOD = {"prompt": "p", "chosen": "c", "rejected": "r"}
GOOD_CHAT = CONVERSATIONAL[0]


@pytest.mark.parametrize(
    ("rows", "line", "field", "says"),
    [
        ([GOOD, {**GOOD, "chosen": 3}], 2, "chosen", "expected a string (the prompt is one), got a number"),
        ([GOOD, {"prompt": "p", "chosen": "c"}], 2, "rejected", "expected a string (the prompt is one), got null"),
        ([GOOD, GOOD_CHAT], 2, "prompt", "expected a string (as in row 0: one form per source), got a list"),
        ([GOOD_CHAT, GOOD], 2, "prompt", "expected a list of messages (as in row 0: one form per source)"),
        ([{**GOOD_CHAT, "chosen": "B"}], 1, "chosen", "expected a list of messages (the prompt is one), got a string"),
        ([{**GOOD, "prompt": 5}], 1, "prompt", "expected a string or a list of messages, got a number"),
        ([GOOD, {**GOOD, "rejected": " \n"}], 2, "rejected", "empty text"),
        ([GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": " "}]}], 2, "chosen", "empty text"),
        ([GOOD_CHAT, {**GOOD_CHAT, "rejected": []}], 2, "rejected", "no messages"),
        ([GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "user"}]}], 2, "prompt[0].content", "got null"),
    ],
)  # fmt: skip
def test_read_pairs_names_file_line_and_field(
    tmp_path: Path, rows: list[dict], line: int, field: str, says: str
) -> None:
    path = write_jsonl(tmp_path / "bad_pairs.jsonl", rows)
    with pytest.raises(DataError) as caught:
        read_pairs(str(path))
    message = str(caught.value)
    assert f"bad_pairs.jsonl:{line}:" in message
    assert f"field '{field}'" in message
    assert says in message
    assert "\n" not in message


def test_read_pairs_parquet_error_names_the_row(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([GOOD, {**GOOD, "chosen": ""}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: field 'chosen': empty text$"):
        read_pairs(str(path))
