"""Stage `dpo_training`: the policy learns the teacher's preferences through `trl.DPOTrainer`, inside the
stage's energy window.

    dist-bench dpo --config configs/experiments/tiny_dpo.yaml    (pairs from teacher_generation first)

The pairs come from the teacher_generation stage in preference mode (teacher/preferences.py), or from
preferences.path. dpo.heldout_pairs of them (a seeded draw) are kept out of training; after it, the
policy's reward accuracy and margins on them are `heldout/rewards/*`: does it prefer what the teacher
prefers on pairs it never saw?

Everything but the loss is the shared student trainer's (student/trainer.py): optimizer, schedule,
precision, checkpoints (a killed stage resumes from the newest complete one), logging into the stage
run, and the token budget rule: steps are planned in advance, seeded, until `train.token_budget` tokens
have gone through the policy. A pair counts its prompt twice (once before each answer) plus both answers:
what DPO's forward processes. The reference model's forward passes (every step, or one pass up front with
dpo.precompute_ref_log_probs) process the same tokens again and are counted as `reference_tokens`; the
stage's `tokens` is both. The final policy is `final_policy/`, loadable with from_pretrained.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from dist_bench import distributed, models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import data_fingerprint
from dist_bench.errors import DataError
from dist_bench.generation.pairs import read_pairs
from dist_bench.student.masks import MasksWithoutSync
from dist_bench.student.trainer import (
    BudgetProgress,
    LeanLastCheckpoint,
    PlannedOrder,
    plan_by_length,
    resume_point,
    save_final,
    shared_arguments,
)
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "dpo_training"
TOKEN_COUNTING = (
    "tokens = policy_tokens + reference_tokens + 2 x held-out pair tokens; a pair counts its prompt twice "
    "plus both answers (what the forward processes, no padding); reference_tokens: the reference model's "
    "passes over the same pairs; held-out pairs: one policy and one reference pass after training"
)
LOGGED = ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
          "rewards/accuracies", "logps/chosen", "logps/rejected")  # fmt: skip


def run(parent: ParentRun, generated: StageResult | None = None) -> StageResult:
    """`generated`: the teacher_generation stage that built the pairs (preferences.method); None: the pairs
    are preferences.path's."""
    cfg = parent.cfg
    prefs = cfg.preferences
    if generated is not None:
        pairs = PairsSource(str(generated.outputs["pairs"]), "train", None)
        source_params = {"preferences.fingerprint": generated.fingerprints["pairs"]}
    else:
        pairs = PairsSource(prefs.path, prefs.split, prefs.subset)  # type: ignore[arg-type]
        source = cfg.data.model_copy(
            update={"train": prefs.path, "split": prefs.split, "subset": prefs.subset}
        )
        source_params = {
            **flatten(prefs.model_dump(include={"path", "split", "subset"}), "preferences."),
            "preferences.fingerprint": data_fingerprint(source),
        }
    params = {
        **flatten(cfg.student.model_dump(), "student."),
        **flatten(cfg.train.model_dump(), "train."),
        **flatten(cfg.dpo.model_dump(), "dpo."),
        **source_params,
        "data.max_length": str(cfg.data.max_length),
        "student.fingerprint": models.fingerprint(cfg.student.model, cfg.student.revision),
        "seed": str(cfg.seed),
        "device": models.pick_device(cfg.train.device).type,
    }
    return execute_stage(
        parent,
        STAGE,
        params,
        lambda ctx: train(cfg, ctx, pairs),
        tags={"dist_bench.student": cfg.student.model},
        data_parallel=True,  # every rank trains (DDP through TRL), an optimizer step being the plan's
    )


@dataclass(frozen=True)
class PairsSource:
    """Where the pairs are read from (read_pairs' arguments)."""

    path: str
    split: str
    subset: str | None


def split_heldout(n_pairs: int, heldout: int, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) pair indices, each ascending: `heldout` drawn with the run's seed."""
    if heldout >= n_pairs:
        raise DataError(f"dpo.heldout_pairs: {heldout} held out of {n_pairs} pairs leaves none to train on")
    held = set(random.Random(seed).sample(range(n_pairs), heldout))
    return [i for i in range(n_pairs) if i not in held], sorted(held)


class PolicyTrainer(MasksWithoutSync, LeanLastCheckpoint, DPOTrainer):
    """DPOTrainer over the planned batches (the same seeded, budgeted plan as the other methods)."""

    plan: list[list[list[int]]]  # set once TRL has tokenized the pairs

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler[int]:
        return PlannedOrder(self.plan)


class DPOMetricsCallback(TrainerCallback):
    """`train/*` step metrics (loss, rewards/*, logps/*) into the stage's run; energy committed with every
    checkpoint, as StageMetricsCallback does for kd and sft."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.last: dict[str, float] = {}
        self.heldout: dict[str, float] = {}  # heldout/<metric>: the evaluation on the held-out pairs

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        logs = logs or {}
        metrics = {f"train/{k}": float(v) for k, v in logs.items() if k in LOGGED}
        if metrics:
            self.last.update(metrics)
            self.ctx.log_metrics(metrics, step=state.global_step)
        heldout = {
            f"heldout/{k[5:]}": float(v) for k, v in logs.items() if k[5:] in LOGGED and k[:5] == "eval_"
        }
        if heldout:
            self.heldout.update(heldout)
            self.ctx.log_metrics(heldout, step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ctx.commit_energy()


def train(cfg: RunConfig, ctx: StageContext, source: PairsSource) -> StageWork:
    device = models.pick_device(cfg.train.device)
    tokenizer = models.load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    every_pair = read_pairs(source.path, split=source.split, subset=source.subset)
    training, heldout = split_heldout(len(every_pair), cfg.dpo.heldout_pairs, cfg.seed)
    pairs = Dataset.from_list([every_pair[i] for i in training])
    heldout_pairs = Dataset.from_list([every_pair[i] for i in heldout]) if heldout else None
    policy = models.load_model(
        cfg.student.model,
        device,
        "bfloat16" if cfg.train.precision == "bf16_pure" else "float32",
        cfg.student.revision,
        cfg.student.trust_remote_code,
        attn_implementation=cfg.train.attn_implementation,
    )
    checkpoints = ctx.stage_dir / "checkpoints"
    args = DPOConfig(
        **shared_arguments(cfg, checkpoints, 1, device),  # max_steps set from the plan below
        beta=cfg.dpo.beta,
        loss_type=cfg.dpo.losses(),
        loss_weights=cfg.dpo.loss_weights,
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        max_length=cfg.data.max_length,
        pad_to_multiple_of=cfg.train.pad_to_multiple_of,
    )
    callback = DPOMetricsCallback(ctx)
    trainer = PolicyTrainer(
        model=policy,
        args=args,
        train_dataset=pairs,
        eval_dataset=heldout_pairs,  # given here: with precompute_ref_log_probs its reference pass is now
        processing_class=tokenizer,
        callbacks=[callback],
    )
    trainer.remove_callback(PrinterCallback)
    # TRL tokenized the pairs (prompt_ids, chosen_ids, rejected_ids, truncated to max_length): plan on them
    lengths = [_pair_tokens(row) for row in trainer.train_dataset]
    trainer.plan = plan_by_length(lengths, cfg)
    trainer.args.max_steps = len(trainer.plan)
    per_step = (sum(lengths[i] for micro in step for i in micro) for step in trainer.plan)
    trainer.add_callback(BudgetProgress(STAGE, list(itertools.accumulate(per_step))))
    trainer.train(resume_from_checkpoint=resume_point(checkpoints))

    heldout_tokens = 0
    if heldout_pairs is not None:  # the trained policy's preferences on pairs it never saw
        trainer.evaluate()
        heldout_tokens = sum(_pair_tokens(row) for row in trainer.eval_dataset)

    final_dir = ctx.stage_dir / "final_policy"
    save_final(trainer, final_dir)
    if not distributed.is_main():
        return StageWork(tokens=0, outputs={}, fingerprints={})
    steps = trainer.state.global_step
    policy_tokens = sum(lengths[i] for step in trainer.plan[:steps] for micro in step for i in micro)
    reference_tokens = sum(lengths) if cfg.dpo.precompute_ref_log_probs else policy_tokens
    return StageWork(
        tokens=policy_tokens + reference_tokens + 2 * heldout_tokens,  # held out: policy and reference
        outputs={"final_policy": final_dir},
        fingerprints={},
        hash_after={"final_policy": final_dir},
        metrics={
            "steps": steps,
            "pairs": len(pairs),
            "policy_tokens": policy_tokens,
            "reference_tokens": reference_tokens,
            "heldout_pairs": len(heldout),
            **callback.heldout,
            **{f"final_{k.replace('/', '_')}": v for k, v in callback.last.items()},
        },
        details={"steps": steps, "method": "dpo", "token_counting": TOKEN_COUNTING},
    )


def _pair_tokens(row: dict[str, Any]) -> int:
    prompt, chosen, rejected = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return 2 * prompt + chosen + rejected
