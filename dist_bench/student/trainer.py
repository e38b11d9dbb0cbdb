"""The student trainer of every pipeline: TRL's `SFTTrainer`, and a subclass of it for KD from a top-k cache.

    trainer = build_trainer(cfg, model, tokenizer, examples, plan, output_dir, cache=None)   # SFT
    trainer = build_trainer(cfg, model, tokenizer, examples, plan, output_dir, cache=cache)  # KD
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(output_dir))

One trainer family, so the table compares methods and not training loops: KD and SFT students share the
optimizer (fused AdamW on CUDA), precision, attention kernels, scheduler, batch plan, token budget and
checkpointing; only the loss differs.
- SFT: TRL's loss (negative log-likelihood through its fused log-prob kernel: no full-vocabulary logits),
  on completion tokens only.
- KD: `KDTrainer.compute_loss` asks the model for `losses.kd_loss` on the supervised positions. TRL's own
  distillation trainers are on-policy (they run the teacher); none reads an offline top-k cache.
Both losses run inside the model's forward, patched the way TRL patches its fused head (`add_student_head`),
so DDP/FSDP wrappers see an ordinary forward call; the supervised positions come from the collator.

The batch plan (which examples form every micro-batch, fixed by the seed up to `train.token_budget`) is
the trainer's sampler, so every method sees the same batches and a resumed run sees the rest of them.
Metrics stay on the device between log steps (no host sync per step) and go to the stage's own MLflow run
through `StageMetricsCallback` (HF's MLflow callback would open a run of its own).
"""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import Sampler
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import SFTConfig, SFTTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from dist_bench import distributed
from dist_bench.config import KDConfig, RunConfig
from dist_bench.dataset import IGNORE, Example
from dist_bench.progress import Progress
from dist_bench.student.losses import DEFAULT_CHUNK, VOCAB_TILE, kd_loss
from dist_bench.student.masks import MasksWithoutSync
from dist_bench.teacher.cache_format import TopKCache, TopPCache
from dist_bench.tracking import StageContext

# transformers 5.2x renames gradient_checkpointing; TRL's config still sets it (and 5.17 knows only that name)
warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)


# ---- the batch plan -----------------------------------------------------------------------------------


def plan_steps(examples: list[Example], cfg: RunConfig) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches of dataset indices, fixed by the seed, up to the token budget.

    Known in advance so the LR schedule has its true length and a resumed run sees the same batches.
    """
    return plan_by_length([len(e.input_ids) for e in examples], cfg)


def plan_by_length(lengths: list[int], cfg: RunConfig) -> list[list[list[int]]]:
    """plan_steps over rows of these token counts (a DPO pair counts its chosen and rejected sequences)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    steps: list[list[list[int]]] = []
    tokens, order = 0, []
    while tokens < cfg.train.token_budget and (
        cfg.train.max_steps is None or len(steps) < cfg.train.max_steps
    ):
        step = []
        for _ in range(cfg.train.grad_accum):
            if len(order) < cfg.train.batch_size:
                order += torch.randperm(len(lengths), generator=generator).tolist()
            micro, order = order[: cfg.train.batch_size], order[cfg.train.batch_size :]
            step.append(micro)
            tokens += sum(lengths[i] for i in micro)
        steps.append(step)
    return steps


class PlannedOrder(Sampler[int]):
    """The plan's indices in order; the DataLoader cuts them into micro-batches of train.batch_size, which is
    exactly the plan's micro-batches (each holds batch_size indices)."""

    def __init__(self, plan: list[list[list[int]]]) -> None:
        self.order = [i for step in plan for micro in step for i in micro]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class PlanCounts:
    """What the planned steps process, for the stage's token metrics (known without a host sync)."""

    tokens: int  # non-padding input tokens
    padded_tokens: int  # including padding: what the hardware computed on
    supervised_tokens: int  # positions with a loss


def plan_counts(
    plan: list[list[list[int]]], examples: list[Example], steps: int, padding_free: bool, multiple: int = 1
) -> PlanCounts:
    """`multiple`: padded batches' lengths are rounded up to it (train.pad_to_multiple_of)."""
    counts = PlanCounts(0, 0, 0)
    for step in plan[:steps]:
        for micro in step:
            lengths = [len(examples[i].input_ids) for i in micro]
            counts.tokens += sum(lengths)
            padded_length = -(-max(lengths) // multiple) * multiple
            counts.padded_tokens += sum(lengths) if padding_free else padded_length * len(lengths)
            counts.supervised_tokens += sum(examples[i].supervised_tokens for i in micro)
    return counts


# ---- data ---------------------------------------------------------------------------------------------


def to_dataset(examples: list[Example]) -> Dataset:
    """Tokenized rows as TRL takes them: input_ids, labels (IGNORE before the first target), and the row's
    dataset index, by which the KD collator finds its cached teacher rows."""
    return Dataset.from_dict(
        {
            "input_ids": [e.input_ids for e in examples],
            "labels": [e.labels for e in examples],
            "example_index": list(range(len(examples))),
        }
    )


@dataclass
class StudentCollator:
    """TRL's language-modeling collator, plus (for KD) the cached teacher top-k of the batch's supervised
    positions, in the order the model sees them (row by row, position by position)."""

    pad_token_id: int
    padding_free: bool = False
    cache: TopKCache | TopPCache | None = None
    pad_to_multiple_of: int = 1  # padded batches only (train.pad_to_multiple_of)

    def __post_init__(self) -> None:
        self.collate = DataCollatorForLanguageModeling(
            pad_token_id=self.pad_token_id,
            padding_free=self.padding_free,
            pad_to_multiple_of=None if self.padding_free else self.pad_to_multiple_of,
        )

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        # Where the supervised positions are, found here on the CPU: a boolean index on the GPU would stop
        # the host until the device catches up (it must learn the count), every micro-batch.
        batch["supervised_index"] = (batch["labels"][:, 1:] != IGNORE).flatten().nonzero().squeeze(1)
        if "attention_mask" in batch and bool(batch["attention_mask"].all()):
            # No padding: without a mask HF's sdpa path runs plain causal attention. With one it checks on
            # the device whether the mask is all ones (`_ignore_causal_mask_sdpa`): a host sync per step.
            # A mask that stays means padding, and the trainer builds it without asking (student/masks.py).
            del batch["attention_mask"]
        if self.cache is not None:
            ids, logprobs = self.cache.batch([int(r["example_index"]) for r in rows])
            batch["teacher_ids"], batch["teacher_logprobs"] = ids, logprobs
        return batch


# ---- the KD loss inside the model's forward -----------------------------------------------------------


def plain_lm_head(model: PreTrainedModel) -> bool:
    """No logit softcapping or scaling (Gemma, Granite, ...): the student head's losses assume plain logits."""
    text = model.config.get_text_config()
    scaled = (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
        "logits_scaling",
    )
    return all(getattr(text, name, None) is None for name in scaled)


def add_student_head(model: PreTrainedModel, kd: KDConfig | None) -> None:
    """`model(..., labels=l, supervised_index=i)` returns the SFT loss and token accuracy of the supervised
    positions, and with `teacher_ids=..., teacher_logprobs=...` the KD loss (losses.kd_loss), without
    full-vocabulary logits; without `supervised_index` the forward is the original one (generation).

    Like TRL's `add_fused_lm_head` (the same kernel does the full-vocabulary work), with one difference:
    the supervised positions come from the collator, found on the CPU. TRL's head finds them with a
    boolean index on the device, which stops the host every micro-batch until the GPU catches up.
    """
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(
        self: PreTrainedModel,
        *args: Any,
        supervised_index: torch.Tensor | None = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> Any:
        if supervised_index is None:
            if labels is not None:
                kwargs["labels"] = labels
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        hidden = hidden.flatten(0, 1).index_select(0, supervised_index)
        targets = labels[:, 1:].flatten().index_select(0, supervised_index)
        head = self.get_output_embeddings()
        # Mean over this micro-batch -> sum over the step's supervised tokens, as HF's num_items_in_batch asks:
        # every supervised token of an optimizer step weighs the same, whatever micro-batch it is in.
        scale = supervised_index.numel() / num_items_in_batch if num_items_in_batch is not None else 1.0
        if teacher_ids is None:
            tile = min(VOCAB_TILE, head.weight.shape[0])
            log_probs, *_, is_top1 = ChunkedLogProbFunction.apply(
                hidden, head.weight, head.bias, targets, 1.0, tile, None, 1.0, ("log_probs", "is_top1")
            )
            return -log_probs.mean() * scale, is_top1.float().mean()
        out = kd_loss(
            hidden,
            head.weight,
            head.bias,
            targets,
            teacher_ids,
            teacher_logprobs,
            temperature=kd.temperature,
            ce_weight=kd.ce_weight,
            divergence=kd.loss,
            jsd_beta=kd.jsd_beta,
            tail=kd.tail,
            chunk_size=kd.chunk_size or DEFAULT_CHUNK[kd.tail],
        )
        return out.loss * scale, out.ce, out.divergence

    model.forward = types.MethodType(forward, model)


# ---- the trainers -------------------------------------------------------------------------------------


class LeanLastCheckpoint:
    """Mixed into the student trainers. The Trainer checkpoints at the last step (with save_strategy "steps"
    it always does), so that a kill before the final model is written resumes there without training again,
    and the final model is that checkpoint's files, linked (save_final). The optimizer, scheduler and RNG
    state in it would serve no step (none is left), and the optimizer's is twice the fp32 weights: 4 GB for a
    0.5B student, written once per stage whatever the GPU count. The last checkpoint leaves them out, as
    save_only_model does. Under FSDP it stays whole: resuming there reads accelerate's own files."""

    def _save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        last = self.state.global_step >= self.state.max_steps and not self.is_fsdp_enabled  # type: ignore[attr-defined]
        keep = self.args.save_only_model  # type: ignore[attr-defined]
        self.args.save_only_model = keep or last  # type: ignore[attr-defined]
        try:
            super()._save_checkpoint(*args, **kwargs)  # type: ignore[misc]
        finally:
            self.args.save_only_model = keep  # type: ignore[attr-defined]


class StudentTrainer(MasksWithoutSync, LeanLastCheckpoint, SFTTrainer):
    """SFTTrainer on the batch plan, with metrics kept on the device until a log step."""

    def __init__(
        self, *args: Any, plan: list[list[list[int]]], kd: KDConfig | None = None, **kwargs: Any
    ) -> None:
        self.plan = plan
        super().__init__(*args, **kwargs)
        # Our head where the logits are plain (the same TRL kernel, no host sync); TRL's fused head, as
        # SFTTrainer installs it, for softcapped or scaled logits.
        self.own_head = plain_lm_head(self.model)
        if self.own_head:
            add_student_head(self.model, kd)

    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler[int]:
        return PlannedOrder(self.plan)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        """TRL's SFT loss (its fused log-prob kernel: no full-vocabulary logits), without the host syncs of
        TRL's own compute_loss (it reads entropy, accuracy and token counts with .item() every micro-batch)."""
        if self.own_head:
            loss, accuracy = model(**inputs, num_items_in_batch=num_items_in_batch)
            self._metrics["train"]["mean_token_accuracy"].append(accuracy)
            return self._across_devices(loss, num_items_in_batch)
        inputs.pop("supervised_index", None)
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        supervised = outputs.label_mask.sum()
        total = supervised if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(total).clamp(min=1)
        self._metrics["train"]["mean_token_accuracy"].append(outputs.is_top1.sum() / supervised.clamp(min=1))
        return self._across_devices(loss, num_items_in_batch)

    def _across_devices(
        self, loss: torch.Tensor, num_items_in_batch: torch.Tensor | int | None
    ) -> torch.Tensor:
        # num_items_in_batch counts every rank's tokens and DDP averages gradients: as TRL does
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return loss * self.accelerator.num_processes
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # The metrics are device tensors of the steps since the last log: read them here, in one go.
        for values in self._metrics[mode].values():
            values[:] = [float(v) if isinstance(v, torch.Tensor) else v for v in values]
        super().log(logs, start_time)


class KDTrainer(StudentTrainer):
    """KD from an offline top-k teacher cache: CE + divergence (kd.loss, kd.tail) over supervised positions."""

    def __init__(self, *args: Any, kd: KDConfig, **kwargs: Any) -> None:
        super().__init__(*args, kd=kd, **kwargs)
        if not self.own_head:
            raise ValueError(
                "student.model: KD from a top-k cache does not support softcapped or scaled logits yet"
            )
        self.divergence_name = "jsd" if kd.loss == "jsd" else "kl"

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        loss, ce, divergence = model(**inputs, num_items_in_batch=num_items_in_batch)
        self._metrics["train"]["ce"].append(ce)
        self._metrics["train"][self.divergence_name].append(divergence)
        return self._across_devices(loss, num_items_in_batch)


# Trainer's log keys -> the stage run's step metrics
METRIC_NAMES = {"loss": "train/loss", "learning_rate": "train/lr", "grad_norm": "train/grad_norm",
                "ce": "train/ce", "kl": "train/kl", "jsd": "train/jsd",
                "entropy": "train/entropy", "mean_token_accuracy": "train/token_accuracy"}  # fmt: skip


class BudgetProgress(TrainerCallback):
    """Training tokens against the budget, for a person watching (progress.py): a bar with an ETA on a
    terminal, periodic lines in logs. `tokens_after[i]`: the training tokens through step i + 1."""

    def __init__(self, stage: str, tokens_after: list[int]) -> None:
        self.stage, self.tokens_after = stage, tokens_after
        self.progress: Progress | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not distributed.is_main():  # the ranks train one plan: one line for it, rank 0's
            return
        total = self.tokens_after[-1] if self.tokens_after else 0
        done = self.tokens_after[state.global_step - 1] if state.global_step else 0  # resumed
        self.progress = Progress(self.stage, total, "tokens", done=done)

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is not None and 0 < state.global_step <= len(self.tokens_after):
            self.progress.set(self.tokens_after[state.global_step - 1])

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.progress is not None:
            self.progress.close()


class StageMetricsCallback(TrainerCallback):
    """`train/*` step metrics into the stage's own MLflow run; the energy so far committed with every
    checkpoint (a resumed stage then counts the energy spent on the work it keeps)."""

    def __init__(
        self,
        ctx: StageContext | None,
        plan: list[list[list[int]]],
        examples: list[Example],
        padding_free: bool,
    ):
        self.ctx, self.plan, self.examples, self.padding_free = ctx, plan, examples, padding_free
        self.last: dict[str, float] = {}

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        metrics = {METRIC_NAMES[k]: float(v) for k, v in (logs or {}).items() if k in METRIC_NAMES}
        if not metrics:
            return
        self.last.update(metrics)
        if self.ctx is not None:
            tokens = plan_counts(self.plan, self.examples, state.global_step, self.padding_free).tokens
            self.ctx.log_metrics({**metrics, "train/tokens": tokens}, step=state.global_step)

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.ctx is not None:
            self.ctx.commit_energy()


# ---- building one ---------------------------------------------------------------------------------------


def training_args(cfg: RunConfig, output_dir: Path, steps: int, device: torch.device) -> SFTConfig:
    return SFTConfig(
        **shared_arguments(cfg, output_dir, steps, device),
        # train.packing is done by our collator (TRL's padding-free collator inside StudentCollator): TRL's
        # own flag refuses a custom collator, and ours must add the supervised positions and teacher rows.
        padding_free=False,
        max_length=None,  # the data layer truncates to data.max_length; TRL must not drop or cut rows
        dataset_kwargs={"skip_prepare_dataset": True},
        shuffle_dataset=False,
        remove_unused_columns=False,  # keep example_index for the KD collator
    )


def shared_arguments(cfg: RunConfig, output_dir: Path, steps: int, device: torch.device) -> dict[str, Any]:
    """The TRL/HF trainer arguments every student trainer shares (SFT, KD, DPO): optimizer, schedule,
    precision, checkpoints, logging."""
    train, optimizer = cfg.train, cfg.train.optimizer
    cuda = device.type == "cuda"
    micro_batch, accumulation = distributed.step_split(
        train.batch_size, train.grad_accum, distributed.world_size()
    )
    workers = train.dataloader_workers if train.dataloader_workers is not None else (2 if cuda else 0)
    return dict(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=accumulation,
        ddp_find_unused_parameters=False,
        **fsdp_arguments(cfg),
        learning_rate=optimizer.lr,
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.betas[0],
        adam_beta2=optimizer.betas[1],
        adam_epsilon=optimizer.eps,
        warmup_steps=optimizer.warmup_steps,
        lr_scheduler_type={"constant": "constant_with_warmup"}.get(optimizer.schedule, optimizer.schedule),
        max_grad_norm=optimizer.max_grad_norm if optimizer.max_grad_norm is not None else 0.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        # bf16: autocast over fp32 master weights; bf16_pure: the weights themselves are bf16 (loaded so)
        bf16=train.precision == "bf16" and cuda,
        use_cpu=not cuda,
        gradient_checkpointing=train.gradient_checkpointing,
        # The decoder layers' kernels only: the LM-head losses are the project's (student/losses.py) or TRL's
        # fused head, which Liger's fused linear cross-entropy would replace.
        use_liger_kernel=train.liger_kernel,
        liger_kernel_config={"fused_linear_cross_entropy": False, "cross_entropy": False}
        if train.liger_kernel
        else None,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=train.log_every,
        save_strategy="steps",
        save_steps=train.checkpoint_every,
        save_total_limit=train.keep_checkpoints,
        report_to="none",  # metrics go to the stage's own run (StageMetricsCallback)
        # The filter reads every micro-batch's loss on the host (isnan/isinf): a device sync per step that
        # stalls the GPU while the CPU queues the next kernels. A NaN loss is logged as NaN instead.
        logging_nan_inf_filter=False,
        disable_tqdm=True,
        # The loop is host-bound on a GPU (docs/benchmarks.md): a batch collated in the training process
        # (KD: ~10-20 ms of cache decoding per micro-batch) is time the GPU waits. Workers collate ahead.
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        dataloader_pin_memory=cuda,
        # Batches go to the GPU from pinned memory without waiting: a blocking copy stops the host until
        # the device has drained its queue, every micro-batch.
        accelerator_config={"non_blocking": cuda},
    )


def fsdp_arguments(cfg: RunConfig) -> dict[str, Any]:
    """train.distributed fsdp on several ranks: FSDP2 through the trainer's accelerate, one unit per
    decoder layer (the model's `_no_split_modules`), parameters resharded after each forward, the full
    state dict gathered for saving (so checkpoints and the final model load as usual)."""
    if cfg.train.distributed != "fsdp" or distributed.world_size() == 1:
        return {}
    return {
        "fsdp": "full_shard auto_wrap",
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def build_trainer(
    cfg: RunConfig,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    plan: list[list[list[int]]],
    output_dir: Path,
    ctx: StageContext | None,
    cache: TopKCache | TopPCache | None = None,
) -> tuple[StudentTrainer, StageMetricsCallback]:
    device = next(model.parameters()).device
    args = training_args(cfg, output_dir, len(plan), device)
    callback = StageMetricsCallback(ctx, plan, examples, cfg.train.packing)
    common = {
        "model": model,
        "args": args,
        "train_dataset": to_dataset(examples),
        "processing_class": tokenizer,
        "data_collator": StudentCollator(
            tokenizer.pad_token_id, cfg.train.packing, cache, cfg.train.pad_to_multiple_of
        ),
        "callbacks": [callback, BudgetProgress("student_train", _tokens_after(plan, examples))],
        "plan": plan,
    }
    trainer = StudentTrainer(**common) if cache is None else KDTrainer(**common, kd=cfg.kd)
    trainer.remove_callback(PrinterCallback)  # a dict per log step on stdout; the stage run has the metrics
    return trainer, callback


def _tokens_after(plan: list[list[list[int]]], examples: list[Example]) -> list[int]:
    """The training tokens through each step of the plan."""
    per_step = (sum(len(examples[i].input_ids) for micro in step for i in micro) for step in plan)
    return list(itertools.accumulate(per_step))


def resume_point(output_dir: Path) -> str | None:
    """The checkpoint every rank resumes from: rank 0 picks it (and removes incomplete ones), the others
    are told."""
    newest = last_complete_checkpoint(output_dir) if distributed.is_main() else None
    return distributed.broadcast(str(newest) if newest else None)


# What a Trainer checkpoint holds besides the files save_model writes: the state to resume training from
# (under FSDP, accelerate's own copy of the weights, pytorch_model_fsdp*, and optimizer shards too).
TRAINING_STATE = (
    "optimizer",
    "scheduler",
    "rng_state",
    "trainer_state.json",
    "scaler.pt",
    "pytorch_model_fsdp",
)


def save_final(trainer: Any, final_dir: Path) -> None:  # a StudentTrainer or the DPO trainer
    """The trained model (weights, config, tokenizer: loadable with from_pretrained) in final_dir, replacing
    an earlier attempt's. Every rank calls it (under FSDP the weights are gathered); rank 0 writes.

    The Trainer has just saved a checkpoint at the last step (it always does, with save_strategy "steps"),
    and its model files are the bytes save_model would write: they are hard-linked instead of written again
    (on a 0.5B fp32 student, ~2 s of a one-GPU stage's disk time that no GPU count shortens)."""
    linked = False
    if distributed.is_main():
        if final_dir.exists():
            shutil.rmtree(final_dir)
        last = Path(trainer.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
        linked = link_model_files(last, final_dir)
    if not distributed.broadcast(linked):  # every rank takes rank 0's answer (FSDP gathers on all)
        trainer.save_model(str(final_dir))
    distributed.barrier()


def link_model_files(checkpoint: Path, final_dir: Path) -> bool:
    """Hard-link a complete checkpoint's model files (all but the training state) into final_dir. False, with
    final_dir absent, where the checkpoint holds no whole model to link: missing or incomplete, sharded
    (FSDP's per-rank files), or on a filesystem without hard links."""
    complete = (checkpoint / "trainer_state.json").is_file() and (checkpoint / "config.json").is_file()
    # one weights file, or shards and their index (a large model)
    weights = any(
        (checkpoint / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")
    )
    if not (complete and weights):
        return False
    files = [f for f in checkpoint.iterdir() if not f.name.startswith(TRAINING_STATE)]
    if any(not f.is_file() for f in files):  # a folder we do not know: not a from_pretrained model
        return False
    staging = final_dir.with_name(final_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        for file in files:
            os.link(file, staging / file.name)
    except OSError:
        shutil.rmtree(staging)
        return False
    staging.rename(final_dir)
    return True


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint-N whose trainer_state.json (written last by HF's Trainer) exists; incomplete
    ones, left by a kill in the middle of a save, are removed so that the resume cannot pick them."""
    complete = None
    for path in sorted(
        output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), key=lambda p: int(p.name.split("-")[-1])
    ):
        if (path / "trainer_state.json").is_file():
            complete = path
        else:
            shutil.rmtree(path)
    return complete
