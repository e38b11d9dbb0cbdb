"""AlpacaEval 2 through the `alpaca-eval` package, with the evaluated model and the judge both `Teacher`s.

    outcome = alpaca_eval.run(model, judge, Path("alpaca_eval_gpt4_baseline.json"), out_dir, ...)

The flow of `run`, top to bottom:
1. The eval set is read from a local file in AlpacaEval's own schema (the JSON list of tatsu-lab/alpaca_eval's
   `alpaca_eval_gpt4_baseline.json`, or JSON lines of its records): `instruction`, `output` (the reference
   model's answer), `generator`, `dataset`; the first `max_samples`. The references come from this file only:
   alpaca_eval's default reference loads a dataset script, which datasets>=4 refuses.
2. The evaluated model answers each instruction (greedy, as a text or as one user turn) -> model_outputs.json
   in alpaca_eval's format (instruction, output, generator); outputs are stripped as alpaca_eval does.
3. alpaca_eval's PairwiseAnnotator compares each answer with the reference using AlpacaEval 2's annotator
   prompt (the template of `weighted_alpaca_eval_gpt4_turbo` / `alpaca_eval_clf_gpt4_turbo`: the judge answers
   "m" or "M"). The judge is plugged in as the annotator's `fn_completions`, which alpaca_eval accepts as a
   callable (decoders.get_fn_completions passes one through). Which answer is shown first is randomised per
   instruction by alpaca_eval's own processor, seeded with `seed`; identical answers are a draw unjudged.
4. The verdict is parsed from the judge's TEXT with alpaca_eval's regex_parser: an answer starting with the
   identifier "m" or "M" prefers that output; anything else is unparsed (no preference, which alpaca_eval
   leaves out of the win rate). AlpacaEval 2 proper reads the judge's log-probabilities of m / M (a weighted
   preference); the Teacher interface returns text, so this is the non-weighted (binary) preference, as in
   `alpaca_eval_clf_gpt4_turbo` with is_binarize.
5. Metrics from alpaca_eval.metrics.get_length_controlled_winrate: win rate, standard error, n_wins / n_draws /
   n_total and the length-controlled win rate. Its GLM (length_controlled_v1) needs `df_gamed.csv` from the
   Hub; where that cannot be had (offline, not cached) the GLM is alpaca_eval's `length_controlled_minimal`
   (length term only, no instruction difficulty) fitted with alpaca_eval's own helpers, and `results` says so.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from dist_bench.evaluation.judged import JudgedOutcome
from dist_bench.teacher.interface import Completion, Decoding, Prompt, Teacher

TASK = "alpaca_eval"
ANNOTATOR = "alpaca_eval_clf_text"  # AlpacaEval 2's classifier prompt, verdict read from text
TEMPLATE = "alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt"  # under alpaca_eval's evaluators_configs
# The first non-space character is the identifier, alone (not the start of a word such as "model"); the
# rest is consumed so that regex_parser, which searches again after a match, finds exactly one verdict.
VERDICTS = {1: r"\A\s*m(?![A-Za-z0-9_])[\s\S]*", 2: r"\A\s*M(?![A-Za-z0-9_])[\s\S]*"}

log = logging.getLogger(__name__)


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
    ae = _import_alpaca_eval()  # lazily: the eval stage imports this module even when the task is off
    import pandas as pd

    # 1. the eval set, with the reference outputs
    output_dir.mkdir(parents=True, exist_ok=True)
    records = read_eval_set(data)[:max_samples]
    reference = pd.DataFrame(records)

    # 2. the evaluated model's answers
    instructions = list(reference["instruction"])
    answers = [
        c[0]
        for c in model.generate(
            _prompts(instructions, model_chat), Decoding.greedy_up_to(max_new_tokens), seed
        )
    ]
    generator = model.identity().get("model", "model")
    outputs = [
        {"instruction": i, "output": a.text.strip(), "generator": generator}
        | ({"dataset": r["dataset"]} if "dataset" in r else {})
        for i, a, r in zip(instructions, answers, records, strict=True)
    ]
    _write_json(output_dir / "model_outputs.json", outputs)

    # 3-4. the judge, through alpaca_eval's annotator
    judged: list[Completion] = []
    # alpaca_eval caches annotations next to its config, inside its package dir by default (maybe read-only,
    # and shared by every run): here under output_dir, keyed by the judge and the seed (which orders each
    # pair), so that another judge or order is not served these
    cache = output_dir / f"annotations_cache_{_slug(judge.identity(), judge_max_new_tokens, seed)}.json"
    annotator = ae.annotators.PairwiseAnnotator(
        annotators_config=_annotator_config(ae, output_dir),
        seed=seed,
        fn_completions=_judge_fn(judge, judge_chat, judge_max_new_tokens, seed, judged),
        caching_path=cache,
    )
    annotated = annotator.annotate_head2head(
        outputs_1=reference, outputs_2=pd.DataFrame(outputs), is_ordered=True
    )
    # a DataFrame in eval-set order: its index is the instruction's position, which the LC GLM reads
    # (instruction difficulty) and where it adds each row's `glm_preference`
    annotations = pd.DataFrame(annotated)
    # unparsed verdicts are None: with none parsed the column is of objects, which alpaca_eval's metrics
    # cannot round (pandas >= 3); as floats they are NaN, which its metrics leave out
    annotations["preference"] = annotations["preference"].astype(float)

    # 5. metrics
    scores, glm = _length_controlled(ae, annotations, output_dir / "lc_weights")
    scores["avg_length"] = int(pd.Series([o["output"] for o in outputs]).str.len().mean())
    scores["unparsed"] = int(annotations["preference"].isna().sum())
    names = ("win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error", "n_wins")
    names += ("n_draws", "n_total", "avg_length", "unparsed")
    metrics = {f"{TASK}/{k}": float(scores[k]) for k in names if k in scores}
    annotations.to_json(output_dir / "annotations.json", orient="records", indent=2)
    # alpaca_eval keeps no raw answer of an unparsed verdict: the judge's answers as they came
    _write_json(output_dir / "judge_completions.json", [asdict(c) for c in judged])
    _write_json(output_dir / "leaderboard.json", {generator: {k: _plain(v) for k, v in scores.items()}})

    judge_spend = judge.spend.spent if hasattr(judge, "spend") else None  # an ApiTeacher's; None if local
    results = {
        "metrics": metrics,
        "generator": generator,
        "reference_generator": str(reference["generator"].iloc[0]) if len(reference) else None,
        "annotator": ANNOTATOR,
        "verdict": "text (binary preference; AlpacaEval 2 proper weights by the judge's logprobs)",
        "length_controlled_glm": glm,
        "n_instructions": len(records),
        "model_failures": sum(a.finish_reason == "error" for a in answers),
        "judge_failures": sum(c.finish_reason == "error" for c in judged),
        "model": model.identity(),
        "judge": judge.identity(),
    }
    _write_json(output_dir / "results.json", results)
    return JudgedOutcome(
        task=TASK,
        metrics=metrics,
        prefill_tokens=sum(a.prompt_tokens for a in answers),
        decode_tokens=sum(a.completion_tokens for a in answers),
        judge_prefill_tokens=sum(c.prompt_tokens for c in judged),
        judge_decode_tokens=sum(c.completion_tokens for c in judged),
        judge_spend_usd=judge_spend,
        results=results,
    )


def read_eval_set(path: Path) -> list[dict[str, Any]]:
    """AlpacaEval records from a JSON list (the Hub file as it is) or from JSON lines."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _import_alpaca_eval() -> types.ModuleType:
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        # alpaca_eval/utils.py does `import pkg_resources`, which setuptools no longer ships (>= 81); it
        # uses only parse_version and get_distribution(name).version, which these two provide
        from packaging.version import parse

        def get_distribution(name: str) -> types.SimpleNamespace:
            return types.SimpleNamespace(version=importlib.metadata.version(name))

        shim = types.ModuleType("pkg_resources")
        shim.__dict__.update(parse_version=parse, get_distribution=get_distribution)
        sys.modules["pkg_resources"] = shim
    level = logging.getLogger().level
    import alpaca_eval
    import alpaca_eval.annotators
    import alpaca_eval.metrics.glm_winrate

    # alpaca_eval's annotators/base.py sets the ROOT logger to INFO on import: every library's info
    # messages would flood the stage's log
    logging.getLogger().setLevel(level)
    return alpaca_eval


def _annotator_config(ae: types.ModuleType, output_dir: Path) -> Path:
    """AlpacaEval 2's prompt with the text parser, as an annotator config file (a PairwiseAnnotator reads its
    config from a path, and names the annotator after the config's key)."""
    import yaml

    template = Path(ae.constants.EVALUATORS_CONFIG_DIR) / TEMPLATE
    config = {
        ANNOTATOR: {
            "prompt_template": str(template),
            "fn_completion_parser": "regex_parser",
            "completion_parser_kwargs": {"outputs_to_match": VERDICTS},
            "batch_size": 1,  # one comparison per prompt, as AlpacaEval 2
        }
    }
    path = output_dir / "annotator" / ANNOTATOR / "configs.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _judge_fn(judge: Teacher, chat: bool, max_new_tokens: int, seed: int, judged: list[Completion]) -> Any:
    """alpaca_eval's completion function: prompts in, {"completions": texts, ...} out. Its prompts are ChatML
    (a system and a user turn); a chat judge gets those messages, a base model their text."""
    from alpaca_eval.utils import prompt_to_chatml

    def completions(prompts: list[str], **_: Any) -> dict[str, list]:
        started = time.monotonic()
        conversations = [prompt_to_chatml(p) for p in prompts]
        if chat:
            batch = [Prompt(i, messages=m) for i, m in enumerate(conversations)]
        else:  # the user turn ends with "## Best Model Identifier": a base model continues from there
            batch = [
                Prompt(i, text="\n\n".join(t["content"] for t in m) + "\n")
                for i, m in enumerate(conversations)
            ]
        out = [c[0] for c in judge.generate(batch, Decoding.greedy_up_to(max_new_tokens), seed)]
        judged.extend(out)
        per_example = (time.monotonic() - started) / max(1, len(prompts))
        return {"completions": [c.text for c in out], "time_per_example": [per_example] * len(out)}

    return completions


def _length_controlled(ae: types.ModuleType, annotations: Any, weights_dir: Path) -> tuple[dict, str]:
    """alpaca_eval's win rate and length-controlled win rate, and which GLM gave the latter."""
    glm = ae.metrics.glm_winrate
    try:  # weights go under output_dir: "auto" would write them into alpaca_eval's package dir
        return glm.get_length_controlled_winrate(
            annotations, save_weights_dir=weights_dir
        ), "length_controlled_v1"
    except OSError as err:  # the Hub's df_gamed.csv is out of reach (huggingface_hub's errors are OSErrors)
        why = f"length_controlled_minimal: the Hub's df_gamed.csv is unavailable ({type(err).__name__})"
    except ValueError as err:  # too few parsed verdicts for the GLM's 5-fold fit
        return {**glm.get_winrate(annotations), "length_controlled_winrate": np.nan}, f"none: {err}"
    log.warning("alpaca_eval: LC win rate from %s; not comparable with the public leaderboard", why)
    import pandas as pd

    # alpaca_eval's featurisation (glm_winrate._get_featurized_data) without the Hub's data: the formula
    # of its `length_controlled_minimal` GLM, fitted by its own helpers
    info = glm.GLM_INFO["length_controlled_minimal"]
    delta = annotations["output_1"].str.len() - annotations["output_2"].str.len()
    preference = annotations["preference"].astype(float).replace({0.0: 1.5}) - 1
    train = pd.DataFrame({"preference": preference, "std_delta_len": delta / delta.std()})
    train["not_gamed_baseline"] = True
    test = train[["not_gamed_baseline"]].assign(std_delta_len=0.0)
    scores = glm.get_winrate(annotations)
    try:
        xy, x_test = glm.make_dmatrix_for_model(train, test, formula=info["formula"])
        fitted = glm.fit_LogisticRegressionCV(xy[xy["preference"].notna()], "preference", **info["kwargs"])
    except ValueError as err:
        return {**scores, "length_controlled_winrate": np.nan}, f"none: {err}"
    predicted = pd.Series(fitted.predict_proba(x_test)[:, 1])
    annotations["glm_preference"] = predicted.to_numpy()
    scores |= {
        "length_controlled_winrate": predicted.mean() * 100,
        "lc_standard_error": predicted.sem() * 100,
    }
    return scores, why


def _prompts(texts: list[str], chat: bool) -> list[Prompt]:
    if chat:
        return [Prompt(i, messages=[{"role": "user", "content": t}]) for i, t in enumerate(texts)]
    return [Prompt(i, text=t) for i, t in enumerate(texts)]


def _slug(identity: dict[str, str], max_new_tokens: int, seed: int) -> str:
    material = json.dumps({"judge": identity, "max_new_tokens": max_new_tokens, "seed": seed}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def _plain(value: Any) -> Any:
    """numpy scalars -> Python numbers (json cannot write them)."""
    return value.item() if isinstance(value, np.generic) else value


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=_plain), encoding="utf-8")
