"""lm-eval tasks and the harness: what students are trained on is exactly what they are scored on,
scores are computed against the right answers, and the eval stage's token counts are exact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Before huggingface_hub and datasets are imported: they read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from lm_eval import simple_evaluate
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager
from transformers import LlamaConfig, LlamaForCausalLM

from dist_bench.config import PROJECT_ROOT, EvalConfig
from dist_bench.evaluation import tasks as task_plan
from dist_bench.evaluation.harness import EvalOutcome, flat_metrics, load_lm, run_lm_eval, task_specs
from dist_bench.tinyworld.data import arith_prompt, arith_target, mc_prompt, mc_target, write_corpus
from dist_bench.tinyworld.tokenizer import build_tokenizer

TASKS = ["tiny_arith", "tiny_mc"]
LIMIT = 8


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project-shaped tmp tree: the real task YAMLs, copied verbatim, next to a freshly written corpus
    where their relative data_files point (../../dist_bench/tinyworld/assets/data/)."""
    root = tmp_path_factory.mktemp("project")
    write_corpus(root / "dist_bench" / "tinyworld" / "assets" / "data")
    shutil.copytree(PROJECT_ROOT / "configs" / "tasks", root / "configs" / "tasks")
    return root


def eval_docs(root: Path, name: str) -> list[dict]:
    path = root / "dist_bench" / "tinyworld" / "assets" / "data" / f"{name}_eval.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def eval_config(root: Path, tasks: list[str] = TASKS, limit: int | None = LIMIT) -> EvalConfig:
    return EvalConfig(
        tasks=tasks, task_dir=str(root / "configs" / "tasks"), limit=limit, batch_size=8, device="cpu"
    )


def run_tasks(model: str, cfg: EvalConfig, out: Path, seed: int = 42) -> EvalOutcome:
    """What the eval stage does, less MLflow and energy: every task of cfg on one loaded model."""
    plan = task_plan.resolve(cfg)
    manager = task_plan.materialize(plan, out)
    lm = load_lm(model, cfg)
    outcomes = [run_lm_eval(lm, task.name, manager, cfg, out, seed) for task in plan.tasks]
    results = json.loads((out / "results.json").read_text())  # the last task's
    return EvalOutcome(
        metrics={k: v for o in outcomes for k, v in o.metrics.items()},
        results=results,
        prefill_tokens=sum(o.prefill_tokens for o in outcomes),
        decode_tokens=sum(o.decode_tokens for o in outcomes),
    )


def save_model(model: LlamaForCausalLM, path: Path) -> str:
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return str(path)


def tiny_llama(tie: bool = True) -> LlamaForCausalLM:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def constant_llama(token: str) -> LlamaForCausalLM:
    """A real Llama whose next token is always `token`: the layer's outputs are zeroed so the final hidden
    state is the (normalised) embedding, every embedding gets a large shared dimension 0, and only
    `token`'s row of the untied lm_head reads that dimension."""
    model = tiny_llama(tie=False)
    token_id = build_tokenizer().convert_tokens_to_ids(token)
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id, 0] = 5.0
    return model


def test_run_lm_eval_on_both_tasks(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # data paths must resolve against the YAML, not the working directory
    model = save_model(tiny_llama(), tmp_path / "model")
    outcome = run_tasks(model, eval_config(root), tmp_path / "out", seed=1)

    for key in ["tiny_arith/exact_match", "tiny_mc/acc", "tiny_mc/acc_norm"]:
        assert 0.0 <= outcome.metrics[key] <= 1.0
    assert "tiny_mc/acc_stderr" in outcome.metrics
    assert outcome.prefill_tokens > 0 and outcome.decode_tokens > 0
    assert outcome.tokens == outcome.prefill_tokens + outcome.decode_tokens
    assert outcome.results["n-samples"]["tiny_mc"]["effective"] == LIMIT
    assert "samples" not in outcome.results
    for task in TASKS:
        part = json.loads((tmp_path / "out" / "tasks" / f"{task}.json").read_text())
        assert part["task"] == task and set(part["results"]) >= {"alias"}
        assert part["config"]["task"] == task


def test_a_rank_evaluating_alone_scores_what_one_process_scores(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a multi-process job the eval stage runs on rank 0 alone; lm-eval then gets the model loaded (so it
    does not go data-parallel), and must score and count exactly as it does on its own."""
    model = save_model(tiny_llama(), tmp_path / "model")
    alone = run_tasks(model, eval_config(root), tmp_path / "alone", seed=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # distributed.launched(); no process group is needed to load
    in_a_job = run_tasks(model, eval_config(root), tmp_path / "job", seed=1)
    assert in_a_job.metrics == alone.metrics
    assert (in_a_job.prefill_tokens, in_a_job.decode_tokens) == (alone.prefill_tokens, alone.decode_tokens)


def test_token_counts_are_exact(root: Path, tmp_path: Path) -> None:
    # The model always says "\n": each generation stops after one token, and with the byte-level tokenizer
    # (no BOS) a prompt is as many tokens as bytes. A multiple-choice doc is one forward pass over the
    # prompt plus the " " its four continuations " A".." D" share (lm-eval caches the logits).
    model = save_model(constant_llama("Ċ"), tmp_path / "model")  # "Ċ" is the byte-level symbol for "\n"
    arith = run_tasks(model, eval_config(root, ["tiny_arith"]), tmp_path / "arith")
    mc = run_tasks(model, eval_config(root, ["tiny_mc"]), tmp_path / "mc")

    arith_docs, mc_docs = eval_docs(root, "arith")[:LIMIT], eval_docs(root, "mc")[:LIMIT]
    assert arith.decode_tokens == LIMIT
    assert arith.prefill_tokens == sum(len(arith_prompt(d).encode()) for d in arith_docs)
    assert mc.decode_tokens == 0
    assert mc.prefill_tokens == sum(len(mc_prompt(d).encode()) + 1 for d in mc_docs)


@pytest.mark.parametrize("letter", ["A", "C"])
def test_mc_accuracy_is_scored_against_the_right_letter(root: Path, tmp_path: Path, letter: str) -> None:
    # A model that always answers `letter` is right exactly on the docs whose answer is `letter`.
    # "C" matters: a scorer that broke ties towards the first choice would pass with "A" alone.
    model = save_model(constant_llama(letter), tmp_path / "model")
    limit = 40
    outcome = run_tasks(model, eval_config(root, ["tiny_mc"], limit=limit), tmp_path / "out")
    expected = sum(mc_target(d) == f" {letter}" for d in eval_docs(root, "mc")[:limit]) / limit
    assert 0 < expected < 1
    assert outcome.metrics["tiny_mc/acc"] == pytest.approx(expected)


def built_tasks(root: Path) -> dict:
    manager = TaskManager(include_path=str(root / "configs" / "tasks"), include_defaults=False)
    return manager.load(task_specs(TASKS, manager))["tasks"]


def test_prompts_and_targets_are_the_training_templates(root: Path) -> None:
    tasks = built_tasks(root)
    for name, prompt in [("tiny_arith", arith_prompt), ("tiny_mc", mc_prompt)]:
        tasks[name].build_all_requests(limit=20)
        for instance in tasks[name].instances:
            assert instance.args[0] == prompt(instance.doc)
    gold = [i for i in tasks["tiny_mc"].instances if i.idx == i.doc["answer"]]
    assert len(gold) == 20
    assert all(i.args[1] == mc_target(i.doc) for i in gold)
    arith_doc = tasks["tiny_arith"].eval_docs[0]
    assert tasks["tiny_arith"].doc_to_target(arith_doc) == arith_target(arith_doc).split("####")[-1].strip()


def test_fewshot_examples_are_training_records(root: Path) -> None:
    tasks = built_tasks(root)
    for task, prompt, target in [
        (tasks["tiny_arith"], arith_prompt, arith_target),
        (tasks["tiny_mc"], mc_prompt, mc_target),
    ]:
        doc, shot = task.eval_docs[0], task.fewshot_docs()[0]  # the first_n sampler takes train doc 0
        assert task.fewshot_context(doc, num_fewshot=1) == prompt(shot) + target(shot) + "\n\n" + prompt(doc)


class OracleLM(LM):
    """Answers every request from the training targets, off by `shift` to be always wrong."""

    def __init__(self, shift: int = 0) -> None:
        super().__init__()
        self.shift = shift

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        answers = []
        for request in requests:
            number = int(arith_target(request.doc).split("####")[1]) + self.shift
            answers.append(f" #### {number}")
        return answers

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        letters = "ABCD"
        right = [letters[(letters.index(mc_target(r.doc)[-1]) + self.shift) % 4] for r in requests]
        return [
            (0.0 if r.args[1] == f" {letter}" else -5.0, False)
            for r, letter in zip(requests, right, strict=True)
        ]

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError


@pytest.mark.parametrize(("shift", "score"), [(0, 1.0), (1, 0.0)])
def test_the_training_answers_score_one_and_wrong_ones_zero(root: Path, shift: int, score: float) -> None:
    manager = TaskManager(include_path=str(root / "configs" / "tasks"), include_defaults=False)
    raw = simple_evaluate(OracleLM(shift), tasks=task_specs(TASKS, manager), task_manager=manager, limit=20)
    metrics = flat_metrics(raw)
    assert metrics["tiny_arith/exact_match"] == score
    assert metrics["tiny_mc/acc"] == score


def test_unknown_task_and_missing_data_are_named(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'tiny_nope'"):
        task_plan.resolve(eval_config(root, ["tiny_nope"]))
    task_dir = tmp_path / "tasks"
    shutil.copytree(root / "configs" / "tasks", task_dir)  # ../../dist_bench/... does not exist from here
    with pytest.raises(FileNotFoundError, match=r"task 'tiny_mc': data file .*mc_train\.jsonl not found"):
        cfg = EvalConfig(tasks=["tiny_mc"], task_dir=str(task_dir))
        task_specs(["tiny_mc"], task_plan.materialize(task_plan.resolve(cfg), tmp_path / "out"))


def test_metric_names_drop_filters_unless_they_disambiguate() -> None:
    results = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.5,
                "exact_match_stderr,strict-match": 0.1,
                "exact_match,flexible-extract": 0.6,
                "exact_match_stderr,flexible-extract": "N/A",
            },
            "tiny_mc": {"acc,none": 0.25, "acc_stderr,none": float("nan"), "sample_len": 8},
        }
    }
    assert flat_metrics(results) == {
        "gsm8k/strict-match/exact_match": 0.5,
        "gsm8k/strict-match/exact_match_stderr": 0.1,
        "gsm8k/flexible-extract/exact_match": 0.6,
        "tiny_mc/acc": 0.25,
    }


def test_a_group_of_task_dir_tasks_reads_their_data_relative_to_their_yamls(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group's subtasks reach lm-eval by name, not as configs: their relative data_files must still resolve
    against their own YAML, whatever the working directory (pre-flight checks them there)."""
    task_dir = root / "configs" / "grouped"  # as deep as configs/tasks: the YAMLs' ../../ paths still hold
    shutil.copytree(root / "configs" / "tasks", task_dir, dirs_exist_ok=True)
    (task_dir / "tiny_both.yaml").write_text("group: tiny_both\ntask:\n  - tiny_arith\n  - tiny_mc\n")
    monkeypatch.chdir(tmp_path)
    model = save_model(constant_llama("A"), tmp_path / "model")
    cfg = EvalConfig(tasks=["tiny_both"], task_dir=str(task_dir), limit=LIMIT, batch_size=8, device="cpu")
    outcome = run_tasks(model, cfg, tmp_path / "out")
    mc_docs = eval_docs(root, "mc")[:LIMIT]
    assert outcome.metrics["tiny_mc/acc"] == pytest.approx(sum(mc_target(d) == " A" for d in mc_docs) / LIMIT)
    assert outcome.metrics["tiny_arith/exact_match"] == 0.0
    assert outcome.results["n-samples"]["tiny_arith"]["effective"] == LIMIT
