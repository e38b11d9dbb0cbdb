"""Preference pairs for DPO-style training, in TRL's preference formats.

    pairs, report = verified_pairs(rows)                           # chosen: right answer, rejected: wrong
    pairs, report = teacher_vs_student_pairs(teacher_rows, student_rows)   # chosen: teacher, rejected: init
    pairs, report = judge_pairs(rows, ratings)                     # chosen: best rated, rejected: worst
    rows = [pair.to_trl() for pair in pairs]
    mlflow.log_metrics(report.metrics())
    rows = read_pairs("data/prefs.jsonl")                          # pairs someone else built, validated

The rows going in are the teacher_generation stage's (teacher/generation.py `_row`): one JSON object per
completion with prompt_id, sample, prompt, reference, completion, finish_reason. Decisions a reader needs:

- verified_pairs verifies exactly as the `verify` filter does (filters.py `_checker`: the same answer
  extraction and equality per mode), so "correct" means the same thing in SFT and preference data. A
  completion with no extractable answer (truncated, empty) counts as incorrect: it is a worse response;
  a right answer cut off by max_new_tokens is never chosen (DPO would learn to stop mid-sentence).
- "First" is the lowest sample index, not the input order, so a resumed stage whose shards were read in
  another order makes the same pairs.
- Rows with finish_reason "error" carry no completion (an API teacher gave up) and are skipped; a prompt
  whose every row failed has no correct sample, and is dropped as "no_correct".
- Every drop reason is reported, zeros included, so a run's metric keys do not depend on its data; the
  reasons of one method sum with `pairs` to `prompts_in`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from dist_bench.data.sources import Row, open_source
from dist_bench.errors import DataError

# Private, but reused on purpose: it is the verify filter's own answer checker, and a second copy here
# could drift from it (filters.py is not ours to change, so no public alias was added there).
from dist_bench.generation.filters import _checker

VerifyMode = Literal["gsm8k", "boxed", "exact", "auto"]
VERIFY_MODES = ("gsm8k", "boxed", "exact", "auto")
VERIFIED_REASONS = ("no_reference", "unreadable_reference", "no_correct", "no_incorrect")
TEACHER_VS_STUDENT_REASONS = ("teacher_failed", "missing_student", "student_failed", "identical")
JUDGE_REASONS = ("unrated", "tie")

# The judge's instructions: MT-Bench's single-answer grading prompt (Zheng et al. 2023, "single-v1"), whose
# "Rating: [[n]]" verdict format judges are commonly tuned to; the request is shown as the judge would read
# a transcript.
JUDGE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant "
    "to the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. Be as objective as possible. After providing your explanation, you must "
    'rate the response on a scale of 1 to 10 by strictly following this format: "[[rating]]", for example: '
    '"Rating: [[5]]".\n\n[Question]\n{question}\n\n[The Start of Assistant\'s Answer]\n{answer}\n'
    "[The End of Assistant's Answer]"
)
_RATING = re.compile(r"\[\[(\d+(?:\.\d+)?)\]\]")
PAIR_FIELDS = ("prompt", "chosen", "rejected")
_MESSAGE_KEYS = ("role", "content")


@dataclass(frozen=True)
class Pair:
    """One preference: for `prompt`, `chosen` is preferred over `rejected` (both plain completion text)."""

    prompt_id: int
    prompt: str | list[dict]  # as in the generation rows: text, or chat messages {"role", "content"}
    chosen: str
    rejected: str
    chosen_sample: int | None  # which sample was chosen (None where not from samples)
    rejected_sample: int | None

    def to_trl(self) -> dict[str, Any]:
        """TRL's standard form for a text prompt; its conversational form (the completions as one
        assistant turn each) for a messages prompt: the form decides whether TRL applies a chat template."""
        if isinstance(self.prompt, str):
            return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}
        return {
            "prompt": [dict(message) for message in self.prompt],  # copies: the pair stays unchanged
            "chosen": [{"role": "assistant", "content": self.chosen}],
            "rejected": [{"role": "assistant", "content": self.rejected}],
        }


@dataclass
class PairReport:
    """How many prompts came in, how many became pairs, and why the others did not."""

    prompts_in: int
    pairs: int
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> prompts; every reason, zeros too

    def metrics(self) -> dict[str, float]:
        out = {"preferences/prompts": float(self.prompts_in), "preferences/pairs": float(self.pairs)}
        out |= {f"preferences/dropped/{reason}": float(count) for reason, count in self.dropped.items()}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"prompts_in": self.prompts_in, "pairs": self.pairs, "dropped": dict(self.dropped)}


def verified_pairs(rows: list[dict], verify: VerifyMode = "auto") -> tuple[list[Pair], PairReport]:
    """Per prompt, chosen = the lowest-sample completion whose answer matches the reference, rejected = the
    lowest-sample one that does not (a wrong answer, or none found). Rows with finish_reason "error" are
    ignored. Drops: "no_reference", "unreadable_reference", "no_correct", "no_incorrect". Output in
    prompt_id order."""
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify: {verify!r} is not one of {', '.join(VERIFY_MODES)}")
    groups = _by_prompt(rows)
    dropped = dict.fromkeys(VERIFIED_REASONS, 0)
    pairs: list[Pair] = []
    for prompt_id, group in sorted(groups.items()):
        reference = group[0]["reference"]  # every sample of a prompt carries the prompt's reference
        if reference is None:
            dropped["no_reference"] += 1
            continue
        extract, equal = _checker(verify, reference)
        expected = extract(reference)
        if expected is None:
            dropped["unreadable_reference"] += 1
            continue
        correct: dict | None = None
        incorrect: dict | None = None
        for row in group:  # sample order: the first of each kind wins
            if row["finish_reason"] == "error":
                continue
            answer = extract(row["completion"])
            if answer is not None and equal(answer, expected):
                # a right answer cut off by max_new_tokens is not one to prefer: DPO would learn the cut
                if correct is None and row["finish_reason"] == "stop":
                    correct = row
            elif incorrect is None:
                incorrect = row
        if correct is None:
            dropped["no_correct"] += 1
        elif incorrect is None:
            dropped["no_incorrect"] += 1
        else:
            pairs.append(_pair(prompt_id, correct, incorrect))
    return pairs, PairReport(len(groups), len(pairs), dropped)


def teacher_vs_student_pairs(
    teacher_rows: list[dict], student_rows: list[dict]
) -> tuple[list[Pair], PairReport]:
    """Per teacher prompt, chosen = the teacher's sample 0, rejected = the policy init's sample 0 for the same
    prompt_id. Drops: "teacher_failed", "student_failed" (finish_reason error, or blank completion),
    "identical" (the same text once stripped), "missing_student" (no student row for the prompt). Output in
    prompt_id order; student prompts the teacher lacks are not counted."""
    teacher, student = _by_prompt(teacher_rows), _by_prompt(student_rows)
    dropped = dict.fromkeys(TEACHER_VS_STUDENT_REASONS, 0)
    pairs: list[Pair] = []
    for prompt_id, group in sorted(teacher.items()):
        chosen = _sample_zero(group, prompt_id, "teacher")
        if _failed(chosen):
            dropped["teacher_failed"] += 1
            continue
        if prompt_id not in student:
            dropped["missing_student"] += 1
            continue
        rejected = _sample_zero(student[prompt_id], prompt_id, "student")
        if rejected["prompt"] != chosen["prompt"]:
            # Pairing is by prompt_id alone: a different prompt means the two ran on different prompt sets,
            # and every pair would compare answers to different questions.
            raise ValueError(
                f"prompt_id {prompt_id}: the teacher's and the student's rows have different prompts "
                "(were both generated from the same prompt set?)"
            )
        if _failed(rejected):
            dropped["student_failed"] += 1
        elif chosen["completion"].strip() == rejected["completion"].strip():
            dropped["identical"] += 1  # no preference to learn, only noise in the DPO loss
        else:
            pairs.append(_pair(prompt_id, chosen, rejected))
    return pairs, PairReport(len(teacher), len(pairs), dropped)


def judge_question(prompt: str | list[dict]) -> str:
    """The request as the judge reads it: a text prompt as it is, a conversation as "role: content" lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{message['role']}: {message['content']}" for message in prompt)


def parse_rating(verdict: str) -> float | None:
    """The judge's rating: the last "[[n]]" in its verdict, if 1 <= n <= 10 (the last: an explanation may
    quote the format before giving its own)."""
    found = _RATING.findall(verdict)
    if not found:
        return None
    rating = float(found[-1])
    return rating if 1 <= rating <= 10 else None


def judge_pairs(
    rows: list[dict], ratings: dict[tuple[int, int], float | None]
) -> tuple[list[Pair], PairReport]:
    """Per prompt, chosen = the best-rated sample, rejected = the worst-rated (the lowest sample index among
    equals). `ratings`: (prompt_id, sample) -> the judge's rating, None where it gave none. Failed or blank
    rows and unrated samples take no part. Drops: "unrated" (fewer than two rated samples), "tie" (every
    rated sample rated the same). Output in prompt_id order."""
    groups = _by_prompt(rows)
    dropped = dict.fromkeys(JUDGE_REASONS, 0)
    pairs: list[Pair] = []
    for prompt_id, group in sorted(groups.items()):
        rated = [
            (rating, row)
            for row in group
            if not _failed(row) and (rating := ratings.get((prompt_id, row["sample"]))) is not None
        ]
        if len(rated) < 2:
            dropped["unrated"] += 1
            continue
        # max/min return the first of equals, and `rated` is in sample order
        best = max(rated, key=lambda item: item[0])
        worst = min(rated, key=lambda item: item[0])
        if best[0] == worst[0]:
            dropped["tie"] += 1
        else:
            pairs.append(_pair(prompt_id, best[1], worst[1]))
    return pairs, PairReport(len(groups), len(pairs), dropped)


def read_pairs(source: str, *, split: str = "train", subset: str | None = None) -> list[dict]:
    """Existing pairs from any source the data layer reads, validated, in TRL form: prompt, chosen and
    rejected all strings (standard) or all lists of {role, content} messages (conversational). Returns
    {"prompt", "chosen", "rejected"} dicts (other columns are not kept). Raises DataError, one line
    naming file:line (or row) and the field."""
    opened = open_source(source, split=split, subset=subset)
    out: list[dict] = []
    first: type | None = None  # the first row's form (str or list) is the whole source's
    for index, values in enumerate(opened.rows):
        row = Row(opened, index, values)
        prompt = values.get("prompt")
        if first is None and isinstance(prompt, str | list):
            first = type(prompt)
        elif first is not None and not isinstance(prompt, first):
            # datasets >= 4 reads a column of mixed JSON types (Json feature), but TRL decides standard vs
            # conversational from one example and would template (or not) every row the same way.
            form = "a string" if first is str else "a list of messages"
            row.fail("prompt", f"{form} (as in row 0: one form per source)", prompt)
        if isinstance(prompt, str):
            out.append({"prompt": prompt} | {name: _text(row, name) for name in ("chosen", "rejected")})
        elif isinstance(prompt, list):
            out.append({name: _messages(row, name) for name in PAIR_FIELDS})
        else:
            row.fail("prompt", "a string or a list of messages", prompt)
    return out


def _text(row: Row, name: str) -> str:
    """A standard-form completion: a string with something in it."""
    value = row.values.get(name)
    if not isinstance(value, str):  # the form is the prompt's: say so, not just 'a string'
        row.fail(name, "a string (the prompt is one)", value)
    if not value.strip():
        _empty(row, name)
    return value


def _messages(row: Row, name: str) -> list[dict]:
    """A conversational field: a non-empty list of messages whose role and content are strings; for
    chosen/rejected the contents must not all be blank."""
    if not isinstance(row.values.get(name), list):  # the form is the prompt's: say so, not just 'a list'
        row.fail(name, "a list of messages (the prompt is one)", row.values.get(name))
    messages = row.records(name, _MESSAGE_KEYS)
    if not messages:
        _empty(row, name, "no messages")
    for at, message in enumerate(messages):
        for key in _MESSAGE_KEYS:
            if message.get(key) is None:
                row.fail(f"{name}[{at}].{key}", "a string", None)
    if name != "prompt" and not any(message["content"].strip() for message in messages):
        _empty(row, name)
    # Arrow stores messages as structs with the union of every message's keys, so a key one message lacks
    # comes back as None; dropping those gives back the messages as written.
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def _empty(row: Row, name: str, what: str = "empty text") -> NoReturn:
    # Row.fail would say "expected ..., got a string": true, but not what is wrong.
    raise DataError(f"{row.source.where(row.index)}: field '{name}': {what}")


def _by_prompt(rows: list[dict]) -> dict[int, list[dict]]:
    """Rows grouped by prompt_id, each group in sample order."""
    groups: defaultdict[int, list[dict]] = defaultdict(list)
    seen: set[tuple[int, int]] = set()
    for row in rows:
        key = (row["prompt_id"], row["sample"])
        if key in seen:  # as in filters.py: shards merged twice; "first sample" would be ambiguous
            raise ValueError(f"prompt {key[0]} sample {key[1]} occurs twice among the rows")
        seen.add(key)
        groups[row["prompt_id"]].append(row)
    return {prompt_id: sorted(group, key=lambda row: row["sample"]) for prompt_id, group in groups.items()}


def _sample_zero(group: list[dict], prompt_id: int, who: str) -> dict:
    if group[0]["sample"] != 0:  # the stage writes samples 0..n-1, failed ones included
        raise ValueError(f"prompt_id {prompt_id}: the {who}'s rows have no sample 0")
    return group[0]


def _failed(row: dict) -> bool:
    return row["finish_reason"] == "error" or not (row["completion"] or "").strip()


def _pair(prompt_id: int, chosen: dict, rejected: dict) -> Pair:
    return Pair(
        prompt_id=prompt_id,
        prompt=chosen["prompt"],
        chosen=chosen["completion"],
        rejected=rejected["completion"],
        chosen_sample=chosen["sample"],
        rejected_sample=rejected["sample"],
    )
