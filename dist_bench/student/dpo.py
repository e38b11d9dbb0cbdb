"""Stage `dpo_training`: the policy learns the teacher's preferences through `trl.DPOTrainer`, inside the
stage's energy window.

    dist-bench dpo --config configs/experiments/<experiment>.yaml      (preferences.path: existing pairs)

Everything but the loss is the shared student trainer's (student/trainer.py): optimizer, schedule,
precision, checkpoints (a killed stage resumes from the newest complete one), logging into the stage
run, and the token budget rule: steps are planned in advance, seeded, until `train.token_budget` tokens
have gone through the policy. A pair counts its prompt twice (once before each answer) plus both answers:
what DPO's forward processes. The reference model's forward passes (every step, or one pass up front with
dpo.precompute_ref_log_probs) process the same tokens again and are counted as `reference_tokens`; the
stage's `tokens` is both. The final policy is `final_policy/`, loadable with from_pretrained.
"""

from __future__ import annotations

import shutil
from typing import Any

from datasets import Dataset
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback
from trl import DPOConfig, DPOTrainer

from dist_bench import models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import data_fingerprint
from dist_bench.generation.pairs import read_pairs
from dist_bench.student.trainer import (
    PlannedOrder,
    last_complete_checkpoint,
    plan_by_length,
    shared_arguments,
)
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "dpo_training"
TOKEN_COUNTING = (
    "tokens = policy_tokens + reference_tokens; a pair counts its prompt twice plus both answers (what the "
    "forward processes, no padding); reference_tokens: the reference model's passes over the same pairs"
)
LOGGED = ("loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/margins",
          "rewards/accuracies", "logps/chosen", "logps/rejected")  # fmt: skip


def run(parent: ParentRun) -> StageResult:
    cfg = parent.cfg
    prefs = cfg.preferences
    pairs_source = cfg.data.model_copy(
        update={"train": prefs.path, "split": prefs.split, "subset": prefs.subset}
    )
    params = {
        **flatten(cfg.student.model_dump(), "student."),
        **flatten(cfg.train.model_dump(), "train."),
        **flatten(cfg.dpo.model_dump(), "dpo."),
        **flatten(prefs.model_dump(), "preferences."),
        "data.max_length": str(cfg.data.max_length),
        "preferences.fingerprint": data_fingerprint(pairs_source),
        "student.fingerprint": models.fingerprint(cfg.student.model, cfg.student.revision),
        "seed": str(cfg.seed),
        "device": models.pick_device(cfg.train.device).type,
    }
    return execute_stage(
        parent, STAGE, params, lambda ctx: train(cfg, ctx), tags={"dist_bench.student": cfg.student.model}
    )


class PolicyTrainer(DPOTrainer):
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

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        metrics = {f"train/{k}": float(v) for k, v in (logs or {}).items() if k in LOGGED}
        if metrics:
            self.last.update(metrics)
            self.ctx.log_metrics(metrics, step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.ctx.commit_energy()


def train(cfg: RunConfig, ctx: StageContext) -> StageWork:
    device = models.pick_device(cfg.train.device)
    tokenizer = models.load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    pairs = Dataset.from_list(read_pairs(cfg.preferences.path, split=cfg.preferences.split,
                                         subset=cfg.preferences.subset))  # fmt: skip
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
        loss_type=[cfg.dpo.loss_type],
        precompute_ref_log_probs=cfg.dpo.precompute_ref_log_probs,
        max_length=cfg.data.max_length,
        dataloader_pin_memory=device.type == "cuda",
    )
    callback = DPOMetricsCallback(ctx)
    trainer = PolicyTrainer(
        model=policy, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.remove_callback(PrinterCallback)
    # TRL tokenized the pairs (prompt_ids, chosen_ids, rejected_ids, truncated to max_length): plan on them
    lengths = [_pair_tokens(row) for row in trainer.train_dataset]
    trainer.plan = plan_by_length(lengths, cfg)
    trainer.args.max_steps = len(trainer.plan)
    trainer.train(
        resume_from_checkpoint=str(last) if (last := last_complete_checkpoint(checkpoints)) else None
    )

    final_dir = ctx.stage_dir / "final_policy"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    trainer.save_model(str(final_dir))
    steps = trainer.state.global_step
    policy_tokens = sum(lengths[i] for step in trainer.plan[:steps] for micro in step for i in micro)
    reference_tokens = sum(lengths) if cfg.dpo.precompute_ref_log_probs else policy_tokens
    return StageWork(
        tokens=policy_tokens + reference_tokens,
        outputs={"final_policy": final_dir},
        fingerprints={"final_policy": models.fingerprint(str(final_dir))},
        metrics={
            "steps": steps,
            "pairs": len(pairs),
            "policy_tokens": policy_tokens,
            "reference_tokens": reference_tokens,
            **{f"final_{k.replace('/', '_')}": v for k, v in callback.last.items()},
        },
        details={"steps": steps, "method": "dpo", "token_counting": TOKEN_COUNTING},
    )


def _pair_tokens(row: dict[str, Any]) -> int:
    prompt, chosen, rejected = (len(row[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return 2 * prompt + chosen + rejected
