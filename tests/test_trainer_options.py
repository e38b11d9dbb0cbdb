"""The training options real users set change how a step is computed, never what it computes.

Two optimizer steps of the tiny student, SFT and KD, with each option against the plain configuration:
the first step's loss (before any update) and gradient norm, and the second step's loss (after one
update) agree. With `train.packing` the batch is one padding-free row: a sequence attending to the one
before it in that row, or the last token of one sequence trained to predict the first of the next, would
change the loss.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
import torch
from test_dpo import dpo_config, write_pairs
from transformers import masking_utils

from conftest import small_config
from dist_bench import models, pipeline
from dist_bench.dataset import load_examples
from dist_bench.student.trainer import (
    StudentCollator,
    build_trainer,
    plan_counts,
    plan_steps,
    shared_arguments,
    to_dataset,
    training_args,
)
from dist_bench.teacher.cache_format import open_cache

OPTIONS = {
    "packing": ["train.packing=true"],
    "gradient_checkpointing": ["train.gradient_checkpointing=true"],
    "eager_attention": ["train.attn_implementation=eager"],
    "pad_to_multiple_of": ["train.pad_to_multiple_of=16"],
}


@pytest.fixture(scope="module")
def kd_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny teacher's top-k cache of the small config's data, made once for the module."""
    workdir = tmp_path_factory.mktemp("cache")
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)  # each test's workdir fixture sets its own again
        return pipeline.cache_logits(small_config(workdir)).stages[0].outputs["logit_cache"]


PLAIN: dict[str, tuple[list[dict], object]] = {}  # method -> the plain configuration's two steps


def two_steps(
    workdir: Path, overrides: list[str], cache_dir: Path | None, masks_without_sync: bool = True
) -> tuple[list[dict], object]:
    """The per-step logs of two optimizer steps, and the plan's token counts."""
    cfg = small_config(
        workdir,
        "train.max_steps=2",
        "train.log_every=1",
        "train.batch_size=8",
        "train.device=cpu",
        *overrides,
    )
    tokenizer = models.load_tokenizer(cfg.student.model)
    examples = load_examples(cfg.data, tokenizer)
    plan = plan_steps(examples, cfg)
    torch.manual_seed(0)
    model = models.load_model(
        cfg.student.model,
        models.pick_device(cfg.train.device),
        "float32",
        attn_implementation=cfg.train.attn_implementation,
    )
    cache = open_cache(cache_dir) if cache_dir is not None else None
    out = workdir / ("_".join(overrides).replace("=", "-").replace(".", "-") or "plain")
    out = out.with_name(out.name + ("" if masks_without_sync else "-masks-synced"))
    trainer, _ = build_trainer(cfg, model, tokenizer, examples, plan, out, None, cache)
    trainer.args.save_strategy = "no"
    trainer.masks_without_sync = masks_without_sync
    trainer.train()
    assert model.config._attn_implementation == cfg.train.attn_implementation  # as it was, after training
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return logs, plan_counts(plan, examples, 2, cfg.train.packing, cfg.train.pad_to_multiple_of)


@pytest.mark.parametrize("method", ["sft", "kd"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_an_option_computes_the_same_steps(workdir: Path, kd_cache: Path, method: str, option: str) -> None:
    cache = kd_cache if method == "kd" else None
    if method not in PLAIN:
        PLAIN[method] = two_steps(workdir, [], cache)
    plain, plain_counts = PLAIN[method]
    changed, counts = two_steps(workdir, OPTIONS[option], cache)
    assert len(plain) == len(changed) == 2
    assert changed[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
    assert changed[0]["grad_norm"] == pytest.approx(plain[0]["grad_norm"], rel=1e-4)
    assert changed[1]["loss"] == pytest.approx(plain[1]["loss"], rel=1e-4)
    assert changed[1]["loss"] != plain[0]["loss"]  # the first update did move the model
    if option == "packing":  # padding-free: the hardware computes on the real tokens only
        assert counts.padded_tokens == counts.tokens < plain_counts.padded_tokens
    elif option == "pad_to_multiple_of":  # more padding computed on, the same tokens counted
        assert counts.tokens == plain_counts.tokens and counts.padded_tokens > plain_counts.padded_tokens
    else:
        assert counts == plain_counts


@pytest.mark.parametrize("method", ["sft", "kd"])
def test_padded_batches_build_their_masks_without_asking_the_device(
    workdir: Path, kd_cache: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """student/masks.py: while training, a padded batch's SDPA mask is built without transformers' check of
    whether its padding mask is all ones (on CUDA a host sync, twice per forward), and the steps are the
    same, bit for bit: the mask is the one transformers builds for a batch with padding."""
    asked: list[bool] = []
    check = masking_utils._ignore_causal_mask_sdpa

    def counted(padding_mask: torch.Tensor | None, *args: object, **kwargs: object) -> bool:
        asked.append(padding_mask is not None)
        return check(padding_mask, *args, **kwargs)

    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", counted)
    cache = kd_cache if method == "kd" else None
    synced, _ = two_steps(workdir, [], cache, masks_without_sync=False)
    assert any(asked)  # transformers' own builder read the padding masks: this test can tell
    asked.clear()
    unsynced, counts = two_steps(workdir, [], cache)
    assert counts.padded_tokens > counts.tokens  # the batches had padding
    assert not any(asked)
    assert [(s["loss"], s["grad_norm"]) for s in unsynced] == [(s["loss"], s["grad_norm"]) for s in synced]


def test_dataloader_workers_collate_in_other_processes_and_compute_the_same_steps(
    workdir: Path, kd_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train.dataloader_workers: KD's batches (with their cache rows) are collated in worker processes, and
    the steps are the same, bit for bit, as with the batches collated in the training process."""
    collating = workdir / "collating_pids"
    collate = StudentCollator.__call__

    def recorded(self: StudentCollator, rows: list[dict]) -> dict:
        with collating.open("a") as pids:  # a file: the workers' memory is their own
            pids.write(f"{os.getpid()}\n")
        return collate(self, rows)

    monkeypatch.setattr(StudentCollator, "__call__", recorded)
    inline, _ = two_steps(workdir, [], kd_cache)  # on CPU, unset means none
    assert set(collating.read_text().split()) == {str(os.getpid())}
    collating.unlink()
    workers, _ = two_steps(workdir, ["train.dataloader_workers=2"], kd_cache)
    pids = set(collating.read_text().split())
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert [(s["loss"], s["grad_norm"]) for s in workers] == [(s["loss"], s["grad_norm"]) for s in inline]


def test_dataloader_workers_default_to_two_on_cuda_and_none_on_cpu(workdir: Path) -> None:
    cfg = small_config(workdir)
    on = {kind: shared_arguments(cfg, workdir, 1, torch.device(kind)) for kind in ("cpu", "cuda")}
    assert (on["cpu"]["dataloader_num_workers"], on["cuda"]["dataloader_num_workers"]) == (0, 2)
    assert on["cuda"]["dataloader_persistent_workers"] and on["cuda"]["dataloader_pin_memory"]
    chosen = shared_arguments(
        small_config(workdir, "train.dataloader_workers=1"), workdir, 1, torch.device("cuda")
    )
    assert chosen["dataloader_num_workers"] == 1


def test_padded_lengths_are_multiples_and_the_counts_are_what_the_collator_makes(workdir: Path) -> None:
    """train.pad_to_multiple_of: every padded batch's length is a multiple, its padding masked and never
    supervised, and the stage's padded_tokens is what the collated batches hold; a packed row is left alone."""
    cfg = small_config(workdir, "train.batch_size=8")
    tokenizer = models.load_tokenizer(cfg.student.model)
    examples = load_examples(cfg.data, tokenizer)
    plan = plan_steps(examples, cfg)
    rows = to_dataset(examples)
    for padding_free in (False, True):
        collator = StudentCollator(tokenizer.pad_token_id, padding_free, pad_to_multiple_of=16)
        padded = 0
        for step in plan:
            for micro in step:
                batch = collator([rows[i] for i in micro])
                lengths = [len(examples[i].input_ids) for i in micro]
                padded += batch["input_ids"].numel()
                if padding_free:
                    assert batch["input_ids"].shape == (1, sum(lengths))
                    continue
                assert batch["input_ids"].shape == (len(micro), -(-max(lengths) // 16) * 16)
                real = batch["attention_mask"].sum(1).tolist()
                assert real == lengths  # the mask covers the real tokens only
                for row, n in zip(batch["labels"], lengths, strict=True):
                    assert (row[n:] == -100).all()  # padding is never a target
        assert padded == plan_counts(plan, examples, len(plan), padding_free, 16).padded_tokens
    assert padded < plan_counts(plan, examples, len(plan), False, 16).padded_tokens


def test_dpo_pads_to_the_multiple_and_computes_the_same_steps(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRL's preference collator gets the multiple, and the policy's steps are the same."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    widths: list[int] = []
    collate = DataCollatorForPreference.torch_call

    def recorded(self: DataCollatorForPreference, examples: list[dict]) -> dict:
        batch = collate(self, examples)
        widths.append(batch["input_ids"].shape[1])
        return batch

    monkeypatch.setattr(DataCollatorForPreference, "torch_call", recorded)
    pairs = write_pairs(workdir)
    # collated in this process, where `widths` is: on CUDA, unset means two DataLoader worker processes
    steps = ["train.max_steps=2", "train.log_every=1", "train.dataloader_workers=0"]
    plain = pipeline.dpo(dpo_config(workdir, pairs, *steps)).stages[0].metrics
    assert any(width % 16 for width in widths)  # without the setting some batch is not a multiple
    widths.clear()
    padded = pipeline.dpo(dpo_config(workdir, pairs, *steps, "train.pad_to_multiple_of=16")).stages[0].metrics
    assert widths and all(width % 16 == 0 for width in widths)
    for name in ("final_train_loss", "final_train_rewards_margins"):
        assert padded[name] == pytest.approx(plain[name], rel=1e-4, abs=1e-6), name


def test_liger_kernels_reach_trl_without_its_loss(workdir: Path) -> None:
    """train.liger_kernel: TRL's use_liger_kernel, the decoder layers' kernels only (the losses stay ours)."""
    device = torch.device("cpu")
    assert not training_args(small_config(workdir), workdir / "plain", 1, device).use_liger_kernel
    args = training_args(small_config(workdir, "train.liger_kernel=true"), workdir / "liger", 1, device)
    assert args.use_liger_kernel
    assert args.liger_kernel_config == {"fused_linear_cross_entropy": False, "cross_entropy": False}


def liger_applied() -> bool:
    """Liger replaces the model family's classes (the tiny world's students are Llama-shaped) for the rest of
    the process once a trainer applies it."""
    from transformers.models.llama import modeling_llama

    return modeling_llama.LlamaRMSNorm.__module__.startswith("liger_kernel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels are Triton kernels: CUDA only")
def test_liger_kernels_compute_the_same_steps(workdir: Path, kd_cache: Path) -> None:
    """On a GPU: two steps of SFT, KD and DPO with Liger's layer kernels agree with transformers' own. Liger
    patches the model classes for the rest of the process, so every plain run comes first (and a process
    where something applied Liger before cannot pass this test by comparing Liger with itself)."""
    assert not liger_applied()
    methods = {"sft": None, "kd": kd_cache}
    plain = {method: two_steps(workdir, ["train.device=cuda"], cache)[0] for method, cache in methods.items()}
    pairs = write_pairs(workdir)
    dpo_steps = ["train.device=cuda", "train.max_steps=2", "train.log_every=1"]
    plain_dpo = pipeline.dpo(dpo_config(workdir, pairs, *dpo_steps)).stages[0].metrics
    for method, cache in methods.items():
        liger, _ = two_steps(workdir, ["train.device=cuda", "train.liger_kernel=true"], cache)
        assert liger_applied()
        for ours, theirs in zip(liger, plain[method], strict=True):
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
            assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-3)
    liger_dpo = (
        pipeline.dpo(dpo_config(workdir, pairs, *dpo_steps, "train.liger_kernel=true")).stages[0].metrics
    )
    for name in ("final_train_loss", "final_train_rewards_margins"):
        assert liger_dpo[name] == pytest.approx(plain_dpo[name], rel=1e-3, abs=1e-5), name


def test_the_mask_builder_is_swapped_only_while_training_and_only_where_looked_up_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MasksWithoutSync: the SDPA models of a trainer (policy and reference) train under the no-sync mask
    builder and are on plain SDPA again afterwards, also when training fails; a model class that does not
    look its attention up in transformers' registries keeps "sdpa" (another name would send it to eager)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_bench.student import masks

    def tiny() -> LlamaForCausalLM:
        shape = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
        return LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))

    class Trainer:
        def __init__(self, model: torch.nn.Module, ref_model: torch.nn.Module | None = None) -> None:
            self.model, self.ref_model = model, ref_model

        def train(self, fail: bool = False) -> list[str]:
            if fail:
                raise RuntimeError("a failed step")
            return [m.config._attn_implementation for m in (self.model, self.ref_model) if m is not None]

    class PlanTrainer(masks.MasksWithoutSync, Trainer):
        pass

    policy, reference = tiny(), tiny()
    trainer = PlanTrainer(policy, reference)
    assert trainer.train() == [masks.ATTENTION, masks.ATTENTION]
    assert [policy.config._attn_implementation, reference.config._attn_implementation] == ["sdpa", "sdpa"]
    with pytest.raises(RuntimeError):
        trainer.train(fail=True)
    assert policy.config._attn_implementation == "sdpa"
    trainer.masks_without_sync = False
    assert trainer.train() == ["sdpa", "sdpa"]
    monkeypatch.setattr(LlamaForCausalLM, "_supports_attention_backend", False)
    assert PlanTrainer(tiny()).train() == ["sdpa"]
