"""Recipes: a public SFT/distillation dataset, in its real schema, -> the project's JSON-lines + a manifest.

    prepare("tulu3", "allenai/tulu-3-sft-mixture", Path("data/tulu3"))
    -> data/tulu3/train.jsonl (one example a line) and data/tulu3/manifest.json

Each recipe names the Hub dataset and the columns it was written for (its docstring says where that
schema was confirmed) and reads them from wherever `sources.open_source` finds them: the Hub id itself, a
downloaded snapshot folder, or single Parquet/JSON-lines/Arrow files.

Rows are kept or dropped, and every drop is counted by reason in the manifest. The rule that decides
between a drop and an error: a null or empty value is absent data (a drop, where a reason fits); a value
of the wrong type (a number where text belongs, a string where a list belongs) is a malformed source, and
stops the run with one DataError line naming the source, the row index (and file:line for JSON-lines) and
the field. Nothing is written then: the previous output, if any, stays as it was.

Output is deterministic (rows in source order, keys in a fixed order, UTF-8, `\\n` line ends) so the same
input gives a byte-identical file, whose sha256 the manifest records. Files are written to a temporary
name and renamed over the old ones (os.replace), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from dist_bench.data.sources import Row, open_source
from dist_bench.errors import DataError

Converted = dict[str, Any] | str  # an output row, or the reason the row is dropped


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str  # the Hub dataset (and subset) the recipe is written for
    # "messages": {"id", "messages": [{"role", "content"}...], ...}; "prompt_completion": {"id", "prompt", "completion"}
    format: str
    required: tuple[str, ...]  # columns that must exist
    optional: tuple[str, ...]  # columns read when present
    reasons: tuple[str, ...]  # every drop reason, so the manifest lists zeros too
    convert: Callable[[Row, dict[str, Any]], Converted]  # (row, per-run state) -> output row or drop reason
    hints: tuple[tuple[str, str], ...] = ()  # (column, what to say when it is missing)


def prepare(
    recipe: str,
    source: str,
    out: Path,
    *,
    split: str = "train",
    subset: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Convert `source` with `recipe` into `out/<split>.jsonl` and `out/manifest.json`; return the manifest.

    `limit`: read only the first N source rows (a quick look at a large dataset). Raises DataError.
    """
    chosen = RECIPES.get(recipe)
    if chosen is None:
        raise DataError(f"recipe '{recipe}': unknown (known: {', '.join(RECIPES)})")
    if limit is not None and limit < 1:
        raise DataError(f"limit: must be at least 1, got {limit}")
    opened = open_source(source, split=split, subset=subset)
    columns = opened.rows.column_names
    missing = [name for name in chosen.required if name not in columns]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(repr(name) for name in missing)}; recipe '{recipe}' reads "
            f"{chosen.dataset} (columns {', '.join(chosen.required)})"
            + "".join(f"; {said}" for column, said in chosen.hints if column in missing)
        )
    rows = opened.rows.select_columns([c for c in (*chosen.required, *chosen.optional) if c in columns])
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission
        raise DataError(f"{out}: cannot be the output folder ({err.strerror or err})") from None
    target = out / (re.sub(r"[^\w.-]+", "_", split) + ".jsonl")  # "train[:100]" is a valid Hub split

    dropped = dict.fromkeys(chosen.reasons, 0)
    written, digest, state = 0, hashlib.sha256(), {}
    with _atomic(target) as handle:
        for index, values in enumerate(rows):
            result = chosen.convert(Row(opened, index, values), state)
            if isinstance(result, str):
                dropped[result] += 1
                continue
            line = (json.dumps(result, ensure_ascii=False) + "\n").encode("utf-8")
            digest.update(line)
            handle.write(line)
            written += 1
    manifest = {
        "recipe": recipe,
        "dataset": chosen.dataset,
        "format": chosen.format,
        "source": source,
        "split": split,
        "subset": subset,
        "limit": limit,
        "output": target.name,
        "rows_read": len(rows),
        "rows_written": written,
        "rows_dropped": dropped,
        "sha256": digest.hexdigest(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with _atomic(out / "manifest.json") as handle:
        handle.write((json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


@contextlib.contextmanager
def _atomic(target: Path) -> Iterator[IO[bytes]]:
    """Write to a temporary file next to `target`, then rename it over `target`; on failure remove it."""
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make the data private to its writer
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(name, target)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


# --- the recipes ---------------------------------------------------------------------------------------

ROLES = ("system", "user", "assistant")


def tulu3(row: Row, state: dict[str, Any]) -> Converted:
    """allenai/tulu-3-sft-mixture -> {"id", "messages": [{"role", "content"}...], "source"}.

    Source schema (default config, split train, Parquet data/train-*, 939,343 rows):
        id: string                                      passed through
        messages: list<struct<content: string, role: string>>
        source: string                                  the sub-dataset the row came from
    Confirmed in the dataset card's `dataset_info.features` (huggingface.co/datasets/allenai/
    tulu-3-sft-mixture, README.md at b14afda); the first upload (690d33d) had no `source` column, so it is
    read when present (null otherwise). Consumers (allenai/open-instruct's sft_tulu_tokenize_and_truncate,
    marin's tokenize_tulu_sft with messages_field="messages") read role/content turns the same way.

    Dropped, by the first failing check in this order: `unknown_role` (a role outside system/user/
    assistant, or null), `empty_content` (a turn whose content is empty, blank or null),
    `no_assistant_turn` (nothing to learn from; an empty or null messages list lands here).
    """
    ident = row.text("id")
    turns = row.records("messages", ("role", "content"))
    if any(turn.get("role") not in ROLES for turn in turns):
        return "unknown_role"
    if any(not (turn.get("content") or "").strip() for turn in turns):
        return "empty_content"
    if not any(turn["role"] == "assistant" for turn in turns):
        return "no_assistant_turn"
    messages = [{"role": turn["role"], "content": turn["content"]} for turn in turns]
    return {"id": ident, "messages": messages, "source": row.text("source", nullable=True)}


def openr1_math(row: Row, state: dict[str, Any]) -> Converted:
    """open-r1/OpenR1-Math-220k -> {"id", "messages": [{"role": "user", "content": problem},
    {"role": "assistant", "content": <the first generation marked correct>}]}.

    Source schema (subset "default", 93,733 rows, split train; "extended" has 131k more), Parquet:
        uuid: string                               -> "id" (null: "openr1_math-<row index>")
        problem: string                            -> the user turn
        generations: list<string>                  2-4 DeepSeek-R1 traces ("<think>...</think> answer")
        correctness_math_verify: list<bool>        per generation: Math-Verify found its answer correct
        correctness_llama: list<bool>              per generation: Llama-3.3-70B-Instruct judged it correct;
                                                   null where the judge was not run
        is_reasoning_complete: list<bool>          per generation: the trace ran to its end
        also, not read: solution, answer, problem_type, question_type, source, finish_reasons: list<string>,
        correctness_count: int64, messages: list<struct<content, role>>
    Confirmed in the dataset card's `dataset_info` (huggingface.co/datasets/open-r1/OpenR1-Math-220k,
    README.md at 075afe0) and its text ("verified using Math Verify for most samples and
    Llama-3.3-70B-Instruct as a judge for 12% of the samples"); huggingface/open-r1's recipes read the
    `problem` column (dataset_prompt_column: problem); public consumers treat generations and the three
    flag lists as parallel arrays and guard against unequal lengths, so an index past a list's end is
    "not marked" here.

    A generation is correct when either judge marks it True; of those the first that is also complete
    (is_reasoning_complete True, or that list absent/null) and non-blank is taken, in generation order.
    Dropped: `empty_problem`, `no_correct_generation`, `no_complete_correct_generation` (correct ones are
    all truncated: training on a cut-off trace teaches the student to stop mid-thought).
    """
    ident = row.text("uuid", nullable=True) or f"openr1_math-{row.index}"
    problem = row.text("problem", nullable=True)
    generations = row.items("generations", str)
    verified = row.items("correctness_math_verify", bool)
    judged = row.items("correctness_llama", bool)
    # An absent column or a null list: completeness unknown, so not held against a trace.
    complete = (
        row.items("is_reasoning_complete", bool)
        if row.values.get("is_reasoning_complete") is not None
        else None
    )
    if not (problem or "").strip():
        return "empty_problem"
    correct = [
        at
        for at, text in enumerate(generations)
        if (text or "").strip() and (_marked(verified, at) or _marked(judged, at))
    ]
    if not correct:
        return "no_correct_generation"
    usable = [at for at in correct if complete is None or _marked(complete, at)]
    if not usable:
        return "no_complete_correct_generation"
    answer = generations[usable[0]]
    return {
        "id": ident,
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": answer}],
    }


def codeforces(row: Row, state: dict[str, Any]) -> Converted:
    """open-r1/codeforces-cots (a `solutions*` subset) -> {"id", "prompt", "completion"}.

    The prompt is the full problem statement built from its parts (title, limits, description, input/
    output/interaction format, examples, note: each where present); the completion is DeepSeek-R1's
    generation (reasoning + code). The output is the prompt/completion format data.train reads directly.

    Source schema (subsets solutions, solutions_decontaminated, solutions_w_editorials[_decontaminated],
    and their `_py` Python versions; the others are C++; split train; Parquet <subset>/train-*):
        id: string                       the problem; repeated for each of its up to 4 traces, so the
                                         output id is "<id>#<n>" (n-th written trace of that problem)
        title, description, input_format, output_format, note: string (nullable)
        interaction_format: string       (interactive problems; not in every subset)
        examples: list<struct<input: string, output: string>> (nullable)
        time_limit: float64 (seconds), memory_limit: float64 or int64 (megabytes)
        generation: string               R1's answer; finish_reason: string ("stop", or "length" if cut)
        also, not read: aliases, contest_*, index, editorial, prompt (the statement wrapped in R1's
        language/format instructions), api_metadata, messages (prompt + generation)
    Confirmed in the dataset card's `dataset_info` (huggingface.co/datasets/open-r1/codeforces-cots,
    README.md) and text ("Each subset contains a `messages` column, so can be used directly for SFT";
    "We did not filter the traces for correctness"); huggingface/open-r1 trains OlympicCoder on
    open-r1/codeforces-cots, config solutions_decontaminated (recipes/OlympicCoder-7B/sft/
    config_v00.00.yaml).

    open-r1/codeforces itself (card's dataset_info: id, aliases, contest_*, index, limits, title,
    description, input/output/interaction_format, note, examples, editorial, rating, tags, official_tests,
    input_mode, generated_checker, executable, ...) has statements, editorials (about 60% of problems) and
    tests but no solutions, hence no completion: without a `generation` column the recipe stops and says so.

    Dropped: `no_statement` (description null or blank), `no_generation` (generation null or blank),
    `unfinished_generation` (finish_reason other than "stop": cut off at the token limit).
    """
    ident = row.text("id")
    statement = _statement(row)
    generation = row.text("generation", nullable=True)
    finish = row.text("finish_reason", nullable=True)
    if statement is None:
        return "no_statement"
    if not (generation or "").strip():
        return "no_generation"
    if finish is not None and finish != "stop":
        return "unfinished_generation"
    state[ident] = state.get(ident, 0) + 1
    return {"id": f"{ident}#{state[ident]}", "prompt": statement, "completion": generation}


def _statement(row: Row) -> str | None:
    """The problem as one Markdown text, or None without a description."""
    description = (row.text("description", nullable=True) or "").strip()
    if not description:
        return None
    parts = []
    title = (row.text("title", nullable=True) or "").strip()
    if title:
        parts.append(f"# {title}")
    limits = [
        f"{label}: {value:g} {unit}{'' if value == 1 else 's'}"
        for label, value, unit in (
            ("Time limit per test", row.number("time_limit"), "second"),
            ("Memory limit per test", row.number("memory_limit"), "megabyte"),
        )
        if value is not None
    ]
    if limits:
        parts.append("\n".join(limits))
    parts.append(description)
    for field, heading in (
        ("input_format", "Input Format"),
        ("output_format", "Output Format"),
        ("interaction_format", "Interaction Format"),
    ):
        text = (row.text(field, nullable=True) or "").strip()
        if text:
            parts.append(f"## {heading}\n\n{text}")
    examples = [
        f"```input\n{(example.get('input') or '').rstrip()}\n```\n\n```output\n{(example.get('output') or '').rstrip()}\n```"
        for example in row.records("examples", ("input", "output"))
    ]
    if examples:
        parts.append("## Examples\n\n" + "\n\n".join(examples))
    note = (row.text("note", nullable=True) or "").strip()
    if note:
        parts.append(f"## Note\n\n{note}")
    return "\n\n".join(parts)


def _marked(flags: list[bool | None], at: int) -> bool:
    return at < len(flags) and flags[at] is True


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="tulu3",
            dataset="allenai/tulu-3-sft-mixture",
            format="messages",
            required=("id", "messages"),
            optional=("source",),
            reasons=("unknown_role", "empty_content", "no_assistant_turn"),
            convert=tulu3,
        ),
        Recipe(
            name="openr1_math",
            dataset="open-r1/OpenR1-Math-220k (subset default)",
            format="messages",
            required=("problem", "generations", "correctness_math_verify"),
            optional=("uuid", "correctness_llama", "is_reasoning_complete"),
            reasons=("empty_problem", "no_correct_generation", "no_complete_correct_generation"),
            convert=openr1_math,
        ),
        Recipe(
            name="codeforces",
            dataset="open-r1/codeforces-cots (a solutions* subset)",
            format="prompt_completion",
            required=("id", "description", "generation"),
            optional=(
                "title",
                "time_limit",
                "memory_limit",
                "input_format",
                "output_format",
                "interaction_format",
                "examples",
                "note",
                "finish_reason",
            ),
            reasons=("no_statement", "no_generation", "unfinished_generation"),
            convert=codeforces,
            hints=(
                (
                    "generation",
                    "open-r1/codeforces has problem statements, editorials and tests but no solutions: use "
                    "open-r1/codeforces-cots with a solutions subset, e.g. --subset solutions_decontaminated",
                ),
            ),
        ),
    )
}
