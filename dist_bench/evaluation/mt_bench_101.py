"""MT-Bench-101 (Bai et al. 2024, "MT-Bench-101: A Fine-Grained Benchmark for Evaluating Large Language
Models in Multi-Turn Dialogues", ACL 2024): 13 multi-turn tasks, each turn's answer rated 1-10 by a judge.

    outcome = mt_bench_101.run(model, judge, Path("mtbench101.jsonl"), out, model_chat=True, judge_chat=True,
                               max_samples=None, max_new_tokens=1024, judge_max_new_tokens=2048, seed=0)
    outcome.metrics  # {"mt_bench_101/score": 8.1, "mt_bench_101/CM": 8.6, ..., "mt_bench_101/unrated": 0}

Reproduces the authors' implementation (their PR #1215 to OpenCompass: opencompass/datasets/subjective/
mtbench101.py, Apache-2.0; the authors' repository mtbench101/mt-bench-101 holds only the data):
1. Data: JSON lines {"task": "CM", "id": 1, "history": [{"user": ..., "bot": ...}, ...]}; the first
   `max_samples` dialogues. Tasks: CM SI AR TS CC CR FR SC SA MR GR IC PI.
2. Judged turns: every turn, except the first of FR, CR, AR, SA, SC and CM (`skip_first_tasks`: their first
   turn only sets up what later turns rewrite, recall, challenge or refer to).
3. The model answers each judged turn given the GOLDEN history (the dataset's own bot answers, never its
   own earlier ones), as OpenCompass's ChatInferencer(infer_mode="last") does. model_chat: the history as
   user/assistant messages plus the judged user turn. Otherwise (a base model without a chat template) a
   text "User: ...\\nAssistant: ...\\n" per turn ending in "Assistant:"; its answer is cut where it starts
   writing the next "User:" turn itself (greedy decoding has no stop strings here).
4. The judge gets the original prompts (mt_bench_101_prompts.json, verbatim): system = judge preamble +
   the task's rubric + score format; user = the dialogue as "Human: / Assistant:" text with the model's
   answer in the last turn; MR and GR add a reference (the golden dialogue up to this turn, printed as the
   original does: a Python list of messages). judge_chat False: system and user prompt as one text.
5. Rating: the first "[<digits>]" in the verdict ("Rating: [[7]]" -> 7), the original's regex, unbounded.
6. Score: a dialogue's score is the minimum over its rated turns; a task's score the mean of its
   dialogues' scores; `score` the mean of the task scores (tasks equally weighted, whatever their size).
Unrated turns (no "[n]" in the verdict, a failed judge request, or a failed model request, which is then
not judged) are counted in `unrated` and left out as the original leaves them out: the dialogue's
minimum is over its other turns, and a dialogue with no rated turn is left out of its task's mean (listed
in results["unscored_dialogues"]). A task with no scored dialogue has no metric and is not in `score`.
Writes answers.jsonl (one row per judged turn), judgments.jsonl (verdict and rating) and scores.json.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_bench.evaluation.judged import JudgedOutcome
from dist_bench.teacher.api import ApiTeacher
from dist_bench.teacher.interface import Completion, Decoding, Prompt, Teacher

TASK = "mt_bench_101"
TASKS = ("CM", "SI", "AR", "TS", "CC", "CR", "FR", "SC", "SA", "MR", "GR", "IC", "PI")
# The original prompts and turn rules, verbatim from OpenCompass (Apache-2.0; source noted in the file)
PROMPTS: dict[str, Any] = json.loads(Path(__file__).with_name("mt_bench_101_prompts.json").read_text())
RATING = re.compile(r"\[([0-9]+)\]")  # post_process_mtbench101: the first bracketed number
NEXT_USER_TURN = "\nUser:"


@dataclass(frozen=True)
class Turn:
    """One judged turn: the golden dialogue up to and including it (index `turn`, 0-based)."""

    task: str
    id: Any  # the dataset's id, unique within a task
    turn: int
    history: list[dict[str, str]]  # {"user", "bot"} turns 0..turn, golden bot answers

    @property
    def question(self) -> str:
        return self.history[-1]["user"]


def load(data: Path, max_samples: int | None) -> list[dict[str, Any]]:
    dialogues = []
    for line in data.read_text(encoding="utf-8").splitlines():
        if line.strip():
            dialogues.append(json.loads(line))
        if max_samples is not None and len(dialogues) >= max_samples:
            break
    if not dialogues:
        raise ValueError(f"MT-Bench-101: no dialogues in {data}")
    unknown = sorted({d["task"] for d in dialogues} - set(PROMPTS["rubrics"]))
    if unknown:
        raise ValueError(f"MT-Bench-101: unknown task(s) {unknown} in {data}; known: {list(TASKS)}")
    return dialogues


def judged_turns(dialogue: dict[str, Any]) -> list[Turn]:
    first = 1 if dialogue["task"] in PROMPTS["skip_first_tasks"] else 0
    history = dialogue["history"]
    return [Turn(dialogue["task"], dialogue["id"], t, history[: t + 1]) for t in range(first, len(history))]


def _messages(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The original's add_format: a user message, and the bot's unless it is empty."""
    out = []
    for turn in history:
        out.append({"role": "user", "content": turn["user"]})
        if turn["bot"]:
            out.append({"role": "assistant", "content": turn["bot"]})
    return out


def model_prompt(index: int, turn: Turn, chat: bool) -> Prompt:
    if chat:
        return Prompt(
            index, messages=[*_messages(turn.history[:-1]), {"role": "user", "content": turn.question}]
        )
    lines = [f"User: {t['user']}\nAssistant: {t['bot']}\n" for t in turn.history[:-1]]
    return Prompt(index, text="".join(lines) + f"User: {turn.question}\nAssistant:")


def base_model_answer(text: str) -> str:
    """A base model's answer ends where it goes on to write the user's next turn."""
    at = text.find(NEXT_USER_TURN)
    return (text if at < 0 else text[:at]).strip()


def judge_prompt(index: int, turn: Turn, answer: str, chat: bool) -> Prompt:
    system = PROMPTS["judge"] + PROMPTS["rubrics"][turn.task] + PROMPTS["score_format"]
    # the original's running `history` string: golden turns, then the judged question awaiting the answer
    history = "".join(f"\n\n Human: {t['user']}\n\nAssistant: {t['bot']}" for t in turn.history[:-1])
    history += f"\n\n Human: {turn.question}\n\nAssistant: "
    needs_reference = turn.task in PROMPTS["need_ref_tasks"]
    template = PROMPTS["user_template_with_reference"] if needs_reference else PROMPTS["user_template"]
    fill = {"history": history, "prediction": answer, "ref_answer": str(_messages(turn.history))}
    # one pass, so braces inside the dialogue or the answer are never taken for placeholders
    user = re.sub(r"\{(history|prediction|ref_answer)\}", lambda m: fill[m.group(1)], template)
    if chat:
        return Prompt(
            index, messages=[{"role": "system", "content": system}, {"role": "user", "content": user}]
        )
    return Prompt(index, text=f"{system}\n\n{user}")


def rating(verdict: str) -> int | None:
    match = RATING.search(verdict)
    return int(match.group(1)) if match else None


def scores(
    rows: list[dict[str, Any]],
) -> tuple[dict[str, float], dict[tuple[str, Any], int], list[list[Any]]]:
    """(task -> mean of its dialogues' scores, (task, id) -> dialogue score, dialogues left unscored)."""
    ratings: dict[tuple[str, Any], list[int]] = {}
    for row in rows:
        ratings.setdefault((row["task"], row["id"]), [])  # keeps dialogues whose turns all went unrated
        if row["rating"] is not None:
            ratings[(row["task"], row["id"])].append(row["rating"])
    dialogue = {key: min(r) for key, r in ratings.items() if r}
    by_task: dict[str, list[int]] = defaultdict(list)
    for (task, _), score in dialogue.items():
        by_task[task].append(score)
    task_means = {
        task: sum(s) / len(s) for task, s in sorted(by_task.items(), key=lambda kv: TASKS.index(kv[0]))
    }
    unscored = [[task, id_] for (task, id_), r in ratings.items() if not r]
    return task_means, dialogue, unscored


def _tokens(completions: list[Completion]) -> tuple[int, int]:
    return sum(c.prompt_tokens for c in completions), sum(c.completion_tokens for c in completions)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def run(
    model: Teacher,
    judge: Teacher,
    data: Path,
    output_dir: Path,
    *,
    model_chat: bool,
    judge_chat: bool,
    max_samples: int | None,
    max_new_tokens: int,
    judge_max_new_tokens: int,
    seed: int,
) -> JudgedOutcome:
    """Answer every judged turn of the first `max_samples` dialogues with `model`, rate each with `judge`,
    score as MT-Bench-101 does (module docstring); writes answers.jsonl, judgments.jsonl, scores.json."""
    dialogues = load(data, max_samples)
    turns = [turn for dialogue in dialogues for turn in judged_turns(dialogue)]
    greedy = Decoding.greedy_up_to(max_new_tokens)

    # 1. the model: every judged turn in one call (the teacher batches)
    prompts = [model_prompt(i, turn, model_chat) for i, turn in enumerate(turns)]
    answered = [c[0] for c in model.generate(prompts, greedy, seed)]
    answers = [c.text.strip() if model_chat else base_model_answer(c.text) for c in answered]
    failed = {i for i, c in enumerate(answered) if c.finish_reason == "error"}  # nothing to judge there
    answer_rows = [  # "turn": 1-based, as the original's turn_id
        {"task": t.task, "id": t.id, "turn": t.turn + 1, "question": t.question, "answer": answer,
         "finish_reason": c.finish_reason, "prompt_tokens": c.prompt_tokens,
         "completion_tokens": c.completion_tokens}
        for t, answer, c in zip(turns, answers, answered, strict=True)
    ]  # fmt: skip

    # 2. the judge: one call for all answered turns
    to_judge = [i for i in range(len(turns)) if i not in failed]
    judge_decoding = Decoding(
        n=1, temperature=0.0, top_p=1.0, top_k=None, max_new_tokens=judge_max_new_tokens, stop=()
    )
    judge_prompts = [judge_prompt(i, turns[i], answers[i], judge_chat) for i in to_judge]
    verdicts = dict(
        zip(to_judge, (c[0] for c in judge.generate(judge_prompts, judge_decoding, seed)), strict=True)
    )

    judgment_rows = []
    for i, turn in enumerate(turns):
        verdict = verdicts.get(i)
        error = answered[i].error if verdict is None else verdict.error
        judgment_rows.append({
            "task": turn.task, "id": turn.id, "turn": turn.turn + 1,
            "verdict": verdict.text if verdict is not None else None,
            "rating": rating(verdict.text) if verdict is not None else None,
            "error": f"{'model' if verdict is None else 'judge'}: {error}" if error else None,
        })  # fmt: skip

    # 3. the score: min over a dialogue's turns, mean per task, mean of the task means
    task_means, dialogue_scores, unscored = scores(judgment_rows)
    unrated = sum(row["rating"] is None for row in judgment_rows)
    metrics: dict[str, float] = {}
    if task_means:  # no rating at all: no score rather than a made-up one
        metrics[f"{TASK}/score"] = sum(task_means.values()) / len(task_means)
    metrics |= {f"{TASK}/{task}": mean for task, mean in task_means.items()}
    metrics |= {
        f"{TASK}/dialogues": len(dialogues),
        f"{TASK}/judged_turns": len(turns),
        f"{TASK}/unrated": unrated,
    }

    summary = {
        "score": metrics.get(f"{TASK}/score"),
        "tasks": task_means,
        "dialogues": len(dialogues),
        "judged_turns": len(turns),
        "unrated": unrated,
        "unscored_dialogues": unscored,
        "dialogue_scores": [[task, id_, s] for (task, id_), s in dialogue_scores.items()],
        "model_chat": model_chat,
        "judge_chat": judge_chat,
        "model": model.identity(),
        "judge": judge.identity(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(output_dir / "answers.jsonl", answer_rows)
    _write_jsonl(output_dir / "judgments.jsonl", judgment_rows)
    (output_dir / "scores.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")

    prefill, decode = _tokens(answered)
    judge_prefill, judge_decode = _tokens(list(verdicts.values()))
    return JudgedOutcome(
        task=TASK,
        metrics=metrics,
        prefill_tokens=prefill,
        decode_tokens=decode,
        judge_prefill_tokens=judge_prefill,
        judge_decode_tokens=judge_decode,
        judge_spend_usd=judge.spend.spent if isinstance(judge, ApiTeacher) else None,  # local: no money
        results=summary,
    )
