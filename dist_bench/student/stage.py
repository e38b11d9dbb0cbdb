"""Stage `student_train`: the student learns from the data (SFT) or from the teacher's cached top-k (KD), through
TRL (student/trainer.py), inside the stage's energy window.

    dist-bench kd --config configs/experiments/tiny_kd.yaml      # after logit_caching: KD
    dist-bench sft --config configs/experiments/tiny_sft.yaml    # SFT on the same data and token budget

    KD loss = ce_weight * CE + (1 - ce_weight) * T^2 * D(teacher top-k || student)     (student/losses.py)

Training stops when `train.token_budget` non-padding input tokens have been planned (or `train.max_steps`);
the plan is the same for every method. Weights train in fp32 (`train.precision` fp32, or bf16 autocast over
fp32 master weights) or in bf16 (`bf16_pure`). Checkpoints are HF Trainer checkpoints (weights, tokenizer,
optimizer, scheduler, RNG states): a killed stage resumes from the newest complete one and, on CPU, ends
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import time
from pathlib import Path

from dist_bench import distributed, models
from dist_bench.config import DataConfig, RunConfig, flatten
from dist_bench.dataset import DataError, data_fingerprint, load_examples
from dist_bench.student.trainer import (
    build_trainer,
    last_complete_checkpoint,
    plan_counts,
    plan_steps,
    resume_point,
    save_final,
)
from dist_bench.teacher.cache_format import open_cache
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "student_train"
TOKEN_COUNTING = (
    "tokens = non-padding input tokens through the forward pass (summed over steps); padded_tokens adds "
    "padding; supervised_tokens = positions with a loss"
)


class VocabMismatch(DataError):
    """Teacher and student cannot be distilled by logits: different vocabularies."""


def run(parent: ParentRun, cache: StageResult | None = None, data: DataConfig | None = None) -> StageResult:
    """KD when `cache` (the logit_caching stage's result) is given, SFT otherwise. `data`: what to train on
    instead of the config's data.* (the teacher_generation stage's kept completions)."""
    cfg = parent.cfg if data is None else parent.cfg.model_copy(update={"data": data})
    method = "sft" if cache is None else "kd"
    params = {
        "method": method,
        **flatten(cfg.student.model_dump(), "student."),
        **flatten(cfg.data.model_dump(), "data."),
        **flatten(cfg.train.model_dump(), "train."),
        **(flatten(cfg.kd.model_dump(), "kd.") if cache is not None else {}),
        "seed": str(cfg.seed),
        "student.fingerprint": models.fingerprint(cfg.student.model, cfg.student.revision),
        "device": models.pick_device(cfg.train.device).type,
    }
    if cache is None:
        params["data.fingerprint"] = data_fingerprint(cfg.data)
    else:  # the cache's hash covers the data it was made from
        params["upstream.logit_cache"] = cache.fingerprints["logit_cache"]

    def work(ctx: StageContext) -> StageWork:
        return train(cfg, cache.outputs["logit_cache"] if cache is not None else None, ctx)

    # Every rank trains (DDP through the TRL trainer, per_rank_batches), one optimizer step being the plan's.
    return execute_stage(
        parent, STAGE, params, work, tags={"dist_bench.student": cfg.student.model}, data_parallel=True
    )


def train(cfg: RunConfig, cache_dir: Path | None, ctx: StageContext) -> StageWork:
    # Where the stage's time goes (the summary's phase_seconds): set-up, the training loop, the final save.
    # The loop alone is what scales with GPUs; the rest is paid once per stage.
    started = time.monotonic()
    device = models.pick_device(cfg.train.device)
    tokenizer = models.load_tokenizer(cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code)
    cache = open_cache(cache_dir) if cache_dir is not None else None
    if cache is not None:
        check_compatible(cache.manifest, tokenizer, cfg)
    examples = load_examples(cfg.data, tokenizer)
    if cache is not None and len(examples) != cache.manifest["sequences"]:
        raise DataError(
            f"data.train has {len(examples)} records but the logit cache {cache.manifest['sequences']}"
        )

    student = models.load_model(
        cfg.student.model,
        device,
        "bfloat16" if cfg.train.precision == "bf16_pure" else "float32",  # fp32 master weights otherwise
        cfg.student.revision,
        cfg.student.trust_remote_code,
        attn_implementation=cfg.train.attn_implementation,
    )
    if cache is not None and student.config.vocab_size != cache.manifest["vocab_size"]:
        raise VocabMismatch(
            f"student vocab_size {student.config.vocab_size} != teacher vocab_size {cache.manifest['vocab_size']}"
        )
    plan = plan_steps(examples, cfg)
    checkpoints = ctx.stage_dir / "checkpoints"
    trainer, callback = build_trainer(cfg, student, tokenizer, examples, plan, checkpoints, ctx, cache)
    loop_started = time.monotonic()
    trainer.train(resume_from_checkpoint=resume_point(checkpoints))
    loop_ended = time.monotonic()

    final_dir = ctx.stage_dir / "final_model"
    save_final(trainer, final_dir)
    if not distributed.is_main():
        return StageWork(tokens=0, outputs={}, fingerprints={})
    counts = plan_counts(
        plan, examples, trainer.state.global_step, cfg.train.packing, cfg.train.pad_to_multiple_of
    )
    return StageWork(
        tokens=counts.tokens,
        outputs={"final_model": final_dir},
        fingerprints={},
        hash_after={"final_model": final_dir},
        metrics={
            "steps": trainer.state.global_step,
            "padded_tokens": counts.padded_tokens,
            "supervised_tokens": counts.supervised_tokens,
            **{f"final_{k.replace('/', '_')}": v for k, v in callback.last.items()},
        },
        details={
            "steps": trainer.state.global_step,
            "method": "kd" if cache else "sft",
            "parallelism": parallelism(trainer),
            "token_counting": TOKEN_COUNTING,
            "phase_seconds": {
                "setup": loop_started - started,  # data, cache, model, trainer
                "training_loop": loop_ended - loop_started,  # this attempt's steps, checkpoints included
                "final_save": time.monotonic() - loop_ended,
            },
        },
        artifacts=checkpoint_artifacts(checkpoints, final_dir, cfg.tracking.log_checkpoints),
    )


def checkpoint_artifacts(checkpoints: Path, final_dir: Path, which: str) -> dict[str, Path]:
    """The checkpoints tracking.log_checkpoints asks for ("none", "last", "all"), as artifact path -> local path.
    The last step's checkpoint shares its model files with final_model (hard links, save_final): those are
    uploaded once, under final_model, and that checkpoint's artifact holds the rest (trainer state and
    arguments). On a 7B fp32 student the second copy would be 28 GB more to the tracking server."""
    newest = last_complete_checkpoint(checkpoints)
    if which == "none" or newest is None:
        return {}
    chosen = [newest] if which == "last" else sorted(checkpoints.glob("checkpoint-*/"), key=_step)
    artifacts: dict[str, Path] = {}
    for checkpoint in chosen:
        entries = list(checkpoint.iterdir())
        files = [f for f in entries if not _shared(f, final_dir / f.name)]
        if len(files) == len(entries):
            artifacts[f"checkpoints/{checkpoint.name}"] = checkpoint
        else:  # one entry per file: tracking logs a file into its artifact path's folder
            artifacts.update({f"checkpoints/{checkpoint.name}/{f.name}": f for f in files})
    return artifacts


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[-1])


def _shared(file: Path, other: Path) -> bool:
    return other.exists() and file.samefile(other)


def parallelism(trainer: object) -> str:
    """How the trainer's accelerate ran it: fsdp2, ddp (several ranks) or none (one process)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return "fsdp2"
    return "ddp" if distributed.world_size() > 1 else "none"


def check_compatible(manifest: dict, student_tokenizer: object, cfg: RunConfig) -> None:
    """The cache's tokenizer is the student's (pre-flight checks this before any stage; a reused or copied
    cache is checked again here)."""
    if models.tokenizer_fingerprint(student_tokenizer) != manifest["tokenizer"]:
        raise VocabMismatch(
            f"student tokenizer ({cfg.student.model}) differs from the teacher's ({cfg.teacher.model}): "
            "logit distillation needs one vocabulary; use sft for cross-tokenizer pairs"
        )
