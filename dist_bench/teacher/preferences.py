"""Stage `teacher_generation` in preference mode: the teacher's preferences, as pairs for DPO.

    dist-bench preferences --config configs/experiments/tiny_dpo.yaml   (the stage alone)
    dist-bench dpo --config configs/experiments/tiny_dpo.yaml           (then dpo_training on its pairs)

preferences.method says who writes what (prompts: data.train's, decoding: generation.*):
    verified            the teacher writes generation.n samples per prompt; chosen = one whose answer matches
                        the prompt's reference, rejected = one whose answer does not (pairs.verified_pairs)
    teacher_vs_student  the teacher and the policy init (student.model) answer every prompt; chosen = the
                        teacher's answer, rejected = the init's (pairs.teacher_vs_student_pairs)
    judge               the teacher writes generation.n samples; a judge (preferences.judge, a local model or
                        an API; unset: the teacher) rates each 1-10 on MT-Bench's grading prompt; best
                        against worst (pairs.judge_pairs)
Every model's generation runs inside this stage's energy window and counts in its tokens. Layout under
`<stage dir>/`:

    generation/shards/          the teacher's rows, as in SFT mode (teacher/generation.py)
    generation/student-shards/  teacher_vs_student: the policy init's rows
    generation/judge-shards/    judge: one row per judged sample; its prompt_id indexes `judged.jsonl`
    generation/judged.jsonl     judge: which (prompt_id, sample) each judge row rates
    preference_dataset/
        train.jsonl             the pairs in TRL's form (prompt, chosen, rejected) + prompt_id, samples
        report.json             prompts in, pairs out, drops by reason
        manifest.json           written last: counts, tokens, writers, hashes

Resume is generation's: every writer's shards are written whole, so a killed stage redoes at most the
shard it was writing, and a writer whose shards all exist is not even loaded. The stage's identity is the
teacher, data, generation settings, method and the other writers; DPO settings are not in it, so a dpo run
that changes only them reuses the pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from dist_bench import models
from dist_bench.config import ModelSpec, RunConfig, TeacherSpec
from dist_bench.errors import DataError
from dist_bench.generation.pairs import (
    JUDGE_TEMPLATE,
    Pair,
    PairReport,
    judge_pairs,
    judge_question,
    parse_rating,
    teacher_vs_student_pairs,
    verified_pairs,
)
from dist_bench.teacher.generation import (
    STAGE,
    api_metrics,
    load_writer,
    read_prompts,
    seed_of,
    sha256_of,
    shards_complete,
    stage_params,
    stage_tags,
    unmeasured_gpu,
    write_atomic,
    write_shards,
    writer_params,
)
from dist_bench.teacher.interface import Decoding, Prompt
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

if TYPE_CHECKING:
    import torch

FORMAT = "dist-bench-preferences/1"


def run(parent: ParentRun) -> StageResult:
    cfg = parent.cfg
    prefs = cfg.preferences
    if prefs.method is None:
        raise ValueError("preferences.method: unset (pairs from preferences.path need no generation)")
    device = models.pick_device(cfg.train.device)
    params = {
        "mode": "preferences",
        **stage_params(cfg, device, skip=frozenset({"enabled", "filters"})),
        "preferences.method": prefs.method,
    }
    if prefs.method == "verified":
        params["preferences.verify"] = prefs.verify
    elif prefs.method == "teacher_vs_student":
        params |= writer_params(cfg.student, "student", device)
    elif prefs.judge is not None:
        params |= writer_params(prefs.judge, "preferences.judge", device)
    if prefs.method == "judge":
        params["preferences.judge_max_new_tokens"] = str(prefs.judge_max_new_tokens)
    return execute_stage(
        parent,
        STAGE,
        params,
        lambda ctx: build(cfg, ctx, device),
        tags=stage_tags(cfg),
        gpu_unmeasured=unmeasured_gpu(cfg),
    )


def build(cfg: RunConfig, ctx: StageContext, device: torch.device) -> StageWork:
    """Every writer's missing shards, in turn (one model in memory at a time), then the pairs."""
    prefs, gen = cfg.preferences, cfg.generation
    out = ctx.stage_dir / "generation"
    prompts = read_prompts(cfg)
    decoding = Decoding.from_config(gen)
    seed = seed_of(cfg)
    spent: dict[str, float] = {}  # API metrics, summed over the writers

    def rows_of(
        spec: ModelSpec, shards: Path, items: list[Prompt], how: Decoding, own_template: bool = False
    ) -> list[dict]:
        """`spec`'s rows for `items`: written where missing (loading it only then), then read back."""
        writer = None
        if not shards_complete(shards, len(items), gen.shard_size):
            journal = out / f"{shards.name.removesuffix('shards')}api-samples"
            writer = load_writer(cfg, spec, journal, device, own_template)
        rows = write_shards(writer, items, how, seed, shards, gen.shard_size, ctx.commit_energy)
        for key, value in api_metrics(writer).items():
            spent[key] = spent.get(key, 0.0) + value
        writer = None
        models.free_memory()  # the next model loads into the memory this one held
        return rows

    teacher_rows = rows_of(cfg.teacher, out / "shards", prompts, decoding)
    writers = {"teacher": teacher_rows}
    if prefs.method == "verified":
        pairs, report = verified_pairs(teacher_rows, prefs.verify)
    elif prefs.method == "teacher_vs_student":
        student_rows = rows_of(cfg.student, out / "student-shards", prompts, decoding)
        writers["student"] = student_rows
        pairs, report = teacher_vs_student_pairs(teacher_rows, student_rows)
    else:
        # the judge's prompt ids index this list: every sample that has a completion, in (prompt, sample) order
        judged = sorted(
            (row for row in teacher_rows if row["finish_reason"] != "error"),
            key=lambda row: (row["prompt_id"], row["sample"]),
        )
        keys = [(row["prompt_id"], row["sample"]) for row in judged]
        write_atomic(out / "judged.jsonl", "".join(json.dumps(list(k)) + "\n" for k in keys).encode())
        judge = prefs.judge if prefs.judge is not None else cfg.teacher
        chat = _judge_reads_chat(judge)
        questions = [_judge_prompt(at, row, chat) for at, row in enumerate(judged)]
        # greedy, so that a resumed stage gets the verdicts an uninterrupted one would
        verdict = Decoding.greedy_up_to(prefs.judge_max_new_tokens)
        judge_rows = rows_of(judge, out / "judge-shards", questions, verdict, own_template=True)
        writers["judge"] = judge_rows
        ratings = {keys[row["prompt_id"]]: parse_rating(row["completion"]) for row in judge_rows}
        pairs, report = judge_pairs(teacher_rows, ratings)
    return _write_dataset(ctx.stage_dir / "preference_dataset", pairs, report, writers, decoding, seed, spent)


def _write_dataset(
    folder: Path,
    pairs: list[Pair],
    report: PairReport,
    writers: dict[str, list[dict]],
    decoding: Decoding,
    seed: int,
    spent: dict[str, float],
) -> StageWork:
    if not pairs:
        raise DataError(
            f"teacher_generation: no preference pairs from {report.prompts_in} prompts "
            f"(dropped: {', '.join(f'{k} {v}' for k, v in report.dropped.items() if v)})"
        )
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({**pair.to_trl(), "prompt_id": pair.prompt_id, "chosen_sample": pair.chosen_sample,
                    "rejected_sample": pair.rejected_sample}, sort_keys=True) + "\n"
        for pair in pairs
    ]  # fmt: skip
    write_atomic(folder / "train.jsonl", "".join(lines).encode())
    write_atomic(folder / "report.json", json.dumps(report.to_json(), indent=2).encode())
    tokens = {
        name: (sum(r["prompt_tokens"] for r in rows), sum(r["completion_tokens"] for r in rows))
        for name, rows in writers.items()
    }
    manifest = {
        "format": FORMAT,
        "pairs": len(pairs),
        "report": report.to_json(),
        "writers": {name: rows[0]["teacher"] for name, rows in writers.items() if rows},
        "tokens": {name: {"prefill": p, "decode": d} for name, (p, d) in tokens.items()},
        "decoding": decoding.to_dict(),
        "seed": seed,
        "train_sha256": sha256_of(folder / "train.jsonl"),
    }
    write_atomic(folder / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    prefill = sum(p for p, _ in tokens.values())
    decode = sum(d for _, d in tokens.values())
    return StageWork(
        tokens=prefill + decode,
        outputs={"preference_dataset": folder, "pairs": folder / "train.jsonl"},
        fingerprints={"pairs": manifest["train_sha256"]},
        metrics={
            "prompts": report.prompts_in,
            "completions": len(writers["teacher"]),
            "prefill_tokens": prefill,
            "decode_tokens": decode,
            **{f"preferences/{name}_tokens": p + d for name, (p, d) in tokens.items()},
            **report.metrics(),
            **spent,
        },
        details={
            "writers": manifest["writers"],
            "decoding": decoding.to_dict(),
            "tokens": manifest["tokens"],
        },
    )


def _judge_reads_chat(judge: TeacherSpec) -> bool:
    """Whether the judge takes its instructions as a user turn: an API's chat endpoint, or a local model
    whose tokenizer has a chat template (a base model reads the text as it is)."""
    if judge.api is not None:
        return judge.api.endpoint == "chat"
    tokenizer = models.load_tokenizer(judge.model, judge.revision, judge.trust_remote_code)
    return bool(getattr(tokenizer, "chat_template", None))


def _judge_prompt(index: int, row: dict, chat: bool) -> Prompt:
    text = JUDGE_TEMPLATE.format(question=judge_question(row["prompt"]), answer=row["completion"])
    if chat:
        return Prompt(index, messages=[{"role": "user", "content": text}])
    return Prompt(index, text=text + "\n\nRating:")  # a base model continues the verdict
