"""Stage `student_train` (KD): train the student on CE + KL against the cached teacher top-k.

    dist-bench kd --config configs/experiments/tiny_kd.yaml

    loss = ce_weight * CE(student, data) + (1 - ce_weight) * T^2 * KL(p_teacher^T || p_student^T)

where p_teacher^T is the cached top-k renormalised at temperature T and the student's log-probs are taken
from its full softmax at T, gathered at the teacher's k token ids (so the KL is never negative). Only
supervised positions go through the LM head. Training stops when `train.token_budget` non-padding input
tokens have been processed (or `train.max_steps`). Checkpoints hold everything needed to continue
bit-for-bit: weights, optimizer, scheduler, RNG states, step and token counters.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, get_scheduler

from dist_bench import models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import Batch, DataError, Example, collate, load_examples
from dist_bench.teacher.logit_cache import TopKCache
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "student_train"


class VocabMismatch(DataError):
    """Teacher and student cannot be distilled by logits: different vocabularies."""


def run(parent: ParentRun, cache: StageResult) -> StageResult:
    cfg = parent.cfg
    params = {
        **flatten(cfg.student.model_dump(), "student."),
        **flatten(cfg.data.model_dump(), "data."),
        **flatten(cfg.train.model_dump(), "train."),
        **flatten(cfg.kd.model_dump(), "kd."),
        "seed": str(cfg.seed),
        "student.fingerprint": models.fingerprint(cfg.student.model, cfg.student.revision),
        "upstream.logit_cache": cache.fingerprints["logit_cache"],
        "device": models.pick_device(cfg.train.device).type,
    }

    def work(ctx: StageContext) -> StageWork:
        return train(cfg, cache.outputs["logit_cache"], ctx)

    return execute_stage(parent, STAGE, params, work, tags={"dist_bench.student": cfg.student.model})


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0  # non-padding input tokens processed
    padded_tokens: int = 0  # including padding: what the hardware actually computed on
    supervised_tokens: int = 0


def train(cfg: RunConfig, cache_dir: Path, ctx: StageContext) -> StageWork:
    device = models.pick_device(cfg.train.device)
    tokenizer = models.load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    cache = TopKCache.open(cache_dir)
    check_compatible(cache.manifest, tokenizer, cfg)
    examples = load_examples(cfg.data, tokenizer)
    if len(examples) != cache.manifest["sequences"]:
        raise DataError(
            f"data.train has {len(examples)} records but the logit cache {cache.manifest['sequences']}"
        )

    _seed_everything(cfg.seed)
    student = models.load_model(
        cfg.student.model, device, cfg.student.dtype, cfg.student.revision, cfg.student.trust_remote_code
    )
    if student.config.vocab_size != cache.manifest["vocab_size"]:
        raise VocabMismatch(
            f"student vocab_size {student.config.vocab_size} != teacher vocab_size {cache.manifest['vocab_size']}"
        )
    schedule = plan_steps(examples, cfg)
    optimizer = torch.optim.AdamW(
        student.parameters(),
        lr=cfg.train.optimizer.lr,
        betas=cfg.train.optimizer.betas,
        eps=cfg.train.optimizer.eps,
        weight_decay=cfg.train.optimizer.weight_decay,
    )
    scheduler = get_scheduler(
        cfg.train.optimizer.schedule,
        optimizer,
        num_warmup_steps=cfg.train.optimizer.warmup_steps,
        num_training_steps=len(schedule),
    )
    state = TrainState()
    checkpoints = ctx.stage_dir / "checkpoints"
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, student, optimizer, scheduler)

    student.train()
    autocast = cfg.train.precision == "bf16" and device.type == "cuda"
    last_logged: dict[str, float] = {}
    while state.step < len(schedule):
        micro_batches = [
            collate([examples[i] for i in ids], ids, tokenizer.pad_token_id) for ids in schedule[state.step]
        ]
        supervised = sum(b.supervised_tokens for b in micro_batches)
        totals = torch.zeros(3, device=device)  # loss, ce, kl; stays on the device: no sync per step
        for batch in micro_batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, ce, kl = kd_loss(student, batch, cache, cfg, device)
            # Sum over positions / positions in the whole step: every supervised token weighs the same.
            weight = batch.supervised_tokens / supervised
            (loss * weight).backward()
            totals += torch.stack([loss.detach(), ce, kl]) * weight
            state.tokens += batch.tokens
            state.padded_tokens += batch.padded_tokens
            state.supervised_tokens += batch.supervised_tokens
        grad_norm = _clip(student, cfg.train.optimizer.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        if state.step % cfg.train.log_every == 0 or state.step == len(schedule):
            last_logged = dict(zip(("train/loss", "train/ce", "train/kl"), totals.tolist(), strict=True))
            ctx.log_metrics(
                {
                    **last_logged,
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/grad_norm": float(grad_norm),
                    "train/tokens": state.tokens,
                },
                step=state.step,
            )
        if state.step % cfg.train.checkpoint_every == 0 or state.step == len(schedule):
            save_checkpoint(checkpoints, state, student, optimizer, scheduler, cfg.train.keep_checkpoints)
            ctx.commit_energy()

    final_dir = ctx.stage_dir / "final_model"
    if final_dir.exists():
        shutil.rmtree(final_dir)
    student.save_pretrained(final_dir)
    tokenizer.save_pretrained(final_dir)
    artifacts = {}
    if cfg.tracking.log_checkpoints == "last":
        artifacts[f"checkpoints/{latest_checkpoint(checkpoints).name}"] = latest_checkpoint(checkpoints)
    elif cfg.tracking.log_checkpoints == "all":
        artifacts["checkpoints"] = checkpoints
    return StageWork(
        tokens=state.tokens,
        outputs={"final_model": final_dir},
        fingerprints={"final_model": models.fingerprint(str(final_dir))},
        metrics={
            "steps": state.step,
            "padded_tokens": state.padded_tokens,
            "supervised_tokens": state.supervised_tokens,
            **{f"final_{k.replace('/', '_')}": v for k, v in last_logged.items()},
        },
        details={"steps": state.step, "token_counting": TOKEN_COUNTING},
        artifacts=artifacts,
    )


TOKEN_COUNTING = (
    "tokens = non-padding input tokens through the forward pass (summed over steps); padded_tokens adds "
    "padding; supervised_tokens = positions with a loss"
)


def kd_loss(
    student: PreTrainedModel, batch: Batch, cache: TopKCache, cfg: RunConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, ce, kl) averaged over the batch's supervised positions."""
    hidden = student.get_decoder()(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    ).last_hidden_state
    logits = student.get_output_embeddings()(hidden[batch.predict_mask.to(device)]).float()  # [P, V]
    ce = F.cross_entropy(logits, batch.targets.to(device))
    rows = cache.rows(batch.indices)
    teacher_ids = cache.token_ids[rows].to(device).long()
    temperature = cfg.kd.temperature
    teacher_logp = torch.log_softmax(cache.logprobs[rows].to(device).float() / temperature, dim=-1)
    student_logp = torch.log_softmax(logits / temperature, dim=-1).gather(1, teacher_ids)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
    loss = cfg.kd.ce_weight * ce + (1 - cfg.kd.ce_weight) * temperature**2 * kl
    return loss, ce.detach(), kl.detach()


def plan_steps(examples: list[Example], cfg: RunConfig) -> list[list[list[int]]]:
    """Every optimizer step's micro-batches of dataset indices, fixed by the seed, up to the token budget.

    Known in advance so the LR schedule has its true length and a resumed run sees the same batches.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    steps: list[list[list[int]]] = []
    tokens, order = 0, []
    while tokens < cfg.train.token_budget and (
        cfg.train.max_steps is None or len(steps) < cfg.train.max_steps
    ):
        step = []
        for _ in range(cfg.train.grad_accum):
            if len(order) < cfg.train.batch_size:
                order += torch.randperm(len(examples), generator=generator).tolist()
            micro, order = order[: cfg.train.batch_size], order[cfg.train.batch_size :]
            step.append(micro)
            tokens += sum(len(examples[i].input_ids) for i in micro)
        steps.append(step)
    return steps


def check_compatible(manifest: dict, student_tokenizer: object, cfg: RunConfig) -> None:
    student_fp = models.tokenizer_fingerprint(student_tokenizer)
    if student_fp != manifest["tokenizer"]:
        raise VocabMismatch(
            f"student tokenizer ({cfg.student.model}) differs from the teacher's ({cfg.teacher.model}): "
            "logit distillation needs one vocabulary; use sft for cross-tokenizer pairs"
        )


def save_checkpoint(
    root: Path,
    state: TrainState,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    keep: int,
) -> Path:
    """Write checkpoints/step-NNNNNN atomically (tmp dir + rename), keep the newest `keep`."""
    target = root / f"step-{state.step:06d}"
    tmp = root / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        },
        tmp / "trainer_state.pt",
    )
    (tmp / "train_state.json").write_text(json.dumps(state.__dict__, sort_keys=True))
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return target


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("step-*") if (p / "train_state.json").exists())
    return done[-1] if done else None


def load_checkpoint(
    path: Path,
    model: PreTrainedModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> TrainState:
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"), device=str(next(model.parameters()).device))
    model.load_state_dict(weights, strict=False)  # tied weights are saved once
    saved = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])
    return TrainState(**json.loads((path / "train_state.json").read_text()))


def _clip(model: PreTrainedModel, max_norm: float | None) -> torch.Tensor:
    """The gradient norm (clipped to max_norm when set), as a tensor: reading it would sync the device."""
    return torch.nn.utils.clip_grad_norm_(
        model.parameters(), max_norm if max_norm is not None else float("inf")
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
