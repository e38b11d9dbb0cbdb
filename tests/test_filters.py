"""Generation filters: on hand-made completions, each filter drops exactly the rows it should, verification
keeps only correct answers, and the report's per-filter chain adds up."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import pytest
import yaml

from dist_bench.config import FiltersConfig
from dist_bench.generation.filters import (
    FILTER_ORDER,
    GSM8K_STRICT_PATTERN,
    FilterReport,
    Generated,
    apply_filters,
    check_filters,
    shingles,
)


def row(
    prompt_id: int,
    sample: int,
    completion: str,
    *,
    finish: str = "stop",
    tokens: int | None = None,
    reference: str | None = None,
) -> Generated:
    # Token counts default to the word count: only the length filter reads them.
    count = len(completion.split()) if tokens is None else tokens
    return Generated(prompt_id, sample, completion, finish, count, reference)  # type: ignore[arg-type]


def only(**settings: Any) -> FiltersConfig:
    """Every filter off (empty, truncated and exact dedupe are on by default) except those given."""
    return FiltersConfig(**{"empty": False, "truncated": False, "dedupe": "none", **settings})


def survivors(rows: list[Generated]) -> list[tuple[int, int]]:
    return [(r.prompt_id, r.sample) for r in rows]


def counts(report: FilterReport, name: str) -> tuple[bool, int, int, int]:
    step = report.step(name)
    return step.enabled, step.seen, step.kept, step.dropped


def assert_chain(report: FilterReport) -> None:
    """Filters in FiltersConfig's order, each seeing what the one before kept, totals at both ends."""
    assert [step.name for step in report.filters] == list(FILTER_ORDER)
    assert report.filters[0].seen == report.total_in
    for before, after in zip(report.filters, report.filters[1:], strict=False):
        assert before.kept == after.seen, (before.name, after.name)
    assert report.filters[-1].kept == report.total_out
    for step in report.filters:
        assert step.dropped == step.seen - step.kept
        if not step.enabled:
            assert step.seen == step.kept
        if step.reasons:
            assert sum(step.reasons.values()) == step.dropped, step.name


def test_empty_drops_blank_and_whitespace_only_completions() -> None:
    rows = [row(0, 0, ""), row(0, 1, "  \n\t "), row(0, 2, "42"), row(1, 0, "  a  ")]
    kept, report = apply_filters(rows, only(empty=True))
    assert survivors(kept) == [(0, 2), (1, 0)]
    assert counts(report, "empty") == (True, 4, 2, 2)
    assert report.total_in == 4 and report.total_out == 2
    assert report.prompts_in == 2 and report.prompts_out == 2
    assert_chain(report)


def test_truncated_drops_length_finishes_only() -> None:
    rows = [
        row(0, 0, "cut off mid", finish="length"),
        row(0, 1, "done"),
        row(1, 0, "also cut", finish="length"),
    ]
    kept, report = apply_filters(rows, only(truncated=True))
    assert survivors(kept) == [(0, 1)]
    assert counts(report, "truncated") == (True, 3, 1, 2)
    assert report.prompts_out == 1
    assert_chain(report)


def test_length_bounds_are_inclusive_and_counted_by_side() -> None:
    rows = [row(0, i, "x", tokens=n) for i, n in enumerate([2, 3, 5, 6, 0])]
    kept, report = apply_filters(rows, only(min_tokens=3, max_tokens=5))
    assert survivors(kept) == [(0, 1), (0, 2)]
    assert counts(report, "length") == (True, 5, 2, 3)
    assert report.step("length").reasons == {"too_short": 2, "too_long": 1}
    assert report.step("length").settings == {"min_tokens": 3, "max_tokens": 5}

    kept, report = apply_filters(rows, only(max_tokens=2))  # one bound alone
    assert survivors(kept) == [(0, 0), (0, 4)]
    assert report.step("length").reasons == {"too_short": 0, "too_long": 3}


def test_refusal_patterns_are_case_insensitive_searches_counted_by_first_match() -> None:
    rows = [
        row(0, 0, "I CAN'T HELP with that request."),
        row(0, 1, "Step 1: 6 * 7 = 42. #### 42"),
        row(0, 2, "As an AI language model, I cannot help with that."),  # both match: the first counts
        row(1, 0, "Well, as an ai I would say 42."),
        row(1, 1, "The helpful answer is 42."),  # "help" alone matches neither
    ]
    kept, report = apply_filters(rows, only(refusal_patterns=[r"i can(?:'|no)t help", r"\bas an ai\b"]))
    assert survivors(kept) == [(0, 1), (1, 1)]
    assert counts(report, "refusal_patterns") == (True, 5, 2, 3)
    assert report.step("refusal_patterns").reasons == {"pattern_0": 2, "pattern_1": 1}


GSM8K_REFERENCE = "Janet has 1000 + 234 = <<1000+234=1234>>1234 ducks.\n#### 1234"


def test_verify_gsm8k_keeps_only_correct_numbers() -> None:
    rows = [
        row(0, 0, "1000 + 234 = 1234, so #### 1,234", reference=GSM8K_REFERENCE),  # commas removed
        row(0, 1, "#### 1234.0", reference=GSM8K_REFERENCE),  # numeric equality
        row(0, 2, "#### 1234.", reference=GSM8K_REFERENCE),  # a sentence's full stop
        row(0, 3, "so #### 1235", reference=GSM8K_REFERENCE),  # wrong
        row(0, 4, "The answer is 1234.", reference=GSM8K_REFERENCE),  # no '####': no answer
        row(0, 5, "####1234", reference=GSM8K_REFERENCE),  # strict-match needs "#### "
        row(0, 6, "#### -1234", reference=GSM8K_REFERENCE),  # sign matters
        row(1, 0, "#### 42", reference=None),  # the source has no reference for this prompt
        row(2, 0, "#### 42", reference="forty-two"),  # a reference without an answer to compare with
        row(3, 0, "#### 42,", reference="#### 42"),
        row(3, 1, "#### 0.5", reference="#### .50"),
    ]
    kept, report = apply_filters(rows, only(verify="gsm8k"))
    assert survivors(kept) == [(0, 0), (0, 1), (0, 2), (3, 0), (3, 1)]
    assert counts(report, "verify") == (True, 11, 5, 6)
    assert report.step("verify").reasons == {
        "no_reference": 1,
        "unreadable_reference": 1,
        "no_answer": 2,
        "wrong": 2,
    }
    assert report.prompts_out == 2


BOXED_REFERENCE = r"Half of the cake is left, so the answer is $\boxed{\frac{1}{2}}$."


def test_verify_boxed_reads_the_last_balanced_box() -> None:
    rows = [
        row(0, 0, r"So the fraction is $\boxed{\frac{1}{2}}$.", reference=BOXED_REFERENCE),  # nested braces
        row(0, 1, r"$\boxed{\dfrac{1}{2}}$", reference=BOXED_REFERENCE),  # lm-eval normalisation
        row(0, 2, r"$\boxed{0.5}$", reference=BOXED_REFERENCE),
        row(0, 3, r"Not $\boxed{1}$ but $\boxed{\frac{1}{2}}$", reference=BOXED_REFERENCE),  # the last box
        row(0, 4, r"First $\boxed{\frac{1}{2}}$, then $\boxed{\frac{1}{3}}$", reference=BOXED_REFERENCE),
        row(0, 5, r"\fbox{\frac{1}{2}}", reference=BOXED_REFERENCE),
        row(0, 6, r"The answer is 1/2.", reference=BOXED_REFERENCE),  # no box
        row(0, 7, r"$\boxed{\frac{1}{2}$", reference=BOXED_REFERENCE),  # unbalanced: no answer
        row(1, 0, r"$\boxed{\frac{\sqrt{3}}{2}}$", reference=r"$\boxed{\frac{\sqrt3}{2}}$"),
        row(1, 1, r"$\boxed{\frac{\sqrt{2}}{2}}$", reference=r"$\boxed{\frac{\sqrt3}{2}}$"),
        row(2, 0, r"$\boxed{7}$", reference="#### 7"),  # a gsm8k-style reference under boxed
    ]
    kept, report = apply_filters(rows, only(verify="boxed"))
    assert survivors(kept) == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 5), (1, 0)]
    assert report.step("verify").reasons == {
        "no_reference": 0,
        "unreadable_reference": 1,
        "no_answer": 2,
        "wrong": 2,
    }


def test_dedupe_exact_is_per_prompt_keeps_lowest_sample_and_input_order() -> None:
    rows = [
        row(0, 2, "The answer\nis  42."),  # a duplicate of sample 0, which comes later in the input
        row(0, 0, "  The answer is 42. "),
        row(0, 1, "The answer is 42"),  # no full stop: different text
        row(0, 3, "the answer is 42."),  # case differs: different text
        row(1, 0, "The answer is 42."),  # the same text for another prompt is fine
        row(0, 4, "The answer is\t42."),
    ]
    kept, report = apply_filters(rows, only(dedupe="exact"))
    assert survivors(kept) == [(0, 0), (0, 1), (0, 3), (1, 0)]
    assert counts(report, "dedupe") == (True, 6, 4, 2)
    assert report.step("dedupe").settings == {"mode": "exact"}


PARAPHRASE_A = (
    "The train travels sixty miles in one hour so in three hours it travels one hundred eighty miles"
)
PARAPHRASE_B = (
    "The train covers sixty miles in one hour so in three hours it travels one hundred eighty miles"
)
UNRELATED = (
    "First compute the area of the rectangle by multiplying its length and width then subtract the hole"
)


def test_near_duplicate_paraphrases_fixture() -> None:
    # One word apart: 3 of 16 word trigrams differ on each side, Jaccard 13/19 ~ 0.68; unrelated: 0.
    a, b, c = (shingles(text, 3) for text in (PARAPHRASE_A, PARAPHRASE_B, UNRELATED))
    assert len(a & b) / len(a | b) == pytest.approx(13 / 19)
    assert not a & c


@pytest.mark.parametrize(
    ("threshold", "expected"),
    [
        (0.5, [(0, 0), (0, 2), (1, 0)]),  # the paraphrase (Jaccard ~0.68) is a near duplicate
        (0.99, [(0, 0), (0, 1), (0, 2), (1, 0)]),  # ... and not at 0.99
    ],
)
def test_dedupe_near_drops_paraphrases_at_the_threshold(
    threshold: float, expected: list[tuple[int, int]]
) -> None:
    rows = [
        row(0, 0, PARAPHRASE_A),
        row(0, 1, PARAPHRASE_B),
        row(0, 2, UNRELATED),
        row(1, 0, PARAPHRASE_B),  # another prompt: not a duplicate of prompt 0's completions
    ]
    kept, report = apply_filters(rows, only(dedupe="near", near_threshold=threshold, ngram=3))
    assert survivors(kept) == expected
    assert counts(report, "dedupe") == (True, 4, len(expected), 4 - len(expected))
    assert report.step("dedupe").settings == {
        "mode": "near",
        "near_threshold": threshold,
        "ngram": 3,
        "num_perm": 128,
        "seed": 1,
    }


def test_dedupe_near_keeps_the_first_and_treats_short_texts_as_one_shingle() -> None:
    rows = [
        row(0, 1, PARAPHRASE_B),
        row(0, 0, PARAPHRASE_A),  # lower sample index: this one is kept, sample 1 dropped
        row(1, 0, "Forty two"),  # fewer words than ngram: the whole text is one shingle
        row(1, 1, "Forty  two"),  # same words
        row(1, 2, "Forty three"),
        row(1, 3, "   "),
        row(1, 4, ""),  # both blank: identical (the empty filter is off here)
    ]
    kept, report = apply_filters(rows, only(dedupe="near", near_threshold=0.5, ngram=3))
    assert survivors(kept) == [(0, 0), (1, 0), (1, 2), (1, 3)]
    assert counts(report, "dedupe") == (True, 7, 4, 3)


def test_max_per_prompt_keeps_the_first_by_sample_index() -> None:
    rows = [row(0, 3, "d"), row(0, 1, "b"), row(1, 0, "x"), row(0, 0, "a"), row(0, 2, "c")]
    kept, report = apply_filters(rows, only(max_per_prompt=2))
    assert survivors(kept) == [(0, 1), (1, 0), (0, 0)]
    assert counts(report, "max_per_prompt") == (True, 5, 3, 2)


def test_all_filters_in_order() -> None:
    ref = "#### 12"
    rows = [
        row(0, 0, "", reference=ref),  # empty
        row(0, 1, "6 + 6 = 12 and then 12 + 12 = 24 and", finish="length", reference=ref),  # truncated
        row(0, 2, "#### 12", reference=ref),  # length: 2 tokens < 3
        row(0, 3, "I'm sorry, but I cannot do that. #### 12", reference=ref),  # refusal
        row(0, 4, "6 + 6 = 12. #### 13", reference=ref),  # verify: wrong
        row(0, 5, "6 + 6 = 12. #### 12", reference=ref),  # kept
        row(0, 6, "6 + 6  =  12.\n#### 12", reference=ref),  # dedupe: same as sample 5
        row(0, 7, "Six plus six is 12. #### 12", reference=ref),  # kept
        row(0, 8, "Twice six is twelve. #### 12", reference=ref),  # max_per_prompt: a third correct one
        row(1, 0, "Add them: 3 + 4 = 7. #### 7", reference="#### 7"),  # kept
        row(1, 1, "3 + 4 = 7 so #### 7", tokens=40, reference="#### 7"),  # length: 40 tokens > 30
        row(2, 0, "I guess #### 5", reference=None),  # verify: no reference
    ]
    cfg = FiltersConfig(
        min_tokens=3,
        max_tokens=30,
        refusal_patterns=[r"\bI(?:'m| am) sorry\b"],
        verify="gsm8k",
        dedupe="exact",
        max_per_prompt=2,
    )
    kept, report = apply_filters(rows, cfg)
    assert survivors(kept) == [(0, 5), (0, 7), (1, 0)]
    assert_chain(report)
    assert [(s.name, s.enabled, s.seen, s.kept) for s in report.filters] == [
        ("failed", True, 12, 12),
        ("empty", True, 12, 11),
        ("truncated", True, 11, 10),
        ("length", True, 10, 8),
        ("refusal_patterns", True, 8, 7),
        ("verify", True, 7, 5),
        ("dedupe", True, 5, 4),
        ("max_per_prompt", True, 4, 3),
    ]
    assert report.step("verify").reasons == {
        "no_reference": 1,
        "unreadable_reference": 0,
        "no_answer": 0,
        "wrong": 1,
    }
    assert (report.total_in, report.total_out, report.dropped) == (12, 3, 9)
    assert (report.prompts_in, report.prompts_out) == (3, 2)

    data = report.to_json()
    assert list(data) == ["total_in", "total_out", "dropped", "prompts_in", "prompts_out", "filters"]
    assert list(data["filters"][0]) == ["name", "enabled", "seen", "kept", "dropped", "reasons", "settings"]
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert data["filters"][4]["settings"] == {"patterns": [r"\bI(?:'m| am) sorry\b"]}

    metrics = report.metrics()
    assert metrics["generation/kept"] == 3.0
    assert metrics["generation/dropped"] == 9.0
    assert metrics["generation/dropped/empty"] == 1.0
    assert metrics["generation/dropped/length/too_long"] == 1.0
    assert metrics["generation/dropped/refusal_patterns/pattern_0"] == 1.0
    assert metrics["generation/dropped/verify/no_reference"] == 1.0
    assert metrics["generation/prompts_kept"] == 2.0
    assert all(isinstance(value, float) for value in metrics.values())


def test_samples_the_teacher_never_wrote_are_dropped_whatever_the_settings() -> None:
    rows = [row(0, 0, "#### 1"), row(0, 1, "", finish="error"), row(1, 0, "#### 2")]
    kept, report = apply_filters(rows, only())
    assert survivors(kept) == [(0, 0), (1, 0)]
    assert counts(report, "failed") == (True, 3, 2, 1)


def test_everything_off_keeps_everything() -> None:
    rows = [
        row(0, 0, ""),
        row(0, 1, "cut", finish="length"),
        row(0, 2, "I'm sorry", tokens=10_000),
        row(0, 3, "I'm sorry", tokens=0),
        row(1, 0, "#### 1", reference="#### 2"),
    ]
    kept, report = apply_filters(rows, only())
    assert kept == rows
    assert_chain(report)
    failed, *switchable = report.filters
    assert failed.name == "failed" and failed.enabled and failed.seen == failed.kept == 5  # not a choice
    assert all(not step.enabled and step.seen == step.kept == 5 for step in switchable)
    assert all(step.reasons == {} for step in report.filters)
    assert report.metrics()["generation/dropped"] == 0.0


def test_no_rows() -> None:
    kept, report = apply_filters([], FiltersConfig(verify="boxed", dedupe="near", max_per_prompt=1))
    assert kept == []
    assert_chain(report)
    assert (report.total_in, report.total_out, report.prompts_in, report.prompts_out) == (0, 0, 0, 0)


def test_check_filters_rejects_a_bad_regex_naming_the_field() -> None:
    cfg = FiltersConfig(refusal_patterns=[r"sorry", r"(unclosed"])
    message = (
        r"^generation\.filters\.refusal_patterns\[1\]: '\(unclosed' is not a valid regular expression \("
    )
    with pytest.raises(ValueError, match=message):
        check_filters(cfg)
    with pytest.raises(ValueError, match=message):  # apply_filters checks before it filters
        apply_filters([row(0, 0, "fine")], cfg)


@pytest.mark.parametrize("pattern", [r"sorry|", r"^", r"(?:apolog)*"])
def test_check_filters_rejects_a_pattern_that_matches_everything(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"refusal_patterns\[0\]: .* would drop every completion"):
        check_filters(FiltersConfig(refusal_patterns=[pattern]))


def test_check_filters_rejects_min_above_max_and_accepts_the_defaults() -> None:
    with pytest.raises(ValueError, match=r"^generation\.filters\.min_tokens: 10 is above max_tokens \(5\)"):
        check_filters(FiltersConfig(min_tokens=10, max_tokens=5))
    check_filters(FiltersConfig())
    check_filters(FiltersConfig(min_tokens=5, max_tokens=5, refusal_patterns=[r"^\s*I can't"]))


def test_rows_are_checked() -> None:
    with pytest.raises(ValueError, match="finish_reason 'eos' is not one of stop, length"):
        row(0, 0, "x", finish="eos")
    with pytest.raises(ValueError, match="prompt 0 sample 1 occurs twice"):
        apply_filters([row(0, 1, "a"), row(0, 1, "b")], only())


def test_gsm8k_pattern_is_lm_evals_strict_match() -> None:
    # The pattern is a copy (see filters.py); this says when the installed lm-eval's task changes it.
    task = yaml.safe_load((resources.files("lm_eval") / "tasks/gsm8k/gsm8k.yaml").read_text())
    strict = next(f for f in task["filter_list"] if f["name"] == "strict-match")
    assert strict["filter"][0] == {"function": "regex", "regex_pattern": GSM8K_STRICT_PATTERN}
    assert strict["filter"][1] == {"function": "take_first"}


def test_verify_auto_picks_the_checker_by_the_references_form() -> None:
    """gsm8k for '#### n', boxed for \\boxed{}, exact (whitespace collapsed) for anything else."""
    rows = [
        row(0, 0, "so #### 1,234", reference="#### 1234"),  # gsm8k: kept
        row(0, 1, "#### 12", reference="#### 1234"),  # gsm8k: wrong
        row(1, 0, r"it is \boxed{\frac{1}{2}}", reference=r"\boxed{\frac12}"),  # boxed: kept
        row(2, 0, "  C ", reference=" C"),  # exact: kept
        row(2, 1, " B", reference=" C"),  # exact: wrong
        row(3, 0, "   ", reference=" C"),  # exact: no answer
    ]
    kept, report = apply_filters(rows, FiltersConfig(verify="auto", empty=False, dedupe="none"))
    assert survivors(kept) == [(0, 0), (1, 0), (2, 0)]
    assert report.step("verify").reasons == {
        "no_reference": 0, "unreadable_reference": 0, "no_answer": 1, "wrong": 2,
    }  # fmt: skip
