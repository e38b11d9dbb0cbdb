"""Teacher logit caching: exact top-k of the teacher's distribution, resumable to byte-identical files."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

from conftest import PROJECT, SMALL, small_config
from dist_bench import models, pipeline
from dist_bench.config import load_config
from dist_bench.dataset import collate, load_examples
from dist_bench.teacher import logit_cache
from dist_bench.teacher.cache_format import open_cache


def cache_dir(parent: pipeline.ParentRun) -> Path:
    return parent.stages[0].outputs["logit_cache"]


def logit_caching_runs() -> list:
    client = MlflowClient()
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`dist_bench.stage` = 'logit_caching'",
        order_by=["attributes.start_time ASC"],
    )


def test_the_cache_keeps_the_teachers_distribution_within_its_bound(workdir: Path) -> None:
    cfg = small_config(workdir, "logits.top_k=5", "logits.cover=0.9")
    parent = pipeline.cache_logits(cfg)
    cache = open_cache(cache_dir(parent))
    manifest = cache.manifest
    assert manifest["format"] == "dist-bench-topp/2" and manifest["vocab_size"] == 258
    assert manifest["id_bits"] == 9 and 1 <= manifest["mean_kept_tokens"] < 5

    tokenizer = models.load_tokenizer(cfg.teacher.model)
    teacher = models.load_model(cfg.teacher.model, torch.device("cpu"), "float32").eval()
    examples = load_examples(cfg.data, tokenizer)
    batch = collate([examples[i] for i in (3, 17)], [3, 17], tokenizer.pad_token_id)
    with torch.no_grad():
        full = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(full[batch.predict_mask].float(), -1)
    ids, cached = cache.batch([3, 17])
    kept = cached > -math.inf
    # every position: the most likely tokens first, until 0.9 of the mass (or 5 tokens)
    expected = logp.topk(5)
    mass_before = expected.values.exp().cumsum(-1)[:, :-1]
    assert kept.sum(-1).tolist() == (1 + (mass_before < 0.9).sum(-1)).clamp_max(5).tolist()
    assert torch.equal(torch.where(kept, ids, 0), torch.where(kept, expected.indices[:, : ids.shape[1]], 0))
    # each kept log-prob within one step (1/16 nats) of the teacher's
    error = (cached - logp.gather(1, ids)).abs()[kept]
    assert error.max() <= cfg.logits.logprob_step + 1e-3
    # the teacher is good: its top-1 is the data's next token almost everywhere
    assert (ids[:, 0] == batch.targets).float().mean() > 0.9

    # the stage's own figures: bytes per position from the files, fidelity measured while caching
    metrics = MlflowClient().get_run(parent.stages[0].run_id).data.metrics
    files = sum(p.stat().st_size for p in (cache_dir(parent) / "shards").glob("*.safetensors"))
    assert metrics["cache_bytes_per_position"] == pytest.approx(files / manifest["positions"])
    assert metrics["mean_kept_tokens"] == pytest.approx(manifest["kept_tokens"] / manifest["positions"])
    # the tiny teacher is nearly certain (entropy ~1e-7 nats): its tail is rounding noise, and so is the KL
    assert metrics["fidelity_positions"] > 0 and metrics["teacher_entropy"] > 0
    assert 0 <= metrics["fidelity_kl"] < 1e-4


@pytest.mark.parametrize("upload", [False, True])
def test_the_caches_shards_are_uploaded_only_when_asked_and_its_manifest_always(
    workdir: Path, upload: bool
) -> None:
    parent = pipeline.cache_logits(small_config(workdir, f"tracking.log_logit_cache={str(upload).lower()}"))
    client = MlflowClient()
    run_id = parent.stages[0].run_id
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, "logit_cache")}
    assert ("shards" in logged) is upload and "manifest.json" in logged
    text = client.download_artifacts(run_id, "logit_cache/manifest.json", str(workdir))
    assert Path(text).read_bytes() == (cache_dir(parent) / "manifest.json").read_bytes()


def test_a_version_1_cache_is_still_read_and_an_unknown_one_refused(workdir: Path) -> None:
    folder = workdir / "v1"
    (folder / "shards").mkdir(parents=True)
    ids = torch.tensor([[3, 1], [2, 0], [7, 5]], dtype=torch.int32)
    logprobs = torch.tensor([[-0.1, -2.5], [-0.3, -1.5], [-0.05, -3.0]])
    tensors = {"token_ids": ids, "logprobs": logprobs, "offsets": torch.tensor([0, 1, 3]),
               "sequence_index": torch.tensor([1, 0]), "input_tokens": torch.tensor([9])}  # fmt: skip
    save_file(tensors, str(folder / "shards" / "shard-00000.safetensors"))
    digest = hashlib.sha256((folder / "shards" / "shard-00000.safetensors").read_bytes()).hexdigest()
    manifest = {"format": "dist-bench-topk/1", "sequences": 2, "shards": [{"file": "shard-00000.safetensors",
                "sha256": digest}]}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    got_ids, got_logprobs = open_cache(folder).batch([0, 1])
    assert got_ids.tolist() == [[2, 0], [7, 5], [3, 1]] and torch.equal(got_logprobs, logprobs[[1, 2, 0]])

    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "dist-bench-topk/0"}))
    with pytest.raises(ValueError, match="format 'dist-bench-topk/0' is not one this version reads"):
        open_cache(folder)


def test_interrupted_caching_resumes_to_identical_bytes(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = pipeline.cache_logits(small_config(workdir, f"output.run_dir={workdir / 'reference'}"))
    expected = {
        p.relative_to(cache_dir(reference)): p.read_bytes()
        for p in cache_dir(reference).rglob("*")
        if p.is_file()
    }

    cfg = small_config(workdir)
    real_write = logit_cache._write_shard
    written: list[int] = []

    def write_then_die(shard_dir: Path, shard: int, tensors: dict, sums: dict) -> None:
        real_write(shard_dir, shard, tensors, sums)
        written.append(shard)
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a scheduler's SIGINT does mid-stage

    monkeypatch.setattr(logit_cache, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.cache_logits(cfg)
    # A half-written shard from the moment of the kill must not be mistaken for a finished one.
    stage_dir = next(p for p in (workdir / "runs" / "logit_caching").iterdir() if p.is_dir())
    (stage_dir / "logit_cache" / "shards" / "shard-00002.safetensors").write_bytes(b"torn write")
    before_resume = json.loads((stage_dir / "energy_progress.rank-0.json").read_text())["reading"]

    monkeypatch.setattr(logit_cache, "_write_shard", lambda *a: (written.append(a[1]), real_write(*a)))
    resumed = pipeline.cache_logits(cfg)
    assert written == [0, 1, 2]  # shards 0 and 1 were not recomputed
    got = {
        p.relative_to(cache_dir(resumed)): p.read_bytes()
        for p in cache_dir(resumed).rglob("*")
        if p.is_file()
    }
    assert got == expected

    killed, finished = logit_caching_runs()[-2:]
    assert killed.info.status == "KILLED" and finished.info.status == "FINISHED"
    assert finished.data.tags["dist_bench.resumed"] == "true"
    # The resumed run's figures include the committed part of the interrupted attempt.
    assert finished.data.metrics["duration_s"] > before_resume["duration_s"] > 0


def test_sigkilled_caching_process_resumes_and_its_run_is_marked_killed(workdir: Path) -> None:
    """A real kill -9 mid-stage: no exception handler runs, the MLflow run is left RUNNING."""
    overrides = [*SMALL, "data.max_samples=480", "logits.shard_size=24", f"output.run_dir={workdir / 'runs'}"]
    reference = pipeline.cache_logits(
        load_config(None, [*overrides, f"output.run_dir={workdir / 'reference'}"])
    )
    expected = {
        p.relative_to(cache_dir(reference)): p.read_bytes()
        for p in cache_dir(reference).rglob("*")
        if p.is_file()
    }

    process = subprocess.Popen([sys.executable, "-m", "dist_bench", "cache_logits", *overrides], cwd=workdir)
    shards = workdir / "runs" / "logit_caching"
    deadline = time.time() + 120
    while not list(shards.glob("*/logit_cache/shards/shard-00001.json")):
        assert process.poll() is None and time.time() < deadline, "caching ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not list(shards.glob("*/logit_cache/manifest.json"))  # killed before the end

    resumed = pipeline.cache_logits(load_config(None, overrides))
    got = {
        p.relative_to(cache_dir(resumed)): p.read_bytes()
        for p in cache_dir(resumed).rglob("*")
        if p.is_file()
    }
    assert got == expected
    runs = logit_caching_runs()
    killed = [r for r in runs if r.data.tags.get("dist_bench.interrupted") == "true"]
    assert len(killed) == 1 and killed[0].info.status == "KILLED"
    assert (
        MlflowClient().get_run(resumed.stages[0].run_id).data.tags["dist_bench.resumed_from"]
        == killed[0].info.run_id
    )


def write_format1(teacher: torch.nn.Module, examples: list, pad_id: int, cfg, out: Path, *_: object) -> dict:
    """The logit cache as format 1 wrote it before format 2: fixed top-16, float32 log-probs, one shard."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    ids, logprobs, counts, tokens = [], [], [], 0
    with torch.no_grad():
        for start in range(0, len(examples), 64):
            chunk = list(range(start, min(start + 64, len(examples))))
            batch = collate([examples[i] for i in chunk], chunk, pad_id)
            tokens += batch.tokens
            logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            top = torch.log_softmax(logits[batch.predict_mask].float(), -1).topk(16)
            ids.append(top.indices.to(torch.int32))
            logprobs.append(top.values)
            counts.append(batch.predict_mask.sum(1))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])
    path = out / "shards" / "shard-00000.safetensors"
    save_file({"token_ids": torch.cat(ids), "logprobs": torch.cat(logprobs), "offsets": offsets,
               "sequence_index": torch.arange(len(examples)), "input_tokens": torch.tensor([tokens])}, str(path))  # fmt: skip
    positions = int(offsets[-1])
    shard = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {"format": "dist-bench-topk/1", "top_k": 16, "vocab_size": 258, "sequences": len(examples),
            "positions": positions, "input_tokens": tokens, "bytes": path.stat().st_size,
            "bytes_per_position": path.stat().st_size / positions, "mean_kept_tokens": 16.0,
            "fidelity_kl": 0.0, "fidelity_positions": 0, "teacher_entropy": 0.0, "shards": [shard]}  # fmt: skip


def test_kd_on_format_2_learns_what_kd_on_format_1_learns(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny world's KD (the demo's budget, 3 M tokens) from format 2 at the default settings (top-16,
    8-bit codes of 1/8 nat) against the same from format 1's fixed top-16 float32."""
    overrides = ["train.token_budget=3000000", "eval.tasks=[tiny_arith]", "eval.limit=200",
                 "energy.codecarbon=false"]  # fmt: skip
    config = "configs/experiments/tiny_kd.yaml"
    adaptive = pipeline.kd(load_config(PROJECT / config, [*overrides, f"output.run_dir={workdir / 'v2'}"]))
    monkeypatch.setattr(logit_cache, "cache_logits", write_format1)
    fixed = pipeline.kd(load_config(PROJECT / config, [*overrides, f"output.run_dir={workdir / 'v1'}"]))
    manifests = [json.loads((cache_dir(p) / "manifest.json").read_text()) for p in (adaptive, fixed)]
    assert [m["format"] for m in manifests] == ["dist-bench-topp/2", "dist-bench-topk/1"]
    assert manifests[0]["bytes_per_position"] < manifests[1]["bytes_per_position"] / 3
    scores = [p.stages[2].metrics["eval/tiny_arith/exact_match"] for p in (adaptive, fixed)]
    assert scores[1] > 0.9  # the comparison means something only where KD works
    assert abs(scores[0] - scores[1]) <= 0.02, scores
