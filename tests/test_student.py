"""student_train through TRL: KD and SFT move the student and lower the loss, an interrupted run resumes
bit-for-bit through the trainer, checkpoints load with from_pretrained, mismatched vocabularies stop KD."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import small_config
from dist_bench import models, pipeline, tinyworld
from dist_bench.preflight import PreflightError
from dist_bench.student import stage, trainer
from dist_bench.teacher.cache_format import open_cache
from dist_bench.tinyworld.tokenizer import build_tokenizer


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def initial_weights() -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(tinyworld.resolve("tinyworld:student-init")).state_dict()


def assert_trained(train: object, divergence: str | None) -> None:
    before = initial_weights()
    after = AutoModelForCausalLM.from_pretrained(train.outputs["final_model"]).state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)  # every tensor moved
    losses = metric_history(train.run_id, "train/loss")
    assert len(losses) >= 10 and losses[-1] < 0.5 * losses[0]
    assert metric_history(train.run_id, "train/lr") and metric_history(train.run_id, "train/grad_norm")
    if divergence:
        assert metric_history(train.run_id, "train/ce") and metric_history(train.run_id, divergence)
    assert train.metrics["tokens"] >= 30000 and train.metrics["padded_tokens"] > train.metrics["tokens"]
    assert 0 < train.metrics["supervised_tokens"] < train.metrics["tokens"]


def test_kd_changes_the_weights_and_lowers_the_loss(workdir: Path) -> None:
    parent = pipeline.kd(small_config(workdir, "train.token_budget=30000", "train.optimizer.lr=0.003"))
    assert_trained(parent.stages[1], "train/kl")


def test_sft_changes_the_weights_and_lowers_the_loss(workdir: Path) -> None:
    cfg = small_config(workdir, "pipeline=sft", "train.token_budget=30000", "train.optimizer.lr=0.003")
    parent = pipeline.sft(cfg)
    assert [s.stage for s in parent.stages] == ["student_train", "eval"]
    assert_trained(parent.stages[0], None)


def test_kd_and_sft_see_the_same_batches(workdir: Path) -> None:
    """The fair-comparison rule: one batch plan, one token budget, whatever the method."""
    kd = pipeline.kd(small_config(workdir)).stages[1].metrics
    sft = pipeline.sft(small_config(workdir, "pipeline=sft")).stages[0].metrics
    for name in ("steps", "tokens", "padded_tokens", "supervised_tokens"):
        assert kd[name] == sft[name], name


def die_at_a_save(monkeypatch: pytest.MonkeyPatch, when: Callable[[Any, list[int]], bool]) -> list[int]:
    """Raise KeyboardInterrupt (what Ctrl-C or a scheduler's SIGTERM does) right after the checkpoint at
    which `when(trainer state, steps saved so far)` holds; the steps saved are appended to the list returned."""
    saves: list[int] = []
    real_on_save = trainer.StageMetricsCallback.on_save

    def save_then_die(
        self: trainer.StageMetricsCallback, args: Any, state: Any, *rest: Any, **kw: Any
    ) -> None:
        real_on_save(self, args, state, *rest, **kw)
        saves.append(state.global_step)
        if when(state, saves):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.StageMetricsCallback, "on_save", save_then_die)
    return saves


def test_interrupted_training_resumes_to_the_same_model(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = pipeline.kd(small_config(workdir, f"output.run_dir={workdir / 'reference'}"))
    expected = (reference.stages[1].outputs["final_model"] / "model.safetensors").read_bytes()

    saves = die_at_a_save(monkeypatch, lambda state, saves: len(saves) == 2)  # mid-stage
    cfg = small_config(workdir)
    with pytest.raises(KeyboardInterrupt):
        pipeline.kd(cfg)
    assert saves == [4, 8]
    checkpoint = workdir / "runs" / "student_train"
    (killed_at,) = checkpoint.glob("*/checkpoints/checkpoint-8")
    assert AutoModelForCausalLM.from_pretrained(killed_at) and AutoTokenizer.from_pretrained(killed_at)
    resumed = pipeline.kd(cfg)
    assert resumed.stages[0].reused  # the teacher cache was finished: not recomputed
    assert resumed.stages[1].summary["resumed"] and saves[2] == 12  # continued from step 8
    got = (resumed.stages[1].outputs["final_model"] / "model.safetensors").read_bytes()
    assert got == expected
    for name in ("steps", "tokens", "padded_tokens", "supervised_tokens"):
        assert resumed.stages[1].metrics[name] == reference.stages[1].metrics[name], name


def test_a_student_with_another_vocabulary_stops_kd_before_training(workdir: Path) -> None:
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
    with pytest.raises(stage.VocabMismatch, match=r"student tokenizer .* differs from the teacher's"):
        stage.check_compatible(
            open_cache(cache).manifest, tokenizer, small_config(workdir, f"student.model={other}")
        )
    # SFT trains across tokenizers: the same student is fine there.
    sft = pipeline.sft(small_config(workdir, "pipeline=sft", f"student.model={other}", "train.max_steps=2"))
    assert sft.stages[0].metrics["steps"] == 2


def test_the_final_model_is_the_last_checkpoint_linked_not_written_again(workdir: Path) -> None:
    train = pipeline.sft(small_config(workdir, "pipeline=sft", "train.max_steps=3")).stages[0]
    final = train.outputs["final_model"]
    last = final.parent / "checkpoints" / "checkpoint-3"
    names = sorted(f.name for f in final.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(names)
    assert names == sorted(f.name for f in last.iterdir() if not f.name.startswith(trainer.TRAINING_STATE))
    for name in names:  # the same files on disk, not copies
        assert (final / name).stat().st_ino == (last / name).stat().st_ino
    assert AutoModelForCausalLM.from_pretrained(final) and AutoTokenizer.from_pretrained(final)
    phases = train.summary["phase_seconds"]
    assert set(phases) == {"setup", "training_loop", "final_save"} and min(phases.values()) > 0
    assert sum(phases.values()) <= train.summary["duration_seconds"]
    # the provenance hash, taken once the window closed, is the final model's (tag, summary, later stages)
    expected = models.fingerprint(str(final))
    assert train.fingerprints["final_model"] == train.summary["fingerprints"]["final_model"] == expected
    tags = MlflowClient().get_run(train.run_id).data.tags
    assert tags["dist_bench.fingerprint.final_model"] == expected


def test_every_checkpoint_is_logged_once_and_the_last_ones_weights_only_as_the_final_model(
    workdir: Path,
) -> None:
    cfg = small_config(
        workdir,
        "pipeline=sft",
        "train.max_steps=4",
        "train.checkpoint_every=2",
        "tracking.log_checkpoints=all",
    )
    train = pipeline.sft(cfg).stages[0]
    client = MlflowClient()
    listed = [a.path for a in client.list_artifacts(train.run_id, "checkpoints")]
    assert listed == ["checkpoints/checkpoint-2", "checkpoints/checkpoint-4"]
    earlier = {Path(a.path).name for a in client.list_artifacts(train.run_id, listed[0])}
    assert {"model.safetensors", "optimizer.pt", "trainer_state.json"} <= earlier  # resumable as it is
    last = {Path(a.path).name for a in client.list_artifacts(train.run_id, listed[1])}
    final = {Path(a.path).name for a in client.list_artifacts(train.run_id, "final_model")}
    assert "model.safetensors" in final and not last & final
    on_disk = {
        f.name for f in (train.outputs["final_model"].parent / "checkpoints" / "checkpoint-4").iterdir()
    }
    assert last == on_disk - final and "trainer_state.json" in last


def test_without_a_checkpoint_to_link_the_final_model_is_saved(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer, "link_model_files", lambda checkpoint, final_dir: False)
    train = pipeline.sft(small_config(workdir, "pipeline=sft", "train.max_steps=3")).stages[0]
    final = train.outputs["final_model"]
    last = final.parent / "checkpoints" / "checkpoint-3"
    assert (final / "model.safetensors").stat().st_ino != (last / "model.safetensors").stat().st_ino
    assert (final / "model.safetensors").read_bytes() == (last / "model.safetensors").read_bytes()


def test_a_checkpoint_without_a_whole_model_is_not_linked(tmp_path: Path) -> None:
    checkpoint, final = tmp_path / "checkpoint-3", tmp_path / "final_model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    assert not trainer.link_model_files(checkpoint, final)  # incomplete: no trainer_state.json, no weights
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    (checkpoint / "model-shards").mkdir()  # a folder: not what from_pretrained reads
    assert not trainer.link_model_files(checkpoint, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]  # nothing half-made left
    (checkpoint / "model-shards").rmdir()
    # the training state stays behind, FSDP's (accelerate's copy of the weights, optimizer shards) too
    (checkpoint / "optimizer.pt").write_bytes(b"state")
    (checkpoint / "pytorch_model_fsdp.bin").write_bytes(b"weights again")
    (checkpoint / "optimizer_0").mkdir()
    assert trainer.link_model_files(checkpoint, final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "model.safetensors"]
    # a large model's shards and their index
    sharded, final = tmp_path / "checkpoint-6", tmp_path / "final-sharded"
    sharded.mkdir()
    names = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
             "model.safetensors.index.json", "trainer_state.json"]  # fmt: skip
    for name in names:
        (sharded / name).write_text("{}")
    assert trainer.link_model_files(sharded, final)
    assert sorted(p.name for p in final.iterdir()) == sorted(set(names) - {"trainer_state.json"})


def test_a_kill_after_the_last_step_resumes_without_training_to_the_same_model(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = pipeline.kd(small_config(workdir, f"output.run_dir={workdir / 'reference'}"))
    expected = (reference.stages[1].outputs["final_model"] / "model.safetensors").read_bytes()

    # at the last step's checkpoint, before the final model is written
    saves = die_at_a_save(monkeypatch, lambda state, saves: state.global_step == state.max_steps)
    cfg = small_config(workdir)
    with pytest.raises(KeyboardInterrupt):
        pipeline.kd(cfg)
    last = reference.stages[1].metrics["steps"]
    assert saves[-1] == last and len(saves) > 1
    checkpoints = next((workdir / "runs" / "student_train").glob("*/checkpoints"))
    # the last checkpoint keeps the weights and the trainer state, not the optimizer state no step needs
    assert (checkpoints / f"checkpoint-{saves[-2]}" / "optimizer.pt").is_file()
    assert not (checkpoints / f"checkpoint-{last}" / "optimizer.pt").exists()
    assert (checkpoints / f"checkpoint-{last}" / "trainer_state.json").is_file()
    before = list(saves)
    resumed = pipeline.kd(cfg)
    assert saves == before  # no step trained again, no checkpoint written again
    assert resumed.stages[1].summary["resumed"] and resumed.stages[1].metrics["steps"] == last
    assert (resumed.stages[1].outputs["final_model"] / "model.safetensors").read_bytes() == expected
