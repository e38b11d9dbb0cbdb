"""Filters over teacher-written completions: which of them the student is trained on.

    kept, report = apply_filters(rows, cfg.generation.filters)
    (run_dir / "generation" / "filter_report.json").write_text(json.dumps(report.to_json(), indent=2))
    mlflow.log_metrics(report.metrics())

The filters run in FiltersConfig's order, each on what the one before kept, and each is reported (a
disabled one too, with seen = kept), so the report's chain reads top to bottom:

    empty -> truncated -> length (min_tokens/max_tokens) -> refusal_patterns -> verify -> dedupe
    -> max_per_prompt

Output rows keep their input order. Decisions a reader needs:

- verify is rejection sampling: a completion is kept only when its final answer equals the reference's.
  A row without a reference (None) or whose reference has no extractable answer is dropped, counted
  apart ("no_reference", "unreadable_reference") from wrong answers, because keeping it would train on
  unverified text in a run that asked for verified text; a large count there means verify is set on a
  source without references (or the wrong mode for it). A completion without an extractable answer
  ("no_answer") fails verification.
- gsm8k answers are read the way lm-eval's gsm8k task scores them ("strict-match": the first
  "#### <number>"), then compared as numbers with commas removed, so "1,234", "1234" and "1234.0" agree.
- boxed answers are read with lm-eval's MATH helpers (last \\boxed{...} with balanced braces, or \\fbox{...})
  and compared after lm-eval's hendrycks_math normalisation (strip_string: \\dfrac -> \\frac, 0.5 ->
  \\frac{1}{2}, spaces, \\left/\\right, units on the right, ...).
- dedupe works within one prompt's completions (the same text for two prompts is fine) and keeps the
  lowest sample index of each group, comparing each completion with the ones already kept.
- lm-eval and datasketch are imported on first use: the pre-flight imports this module for
  `check_filters` and must not pay for them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from dist_bench.config import FiltersConfig

if TYPE_CHECKING:
    from datasketch import MinHash

FIELD = "generation.filters"  # where FiltersConfig sits in the run config; error messages name fields by it

FILTER_ORDER = (
    "failed",
    "empty",
    "truncated",
    "length",
    "refusal_patterns",
    "verify",
    "dedupe",
    "max_per_prompt",
)

# lm-eval's gsm8k task, filter "strict-match" (lm_eval/tasks/gsm8k/gsm8k.yaml, also RegexFilter's default),
# applied with take_first. Kept here as a constant rather than read from the installed YAML at run time:
# the YAML is task configuration, not an API, and its layout may move between lm-eval releases;
# tests/test_filters.py checks this still equals the installed task's pattern.
GSM8K_STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
_GSM8K_ANSWER = re.compile(GSM8K_STRICT_PATTERN)

# MinHash for dedupe=near. 128 permutations (datasketch's default) estimate a Jaccard similarity to about
# ±0.04 (one standard deviation at J = 0.5). Seed and permutation scheme are fixed so the same completions
# give the same survivors on every run and datasketch release (2.0 changed its default scheme once).
MINHASH_PERMUTATIONS = 128
MINHASH_SEED = 1
MINHASH_SCHEME = "affine32"

# A short neutral sentence: a refusal pattern that matches it with zero characters (e.g. "sorry|", "^",
# "x*") can match zero characters in any completion, so it would drop every one.
_NEUTRAL_PROBE = "The answer is 42."

FinishReason = Literal["stop", "length", "error"]  # error: no completion came (an API teacher gave up)
_FINISH_REASONS = ("stop", "length", "error")


@dataclass(frozen=True)
class Generated:
    """One completion the teacher wrote (the teacher_generation stage builds these from its shards)."""

    prompt_id: int  # index of the prompt in the prompt set
    sample: int  # 0..n-1: which of the prompt's n completions
    completion: str
    finish_reason: FinishReason  # "stop": EOS or a stop string; "length": max_new_tokens reached
    completion_tokens: int
    reference: str | None  # the prompt's reference answer text ("#### 42", a solution with \boxed{...})

    def __post_init__(self) -> None:
        # Rows come from shards on disk; a malformed one must stop the stage, not be silently kept
        # (an unknown finish reason would slip past the truncated filter).
        if self.finish_reason not in _FINISH_REASONS:
            raise ValueError(
                f"prompt {self.prompt_id} sample {self.sample}: finish_reason {self.finish_reason!r} "
                f"is not one of {', '.join(_FINISH_REASONS)}"
            )
        if self.prompt_id < 0 or self.sample < 0 or self.completion_tokens < 0:
            raise ValueError(
                f"prompt {self.prompt_id} sample {self.sample}: prompt_id, sample and completion_tokens "
                f"must be >= 0 (completion_tokens={self.completion_tokens})"
            )


@dataclass
class FilterStep:
    """What one filter did: rows it saw, rows it kept, and (where there is more than one) why it dropped."""

    name: str
    enabled: bool
    seen: int
    kept: int
    settings: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)  # dropped rows by reason; sums to `dropped`

    @property
    def dropped(self) -> int:
        return self.seen - self.kept

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "enabled": self.enabled,
            "seen": self.seen,
            "kept": self.kept,
            "dropped": self.dropped,
            "reasons": dict(self.reasons),
            "settings": dict(self.settings),
        }


@dataclass
class FilterReport:
    """Every filter in order (see FILTER_ORDER), plus the totals; written as generation/filter_report.json."""

    filters: list[FilterStep]
    total_in: int
    total_out: int
    prompts_in: int  # distinct prompts among the input rows
    prompts_out: int  # distinct prompts left with at least one completion

    @property
    def dropped(self) -> int:
        return self.total_in - self.total_out

    def step(self, name: str) -> FilterStep:
        for step in self.filters:
            if step.name == name:
                return step
        raise KeyError(f"no filter named {name!r}; filters are {', '.join(FILTER_ORDER)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "total_in": self.total_in,
            "total_out": self.total_out,
            "dropped": self.dropped,
            "prompts_in": self.prompts_in,
            "prompts_out": self.prompts_out,
            "filters": [step.to_json() for step in self.filters],
        }

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics in DESIGN.md's names: generation/kept, generation/dropped, then per filter
        generation/dropped/<name> and generation/dropped/<name>/<reason>."""
        out: dict[str, float] = {
            "generation/kept": float(self.total_out),
            "generation/dropped": float(self.dropped),
            "generation/prompts_kept": float(self.prompts_out),
        }
        for step in self.filters:
            out[f"generation/dropped/{step.name}"] = float(step.dropped)
            for reason, count in step.reasons.items():
                out[f"generation/dropped/{step.name}/{reason}"] = float(count)
        return out


def check_filters(cfg: FiltersConfig) -> None:
    """Raise ValueError, one line naming the field, for settings that cannot work; the pre-flight calls this
    so a bad pattern stops the run before the teacher spends hours generating."""
    _compile_patterns(cfg.refusal_patterns)
    # Field-level bounds are pydantic's; what it cannot see is the pair: min above max keeps nothing.
    if cfg.min_tokens is not None and cfg.max_tokens is not None and cfg.min_tokens > cfg.max_tokens:
        raise ValueError(
            f"{FIELD}.min_tokens: {cfg.min_tokens} is above max_tokens ({cfg.max_tokens}), "
            "so every completion would be dropped"
        )


def apply_filters(rows: list[Generated], cfg: FiltersConfig) -> tuple[list[Generated], FilterReport]:
    """The rows that pass every enabled filter, in input order, and the report of what each filter did."""
    check_filters(cfg)
    _check_unique(rows)
    patterns = _compile_patterns(cfg.refusal_patterns)

    alive = list(range(len(rows)))  # indices into rows, always in input order
    steps: list[FilterStep] = []

    def run(
        name: str,
        enabled: bool,
        settings: dict[str, Any],
        select: Callable[[list[int]], tuple[list[int], Counter[str]]],
        reasons: Iterable[str] = (),
    ) -> None:
        nonlocal alive
        seen = len(alive)
        counts: dict[str, int] = {}
        if enabled:
            alive, dropped_by = select(alive)
            # Every reason is listed, zeros included, so a run's metric keys do not depend on its data.
            counts = {reason: dropped_by.get(reason, 0) for reason in reasons}
        steps.append(FilterStep(name, enabled, seen, len(alive), settings, counts))

    # Not a choice: a sample the teacher never wrote is not training data (kept in the shards for audit)
    run("failed", True, {}, lambda idx: _per_row(rows, idx, _failed))
    run("empty", cfg.empty, {}, lambda idx: _per_row(rows, idx, _empty))
    run("truncated", cfg.truncated, {}, lambda idx: _per_row(rows, idx, _truncated))
    run(
        "length",
        cfg.min_tokens is not None or cfg.max_tokens is not None,
        {"min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens},
        lambda idx: _per_row(rows, idx, _length_judge(cfg.min_tokens, cfg.max_tokens)),
        reasons=("too_short", "too_long"),
    )
    run(
        "refusal_patterns",
        bool(patterns),
        {"patterns": list(cfg.refusal_patterns)},
        lambda idx: _per_row(rows, idx, _refusal_judge(patterns)),
        # By index: the patterns themselves are not valid MLflow metric names. The first match counts.
        reasons=[f"pattern_{i}" for i in range(len(patterns))],
    )
    run(
        "verify",
        cfg.verify != "none",
        {"mode": cfg.verify},
        lambda idx: _per_row(rows, idx, _verify_judge(cfg.verify)),
        reasons=("no_reference", "unreadable_reference", "no_answer", "wrong"),
    )
    dedupe_settings: dict[str, Any] = {"mode": cfg.dedupe}
    if cfg.dedupe == "near":
        dedupe_settings |= {
            "near_threshold": cfg.near_threshold,
            "ngram": cfg.ngram,
            "num_perm": MINHASH_PERMUTATIONS,
            "seed": MINHASH_SEED,
        }
    run("dedupe", cfg.dedupe != "none", dedupe_settings, lambda idx: _dedupe(rows, idx, cfg))
    run(
        "max_per_prompt",
        cfg.max_per_prompt is not None,
        {"max_per_prompt": cfg.max_per_prompt},
        lambda idx: _max_per_prompt(rows, idx, cfg.max_per_prompt or 0),
    )

    kept = [rows[i] for i in alive]
    report = FilterReport(
        filters=steps,
        total_in=len(rows),
        total_out=len(kept),
        prompts_in=len({row.prompt_id for row in rows}),
        prompts_out=len({row.prompt_id for row in kept}),
    )
    return kept, report


# --- row-by-row filters -------------------------------------------------------------------------------

Judge = Callable[[Generated], str | None]  # None: keep the row; else the reason it is dropped


def _per_row(rows: list[Generated], alive: list[int], judge: Judge) -> tuple[list[int], Counter[str]]:
    kept: list[int] = []
    dropped: Counter[str] = Counter()
    for i in alive:
        reason = judge(rows[i])
        if reason is None:
            kept.append(i)
        else:
            dropped[reason] += 1
    return kept, dropped


def _failed(row: Generated) -> str | None:
    return "failed" if row.finish_reason == "error" else None


def _empty(row: Generated) -> str | None:
    return "empty" if not row.completion.strip() else None


def _truncated(row: Generated) -> str | None:
    return "truncated" if row.finish_reason == "length" else None


def _length_judge(min_tokens: int | None, max_tokens: int | None) -> Judge:
    def judge(row: Generated) -> str | None:
        if min_tokens is not None and row.completion_tokens < min_tokens:
            return "too_short"
        if max_tokens is not None and row.completion_tokens > max_tokens:
            return "too_long"
        return None

    return judge


def _compile_patterns(patterns: list[str]) -> list[re.Pattern[str]]:
    compiled: list[re.Pattern[str]] = []
    for i, pattern in enumerate(patterns):
        where = f"{FIELD}.refusal_patterns[{i}]"
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as err:
            raise ValueError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None
        hit = regex.search(_NEUTRAL_PROBE)
        if hit is not None and hit.group(0) == "":
            raise ValueError(
                f"{where}: {pattern!r} matches zero characters (an empty alternative, '^', '*'...), "
                "so it would drop every completion"
            )
        compiled.append(regex)
    return compiled


def _refusal_judge(patterns: list[re.Pattern[str]]) -> Judge:
    def judge(row: Generated) -> str | None:
        for i, regex in enumerate(patterns):
            if regex.search(row.completion):
                return f"pattern_{i}"
        return None

    return judge


# --- verify ------------------------------------------------------------------------------------------


def gsm8k_answer(text: str) -> Decimal | None:
    """The number lm-eval's gsm8k strict-match reads ("#### 1,234" -> 1234), or None when there is none."""
    match = _GSM8K_ANSWER.search(text)  # lm-eval takes findall()[0]: the first match, as search finds
    if match is None:
        return None
    # lm-eval compares strings after dropping "," and a final "."; numbers compare here instead, so that
    # "42", "42.0" and "42." agree too (Decimal, not float: no rounding of long integers).
    number = match.group(1).strip().replace(",", "")
    try:
        value = Decimal(number)
    except InvalidOperation:  # "1.2.3", "-", "." : digits and dots that do not make a number
        return None
    return value if value.is_finite() else None


@cache
def _hendrycks_math() -> ModuleType:
    # lm-eval's MATH helpers. hendrycks_math's copy rather than minerva_math's: the minerva module needs
    # sympy + math_verify + antlr4 4.11 at import, and its is_equiv times out through SIGALRM, which only
    # works on the main thread. hendrycks_math's is_equiv is a plain string normalisation.
    from lm_eval.tasks.hendrycks_math import utils

    return utils


def boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (balanced braces) or \\fbox{...}, as lm-eval's MATH tasks read
    it; None when there is none."""
    utils = _hendrycks_math()
    boxed: str | None = utils.last_boxed_only_string(text)
    if boxed is None:
        return None
    if boxed.startswith("\\fbox{"):
        # last_boxed_only_string finds \fbox, but lm-eval's remove_boxed only unwraps \boxed (it asserts).
        answer = boxed[len("\\fbox{") : -1]
    else:
        try:
            answer = utils.remove_boxed(boxed)
        except AssertionError:  # "\boxed" followed by neither "{" nor " ": found, but not unwrappable
            return None
    return answer if answer.strip() else None


def boxed_equal(answer: str, reference: str) -> bool:
    """lm-eval's hendrycks_math equivalence: equal after its strip_string normalisation."""
    return bool(_hendrycks_math().is_equiv(answer, reference))


def exact_answer(text: str) -> str | None:
    """The whole text, whitespace collapsed: the answer of a short-answer task (a letter, a word)."""
    return normalise_whitespace(text) or None


def _checker(mode: str, reference: str) -> tuple[Callable[[str], Any], Callable[[Any, Any], bool]]:
    """(extract, equal) for `mode`; auto picks by the reference's own form: '#### n' -> gsm8k,
    '\\boxed{...}' -> boxed, anything else -> exact."""
    if mode == "auto":
        mode = (
            "gsm8k"
            if "####" in reference
            else "boxed"
            if "\\boxed" in reference or "\\fbox" in reference
            else "exact"
        )
    if mode == "gsm8k":
        return gsm8k_answer, lambda a, b: bool(a == b)
    if mode == "boxed":
        return boxed_answer, boxed_equal
    return exact_answer, lambda a, b: bool(a == b)


def _verify_judge(mode: Literal["none", "gsm8k", "boxed", "exact", "auto"]) -> Judge:
    references: dict[str, tuple[Any, Callable[[str], Any], Callable[[Any, Any], bool]]] = {}

    def judge(row: Generated) -> str | None:
        if row.reference is None:
            return "no_reference"
        if row.reference not in references:  # a prompt's n completions share one reference: read it once
            extract, equal = _checker(mode, row.reference)
            references[row.reference] = (extract(row.reference), extract, equal)
        expected, extract, equal = references[row.reference]
        if expected is None:
            return "unreadable_reference"
        answer = extract(row.completion)
        if answer is None:
            return "no_answer"
        return None if equal(answer, expected) else "wrong"

    return judge


# --- per-prompt filters ------------------------------------------------------------------------------


def _by_prompt(rows: list[Generated], alive: list[int]) -> list[list[int]]:
    """Alive indices grouped by prompt, each group in sample order (the order 'first' means)."""
    groups: defaultdict[int, list[int]] = defaultdict(list)
    for i in alive:
        groups[rows[i].prompt_id].append(i)
    return [sorted(group, key=lambda i: rows[i].sample) for group in groups.values()]


def _keep_in_input_order(alive: list[int], keep: set[int]) -> list[int]:
    return [i for i in alive if i in keep]


def _max_per_prompt(rows: list[Generated], alive: list[int], limit: int) -> tuple[list[int], Counter[str]]:
    keep = {i for group in _by_prompt(rows, alive) for i in group[:limit]}
    return _keep_in_input_order(alive, keep), Counter()


def normalise_whitespace(text: str) -> str:
    """The text dedupe=exact compares: runs of whitespace collapsed to one space, ends stripped."""
    return " ".join(text.split())


def shingles(text: str, ngram: int) -> set[str]:
    """Word n-grams of the text (words split on whitespace); a text shorter than n words is one shingle."""
    words = text.split()
    if len(words) < ngram:
        return {" ".join(words)}
    return {" ".join(words[k : k + ngram]) for k in range(len(words) - ngram + 1)}


def _dedupe(rows: list[Generated], alive: list[int], cfg: FiltersConfig) -> tuple[list[int], Counter[str]]:
    keep: set[int] = set()
    if cfg.dedupe == "exact":
        for group in _by_prompt(rows, alive):
            seen: set[str] = set()
            for i in group:
                key = normalise_whitespace(rows[i].completion)
                if key not in seen:
                    seen.add(key)
                    keep.add(i)
    else:
        signatures = _minhashes(rows, alive, cfg.ngram)
        # Pairwise within a prompt rather than MinHashLSH: a prompt has a handful of completions, so the
        # comparisons are few, and the banding of LSH would add misses near the threshold for no gain.
        for group in _by_prompt(rows, alive):
            kept_here: list[MinHash] = []
            for i in group:
                signature = signatures[i]
                if all(signature.jaccard(other) < cfg.near_threshold for other in kept_here):
                    kept_here.append(signature)
                    keep.add(i)
    return _keep_in_input_order(alive, keep), Counter()


def _minhashes(rows: list[Generated], alive: list[int], ngram: int) -> dict[int, MinHash]:
    from datasketch import MinHash

    # MinHash.generator sets up the permutations once and copies them into every signature.
    sets = ([s.encode("utf-8") for s in shingles(rows[i].completion, ngram)] for i in alive)
    signatures = MinHash.generator(
        sets, num_perm=MINHASH_PERMUTATIONS, seed=MINHASH_SEED, scheme=MINHASH_SCHEME
    )
    return dict(zip(alive, signatures, strict=True))


def _check_unique(rows: list[Generated]) -> None:
    # "first by sample index" is only defined when each (prompt, sample) occurs once; a repeat means shards
    # were merged twice on resume, and would pass dedupe=none twice.
    seen: set[tuple[int, int]] = set()
    for row in rows:
        key = (row.prompt_id, row.sample)
        if key in seen:
            raise ValueError(f"prompt {row.prompt_id} sample {row.sample} occurs twice among the rows")
        seen.add(key)
