"""dpo_training through trl.DPOTrainer on preference pairs (preferences.path): the policy moves and its
margins on the training pairs rise; the shared token budget rule plans the steps; a killed stage resumes
bit-for-bit; bad pairs stop pre-flight with one line naming the file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_preflight import assert_rejected, dist_bench
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import PROJECT, SMALL, small_config
from dist_bench import pipeline, tinyworld
from dist_bench.dataset import read_records
from dist_bench.student import dpo

SFT_CONFIG = str(PROJECT / "configs/experiments/tiny_sft.yaml")


def write_pairs(workdir: Path, count: int = 48) -> Path:
    """Right against wrong answers to the tiny world's arithmetic prompts ('#### n' against '#### n+1')."""
    records = [r for r in read_records(small_config(workdir).data) if "####" in (r.completion or "")]
    rows = [
        {
            "prompt": r.prompt,
            "chosen": r.completion,
            "rejected": f" #### {int(r.completion.split('####')[1]) + 1}",
        }
        for r in records[:count]
    ]
    path = workdir / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def dpo_config(workdir: Path, pairs: Path, *more: str) -> object:
    return small_config(
        workdir, "pipeline=dpo", f"preferences.path={pairs}", "train.optimizer.lr=0.001", *more
    )


@torch.no_grad()
def margins(model_dir: str, rows: list[dict]) -> torch.Tensor:
    """log p(chosen | prompt) - log p(rejected | prompt) for each pair, under the model at model_dir."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def logp(prompt: str, answer: str) -> float:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer)["input_ids"]
        logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        targets = torch.tensor(ids[1:])
        return float(logits.gather(1, targets[:, None])[len(prompt_ids) - 1 :].sum())

    return torch.tensor([logp(r["prompt"], r["chosen"]) - logp(r["prompt"], r["rejected"]) for r in rows])


def test_dpo_moves_the_policy_toward_the_chosen_answers(workdir: Path) -> None:
    pairs = write_pairs(workdir)
    parent = pipeline.dpo(dpo_config(workdir, pairs, "train.max_steps=12"))
    assert [s.stage for s in parent.stages] == ["dpo_training", "eval"]
    stage = parent.stages[0]
    init = tinyworld.resolve("tinyworld:student-init")
    before = AutoModelForCausalLM.from_pretrained(init).state_dict()
    after = AutoModelForCausalLM.from_pretrained(stage.outputs["final_policy"]).state_dict()
    assert all(not torch.equal(before[name], after[name]) for name in before)  # every tensor moved
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    gained = margins(str(stage.outputs["final_policy"]), rows) - margins(init, rows)
    assert gained.mean() > 0.5 and (gained > 0).float().mean() > 0.8  # the training pairs' margins rose
    metrics = stage.metrics
    assert metrics["steps"] == 12 and metrics["pairs"] == len(rows) >= 20
    assert metrics["final_train_rewards_margins"] > 0 and metrics["final_train_rewards_accuracies"] > 0.5
    assert metrics["tokens"] == metrics["policy_tokens"] + metrics["reference_tokens"]
    assert metrics["reference_tokens"] == metrics["policy_tokens"]  # the reference reads every step's pairs


def test_the_token_budget_plans_the_steps(workdir: Path) -> None:
    pairs = write_pairs(workdir)
    parent = pipeline.dpo(dpo_config(workdir, pairs, "train.token_budget=3000", "train.max_steps=null"))
    stage = parent.stages[0]
    per_step = stage.metrics["policy_tokens"] / stage.metrics["steps"]
    assert 3000 <= stage.metrics["policy_tokens"] < 3000 + per_step  # stops at the first step past it


def test_a_precomputed_reference_reads_every_pair_once(workdir: Path) -> None:
    pairs = write_pairs(workdir)
    cfg = dpo_config(workdir, pairs, "train.max_steps=2", "dpo.precompute_ref_log_probs=true")
    metrics = pipeline.dpo(cfg).stages[0].metrics
    # two steps of 8 pairs < all pairs: the up-front reference pass read more than the policy did
    assert metrics["reference_tokens"] > metrics["policy_tokens"] > 0
    assert metrics["tokens"] == metrics["policy_tokens"] + metrics["reference_tokens"]


def test_a_killed_dpo_stage_resumes_to_the_same_policy(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = write_pairs(workdir)
    steps = ["train.max_steps=8", "train.checkpoint_every=4"]
    reference = pipeline.dpo(dpo_config(workdir, pairs, *steps, f"output.run_dir={workdir / 'reference'}"))
    expected = (reference.stages[0].outputs["final_policy"] / "model.safetensors").read_bytes()

    saves: list[int] = []
    real_on_save = dpo.DPOMetricsCallback.on_save

    def save_then_die(self: dpo.DPOMetricsCallback, args: object, state: object, *rest: object, **kw: object):
        real_on_save(self, args, state, *rest, **kw)
        saves.append(state.global_step)  # type: ignore[attr-defined]
        if len(saves) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(dpo.DPOMetricsCallback, "on_save", save_then_die)
    cfg = dpo_config(workdir, pairs, *steps)
    with pytest.raises(KeyboardInterrupt):
        pipeline.dpo(cfg)
    resumed = pipeline.dpo(cfg)
    assert saves == [4, 8] and resumed.stages[0].summary["resumed"]
    assert (resumed.stages[0].outputs["final_policy"] / "model.safetensors").read_bytes() == expected


@pytest.mark.parametrize(
    ("content", "culprit"),
    [
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n',
         ["pairs.jsonl:2", "chosen"]),
        ('{"prompt": "a", "chosen": "b"}\n', ["pairs.jsonl:1", "rejected"]),
    ],
)  # fmt: skip
def test_bad_pairs_stop_preflight(tmp_path: Path, content: str, culprit: list[str]) -> None:
    (tmp_path / "pairs.jsonl").write_text(content)
    done = dist_bench(
        tmp_path,
        "dpo",
        "--config",
        SFT_CONFIG,
        *SMALL,
        "pipeline=dpo",
        f"preferences.path={tmp_path / 'pairs.jsonl'}",
    )
    assert_rejected(done, tmp_path, "preferences.path", *culprit)


def test_dpo_without_pairs_stops_preflight(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "dpo", "--config", SFT_CONFIG, *SMALL, "pipeline=dpo")
    assert_rejected(done, tmp_path, "preferences.path")
