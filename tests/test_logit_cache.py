"""Teacher logit caching: exact top-k of the teacher's distribution, resumable to byte-identical files."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import SMALL, small_config
from dist_bench import models, pipeline
from dist_bench.config import load_config
from dist_bench.dataset import collate, load_examples
from dist_bench.teacher import logit_cache
from dist_bench.teacher.logit_cache import TopKCache


def cache_dir(parent: pipeline.ParentRun) -> Path:
    return parent.stages[0].outputs["logit_cache"]


def logit_caching_runs() -> list:
    client = MlflowClient()
    return client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`dist_bench.stage` = 'logit_caching'",
        order_by=["attributes.start_time ASC"],
    )


def test_cached_topk_is_the_teachers_distribution(workdir: Path) -> None:
    cfg = small_config(workdir, "logits.top_k=5")
    parent = pipeline.cache_logits(cfg)
    cache = TopKCache.open(cache_dir(parent))
    assert cache.manifest["top_k"] == 5 and cache.manifest["vocab_size"] == 258
    assert cache.token_ids.shape == (cache.manifest["positions"], 5)

    tokenizer = models.load_tokenizer(cfg.teacher.model)
    teacher = models.load_model(cfg.teacher.model, torch.device("cpu"), "float32").eval()
    examples = load_examples(cfg.data, tokenizer)
    batch = collate([examples[i] for i in (3, 17)], [3, 17], tokenizer.pad_token_id)
    with torch.no_grad():
        full = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    expected = torch.log_softmax(full[batch.predict_mask].float(), -1).topk(5)
    rows = cache.rows([3, 17])
    torch.testing.assert_close(cache.logprobs[rows], expected.values, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.token_ids[rows].long(), expected.indices)
    # The teacher is good: its top-1 is the data's next token almost everywhere.
    assert (cache.token_ids[rows, 0] == batch.targets).float().mean() > 0.9


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

    def write_then_die(shard_dir: Path, shard: int, tensors: dict) -> None:
        real_write(shard_dir, shard, tensors)
        written.append(shard)
        if len(written) == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a scheduler's SIGINT does mid-stage

    monkeypatch.setattr(logit_cache, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.cache_logits(cfg)
    # A half-written shard from the moment of the kill must not be mistaken for a finished one.
    stage_dir = next(p for p in (workdir / "runs" / "logit_caching").iterdir() if p.is_dir())
    (stage_dir / "logit_cache" / "shards" / "shard-00002.safetensors").write_bytes(b"torn write")
    before_resume = json.loads((stage_dir / "energy_progress.json").read_text())

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
