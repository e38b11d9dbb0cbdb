"""The training data, the teacher's generation settings and the disk the logit cache will fill."""

from __future__ import annotations

import collections
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_bench import tinyworld
from dist_bench.config import RunConfig
from dist_bench.preflight.base import Check, PreflightError
from dist_bench.preflight.models import ModelFacts, model_facts, model_source

TOKENIZE_SAMPLE = 256  # records tokenized to estimate the logit cache's size


# ---- data ---------------------------------------------------------------------------------------------


@dataclass
class DataScan:
    records: int  # records the stages will read
    sample: list[Any]  # dataset.Record of the first few, parsed as the stages parse them, for estimates
    check: Check
    chat_template: str | None = None  # messages format: the template the stages will render with
    # supervised positions of each sample record, where the scan tokenized them (the logit cache's estimate)
    sample_supervised: list[int] = field(default_factory=list)


def data_records(cfg: RunConfig, trained_on: bool) -> DataScan:
    """Every record the stages will read, parsed as they will parse it: the first bad one is named.

    `trained_on`: the student learns from these records, or from the teacher's completions of their prompts
    (sft), so each prompt/completion pair is also tokenized as the stages will: a prompt that fills
    data.max_length leaves nothing to learn, whatever completion follows it.

    For the messages format, the chat template (data.chat_template, else the student tokenizer's own: a base
    model has none), and the first records rendered and masked with it, so that a template the stages would
    refuse (not valid Jinja, not prefix-stable, marking no assistant tokens) stops here too. Rendering costs
    ~2 ms a conversation: all of them would make pre-flight minutes long on a large set.
    """
    from dist_bench.dataset import chat_template, encode_all, read_records
    from dist_bench.errors import DataError

    sample: list[Any] = []
    sample_supervised: list[int] = []
    count = 0
    template = None

    def scanned() -> Iterator[Any]:
        nonlocal count
        for record in read_records(cfg.data):
            count += 1
            if len(sample) < TOKENIZE_SAMPLE:
                sample.append(record)
            yield record

    try:
        shown = tinyworld.resolve(cfg.data.train)
        tokenizer = None
        if cfg.data.format == "messages" or trained_on:
            # The student's tokenizer renders and tokenizes the records in training (its template, special
            # tokens); checked before the data, which may take long to read.
            tokenizer = model_facts(model_source("student.model", cfg.student), cfg.student).tokenizer
        if cfg.data.format == "messages":
            template = chat_template(cfg.data, tokenizer)
        every_pair = trained_on and cfg.data.format != "messages"
        if not every_pair:
            collections.deque(scanned(), maxlen=0)
        if tokenizer is not None:
            examples = encode_all(scanned() if every_pair else sample, tokenizer, cfg.data, template)
            for at, example in enumerate(examples):
                if at < TOKENIZE_SAMPLE:
                    sample_supervised.append(example.supervised_tokens)
    except (DataError, FileNotFoundError) as err:
        text = str(err)
        raise PreflightError(
            text if text.startswith(("data.train: ", "data.chat_template: ")) else f"data.train: {text}"
        ) from None
    except OSError as err:
        raise PreflightError(f"data.train: {cfg.data.train}: cannot be read ({err.strerror})") from None
    where = shown if cfg.data.split == "train" else f"{shown}, split {cfg.data.split}"
    if cfg.data.subset is not None:
        where += f", subset {cfg.data.subset}"
    detail = f"{where} ({count} records, every one well-formed"
    if trained_on and template is None:
        detail += f" and within data.max_length={cfg.data.max_length}"
    if template is not None:
        shown_template = cfg.data.chat_template or f"the tokenizer of {cfg.student.model}"
        detail += f"; the first {len(sample)} rendered with the chat template of {shown_template}"
    return DataScan(count, sample, Check("data.train", detail + ")"), template, sample_supervised)


def teacher_generation(cfg: RunConfig, data: DataScan) -> list[Check]:
    """The teacher loads, the filters' settings are valid, the prompts and completions fit its context."""
    import transformers

    from dist_bench.generation.filters import check_filters
    from dist_bench.teacher.interface import Prompt
    from dist_bench.teacher.local import encode_prompt, supports_graph

    gen = cfg.generation
    try:
        check_filters(gen.filters)
    except ValueError as err:
        raise PreflightError(str(err)) from None
    for at, stop in enumerate(gen.stop):
        if not stop:
            raise PreflightError(
                f"generation.stop[{at}]: empty string (it would end every completion at once)"
            )
    if cfg.teacher.api is not None:  # the server writes the completions: no local teacher to load
        from dist_bench.preflight.api import api_teacher

        return [
            api_teacher(cfg.teacher.api),
            Check("generation", f"{gen.n} completion(s) per prompt; filters valid"),
        ]
    source = model_source("teacher.model", cfg.teacher)
    teacher = model_facts(source, cfg.teacher)
    template = _teacher_template(cfg, teacher)
    messages = cfg.data.format == "messages"
    longest = max(
        (
            len(encode_prompt(teacher.tokenizer, Prompt.from_record(0, r, messages), template))
            for r in data.sample
        ),
        default=0,
    )
    context = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and longest + gen.max_new_tokens > context:
        raise PreflightError(
            f"generation.max_new_tokens: {gen.max_new_tokens} new tokens after a prompt of {longest} tokens "
            f"exceed the teacher's context of {context} tokens"
        )
    if gen.backend == "graph":
        architecture = (getattr(teacher.config, "architectures", None) or ["?"])[0]
        if not supports_graph(getattr(transformers, architecture, None)):
            raise PreflightError(
                f"generation.backend: graph needs a teacher whose decode step can be captured (transformers "
                f"marks such models _can_compile_fullgraph); {architecture} is not one: use generate or auto"
            )
    decoding = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature}, top_p {gen.top_p}"
    return [
        source.check,
        Check(
            "generation",
            f"{gen.n} completion(s) per prompt, {decoding}, up to {gen.max_new_tokens} new tokens "
            f"(longest sampled prompt {longest} tokens, teacher context {context}); filters valid",
        ),
    ]


def preference_generation(cfg: RunConfig, data: DataScan) -> list[Check]:
    """preferences.method: the teacher's generation checks, the sample count the method needs, and every
    other model that writes in the stage (the policy init, the judge) loads and has room for its text."""
    from dist_bench.generation.pairs import JUDGE_TEMPLATE
    from dist_bench.teacher.interface import Prompt
    from dist_bench.teacher.local import encode_prompt

    prefs, gen = cfg.preferences, cfg.generation
    if prefs.method == "teacher_vs_student" and gen.n != 1:
        raise PreflightError(
            f"generation.n: teacher_vs_student pairs each prompt's first answer; n={gen.n} would generate "
            f"{gen.n - 1} unused per prompt (set generation.n=1)"
        )
    if prefs.method in ("verified", "judge") and gen.n < 2:
        raise PreflightError(
            f"generation.n: {prefs.method} pairs two of the teacher's samples per prompt; n={gen.n} "
            "(set at least 2, with temperature > 0 so they differ)"
        )
    if prefs.method in ("verified", "judge") and gen.temperature == 0:
        raise PreflightError(
            f"generation.temperature: 0 (greedy) writes {gen.n} identical samples per prompt, and "
            f"{prefs.method} needs them to differ (sample: temperature > 0)"
        )
    checks = teacher_generation(cfg, data)
    messages = cfg.data.format == "messages"
    if prefs.method == "teacher_vs_student":  # the policy init answers the same prompts
        student = model_facts(model_source("student.model", cfg.student), cfg.student)
        template = _teacher_template(cfg, student)
        prompts = [Prompt.from_record(0, r, messages) for r in data.sample]
        longest = max((len(encode_prompt(student.tokenizer, p, template)) for p in prompts), default=0)
        _fits("student.model", student, longest + gen.max_new_tokens, "a prompt and its answer")
        checks.append(
            Check(
                "preferences",
                f"teacher_vs_student; the policy init answers too ({longest} tokens the longest sampled prompt)",
            )
        )
    elif prefs.method == "judge":
        judge = prefs.judge if prefs.judge is not None else cfg.teacher
        field = "preferences.judge" if prefs.judge is not None else "teacher"
        if judge.api is not None:
            if prefs.judge is not None:  # the teacher's API is probed by teacher_generation already
                from dist_bench.preflight.api import api_teacher

                checks.append(api_teacher(judge.api, "preferences.judge.api"))
        else:
            source = model_source(f"{field}.model", judge)
            facts = model_facts(source, judge)
            template_tokens = len(facts.tokenizer(JUDGE_TEMPLATE)["input_ids"])
            longest = max((len(facts.tokenizer(str(r.prompt if not messages else r.messages))["input_ids"])
                           for r in data.sample), default=0)  # fmt: skip
            room = template_tokens + longest + 4 * gen.max_new_tokens + prefs.judge_max_new_tokens
            _fits(f"{field}.model", facts, room, "the grading prompt, a question, an answer and the verdict")
            checks.append(source.check)
        checks.append(
            Check(
                "preferences",
                f"judge {judge.api.model if judge.api else judge.model} rates {gen.n} samples per prompt",
            )
        )
    else:
        checks.append(
            Check("preferences", f"verified: {gen.n} samples per prompt, answers compared {prefs.verify}")
        )
    return checks


def _fits(field: str, facts: ModelFacts, tokens: int, what: str) -> None:
    context = getattr(facts.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and tokens > context:
        raise PreflightError(
            f"{field}: {what} take up to about {tokens} tokens, over its context of {context} tokens"
        )


def preference_pairs(cfg: RunConfig) -> Check:
    """preferences.path: set, readable, and every row a pair in TRL's standard or conversational form."""
    from dist_bench.errors import DataError
    from dist_bench.generation.pairs import read_pairs

    prefs = cfg.preferences
    if prefs.path is None:
        raise PreflightError(
            "preferences.path: the dpo pipeline needs preference pairs (prompt, chosen, rejected): set "
            "preferences.method for the teacher to build them, or preferences.path to read them"
        )
    try:
        pairs = read_pairs(prefs.path, split=prefs.split, subset=prefs.subset)
    except DataError as err:  # one line naming file, line and field already
        raise PreflightError(f"preferences.path: {err}") from None
    except (FileNotFoundError, ValueError) as err:
        raise PreflightError(f"preferences.path: {prefs.path}: {err}") from None
    if not pairs:
        raise PreflightError(f"preferences.path: {prefs.path} holds no pairs")
    if cfg.dpo.heldout_pairs >= len(pairs):
        raise PreflightError(
            f"dpo.heldout_pairs: {cfg.dpo.heldout_pairs} held out of the {len(pairs)} pairs in {prefs.path} "
            "leaves none to train on"
        )
    form = "conversational" if isinstance(pairs[0]["prompt"], list) else "standard"
    return Check("preferences.path", f"{len(pairs)} pairs ({form} form) in {prefs.path}")


def _teacher_template(cfg: RunConfig, teacher: ModelFacts) -> str | None:
    """The template the teacher renders conversations with (data.chat_template, else its own)."""
    if cfg.data.format != "messages":
        return None
    from dist_bench.dataset import chat_template
    from dist_bench.errors import DataError

    try:
        return chat_template(cfg.data, teacher.tokenizer)
    except DataError as err:  # already one line starting "data.chat_template:"
        raise PreflightError(str(err)) from None


# ---- disk ---------------------------------------------------------------------------------------------


def cache_disk(cfg: RunConfig, teacher: ModelFacts, data: DataScan) -> Check:
    """The disk under output.run_dir holds the logit cache the teacher will write."""
    planned = planned_cache_bytes(cfg, teacher.tokenizer, data)
    folder = Path(cfg.output.run_dir).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if planned > free:
        raise PreflightError(
            f"output.run_dir: {folder} has {_size(free)} free but the logit cache (logits.top_k={cfg.logits.top_k}, "
            f"{data.records} records) needs up to {_size(planned)}"
        )
    return Check("disk", f"logit cache <= {_size(planned)}; {_size(free)} free under {existing}")


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def planned_cache_bytes(cfg: RunConfig, tokenizer: Any, data: DataScan) -> int:
    """The logit cache's size, from the supervised positions of the first records (see logit_cache.py), as the
    data scan tokenized them (`data_records(cfg, trained_on=True)`)."""
    from dist_bench.teacher import cache_format

    positions = data.sample_supervised
    mean_positions = sum(positions) / max(len(positions), 1)
    # at most: a position keeps between one and top_k tokens (cache_format.py)
    bytes_per_position = cache_format.bytes_per_position(cfg.logits.top_k, max(len(tokenizer), 2))
    return int(
        mean_positions * data.records * bytes_per_position + data.records * 16
    )  # + offsets, sequence index
