"""The tiny world's task corpus: generated, deterministic, with disjoint train and eval splits.

Two tasks in the formats of the benchmarks they stand in for, so the lm-eval task YAMLs in
`configs/tasks/` score them the way GSM8K and MMLU are scored:
- `tiny_arith` (GSM8K format): {"question": "What is 27 + 15?", "answer": "#### 42"}; exact match on
  the number after "####".
- `tiny_mc` (MMLU format): {"question": ..., "choices": [4 strings], "answer": index}; accuracy by
  log-likelihood of " A"/" B"/" C"/" D".
`kd_train.jsonl` renders both train splits as {"prompt", "completion"} with the same templates the task
YAMLs use (a test checks they agree), which is what teachers are cached on and students trained on;
`kd_arith.jsonl` is its arithmetic records alone.
Regenerate with `python -m dist_bench.tinyworld.build --data-only`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ARITH_MAX = 49  # operands 0..ARITH_MAX
MC_LETTERS = ("A", "B", "C", "D")
EVAL_SIZE = 200


def arith_prompt(doc: dict) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def arith_target(doc: dict) -> str:
    return " " + doc["answer"]


def mc_prompt(doc: dict) -> str:
    options = "".join(
        f"{letter}. {choice}\n" for letter, choice in zip(MC_LETTERS, doc["choices"], strict=False)
    )
    return f"{doc['question']}\n{options}Answer:"


def mc_target(doc: dict) -> str:
    return " " + MC_LETTERS[doc["answer"]]


def arith_docs(seed: int) -> tuple[list[dict], list[dict]]:
    """Every (a, b) pair once; a fixed random EVAL_SIZE of them held out for evaluation."""
    pairs = [(a, b) for a in range(ARITH_MAX + 1) for b in range(ARITH_MAX + 1)]
    random.Random(seed).shuffle(pairs)
    # Zero-padded operands put every digit at a fixed distance from the "?", which is what lets a
    # two-layer student pick up digit-wise addition within a minute of CPU training.
    docs = [{"question": f"What is {a:02d} + {b:02d}?", "answer": f"#### {a + b}"} for a, b in pairs]
    return docs[EVAL_SIZE:], docs[:EVAL_SIZE]


def mc_docs(seed: int, train_size: int = 2000) -> tuple[list[dict], list[dict]]:
    """'Which number is the largest?' over four distinct numbers; no choice tuple in both splits."""
    rng = random.Random(seed + 1)
    seen: set[tuple[int, ...]] = set()
    docs: list[dict] = []
    while len(docs) < train_size + EVAL_SIZE:
        numbers = tuple(rng.sample(range(10), 4))
        if numbers in seen:
            continue
        seen.add(numbers)
        docs.append(
            {
                "question": "Which number is the largest?",
                "subject": "tiny_numbers",
                "choices": [str(n) for n in numbers],
                "answer": numbers.index(max(numbers)),
            }
        )
    return docs[EVAL_SIZE:], docs[:EVAL_SIZE]


def kd_records(arith_train: list[dict], mc_train: list[dict], seed: int) -> list[dict]:
    """Both train splits as prompt/completion pairs, interleaved in a fixed random order."""
    records = [{"prompt": arith_prompt(d), "completion": arith_target(d)} for d in arith_train]
    records += [{"prompt": mc_prompt(d), "completion": mc_target(d)} for d in mc_train]
    random.Random(seed + 2).shuffle(records)
    return records


def write_corpus(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write every split as JSON lines under out_dir; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    arith_train, arith_eval = arith_docs(seed)
    mc_train, mc_eval = mc_docs(seed)
    files = {
        "arith_train": arith_train,
        "arith_eval": arith_eval,
        "mc_train": mc_train,
        "mc_eval": mc_eval,
        "kd_train": kd_records(arith_train, mc_train, seed),
        # kd_train's arithmetic half, in its order: prompts with one checkable answer (tiny_dpo's pairs)
        "kd_arith": [
            r for r in kd_records(arith_train, mc_train, seed) if r["completion"].startswith(" ####")
        ],
    }
    paths = {}
    for name, rows in files.items():
        path = out_dir / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
        paths[name] = path
    return paths
