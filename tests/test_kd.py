"""KD training: the loss is the documented CE + T^2 KL, training moves the student and lowers the loss,
an interrupted run resumes bit-for-bit, and mismatched vocabularies stop it before any step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM

from conftest import small_config
from dist_bench import pipeline, tinyworld
from dist_bench.config import load_config
from dist_bench.dataset import collate, load_examples
from dist_bench.preflight import PreflightError
from dist_bench.student import kd
from dist_bench.teacher.logit_cache import TopKCache
from dist_bench.tinyworld.tokenizer import build_tokenizer


def test_kd_loss_matches_the_formula() -> None:
    torch.manual_seed(0)
    cfg = load_config(None, ["kd.temperature=2.0", "kd.ce_weight=0.25"])
    tokenizer = build_tokenizer()
    examples = load_examples(cfg.data, tokenizer)[:3]
    batch = collate(examples, [0, 1, 2], tokenizer.pad_token_id)
    student = AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init"))
    positions = batch.supervised_tokens
    k = 7
    teacher_logp = torch.log_softmax(torch.randn(positions, 258), -1).topk(k)
    counts = batch.predict_mask.sum(1)
    cache = TopKCache({}, teacher_logp.indices, teacher_logp.values, torch.cumsum(counts, 0) - counts, counts)

    loss, ce, kl = kd.kd_loss(student, batch, cache, cfg, torch.device("cpu"))

    logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
        batch.predict_mask
    ]
    expected_ce = torch.nn.functional.cross_entropy(logits, batch.targets)
    p = torch.softmax(teacher_logp.values / 2.0, -1)
    q = torch.log_softmax(logits / 2.0, -1).gather(1, teacher_logp.indices)
    expected_kl = (p * (p.log() - q)).sum(-1).mean()
    torch.testing.assert_close(ce, expected_ce)
    torch.testing.assert_close(kl, expected_kl)
    torch.testing.assert_close(loss, 0.25 * expected_ce + 0.75 * 4.0 * expected_kl)
    assert kl > 0


def test_kl_vanishes_when_the_student_is_the_teacher() -> None:
    cfg = load_config(None, ["kd.ce_weight=0"])
    tokenizer = build_tokenizer()
    examples = load_examples(cfg.data, tokenizer)[:2]
    batch = collate(examples, [0, 1], tokenizer.pad_token_id)
    student = AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init"))
    with torch.no_grad():
        own = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[
            batch.predict_mask
        ]
    full = torch.log_softmax(own, -1).topk(258)
    counts = batch.predict_mask.sum(1)
    cache = TopKCache({}, full.indices, full.values, torch.cumsum(counts, 0) - counts, counts)
    loss, _, kl = kd.kd_loss(student, batch, cache, cfg, torch.device("cpu"))
    assert abs(kl.item()) < 1e-5 and abs(loss.item()) < 1e-5


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_training_changes_the_weights_and_lowers_the_loss(workdir: Path) -> None:
    parent = pipeline.kd(small_config(workdir, "train.token_budget=30000", "train.optimizer.lr=0.003"))
    train = parent.stages[1]
    before = AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init")).state_dict()
    after = AutoModelForCausalLM.from_pretrained(train.outputs["final_model"]).state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)  # every tensor moved
    losses = metric_history(train.run_id, "train/loss")
    assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0]
    assert metric_history(train.run_id, "train/lr") and metric_history(train.run_id, "train/kl")
    assert train.metrics["tokens"] >= 30000 and train.metrics["padded_tokens"] > train.metrics["tokens"]


def test_interrupted_training_resumes_to_the_same_model(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = pipeline.kd(small_config(workdir, f"output.run_dir={workdir / 'reference'}"))
    expected = (reference.stages[1].outputs["final_model"] / "model.safetensors").read_bytes()

    real_save = kd.save_checkpoint
    saves: list[int] = []

    def save_then_die(root: Path, state: kd.TrainState, *args: object) -> Path:
        path = real_save(root, state, *args)
        saves.append(state.step)
        if len(saves) == 2:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(kd, "save_checkpoint", save_then_die)
    cfg = small_config(workdir)
    with pytest.raises(KeyboardInterrupt):
        pipeline.kd(cfg)
    assert saves == [4, 8]
    resumed = pipeline.kd(cfg)
    assert resumed.stages[0].reused  # the teacher cache was finished: not recomputed
    assert resumed.stages[1].summary["resumed"] and saves[2] == 12  # continued from step 8
    got = (resumed.stages[1].outputs["final_model"] / "model.safetensors").read_bytes()
    assert got == expected
    assert resumed.stages[1].metrics["steps"] == reference.stages[1].metrics["steps"]
    assert resumed.stages[1].metrics["tokens"] == reference.stages[1].metrics["tokens"]


def test_a_student_with_another_vocabulary_stops_before_training(workdir: Path) -> None:
    other = workdir / "other-student"
    model = AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init"))
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(other)
    tokenizer.save_pretrained(other)
    # The pre-flight pass finds it before the teacher's cache is paid for: no run, no stage.
    with pytest.raises(
        PreflightError, match=r"student\.model: vocab_size 259 .* differs from the teacher's 258"
    ):
        pipeline.kd(small_config(workdir, f"student.model={other}"))
    assert not (workdir / "mlflow.db").exists() and not (workdir / "runs").exists()
    # The stage keeps its own check for a cache it did not see made (a reused or copied cache).
    cache = pipeline.cache_logits(small_config(workdir)).stages[0].outputs["logit_cache"]
    with pytest.raises(kd.VocabMismatch, match=r"student tokenizer .* differs from the teacher's"):
        kd.check_compatible(
            TopKCache.open(cache).manifest, tokenizer, small_config(workdir, f"student.model={other}")
        )
    assert not list((workdir / "runs" / "student_train").glob("*/checkpoints/step-*"))
