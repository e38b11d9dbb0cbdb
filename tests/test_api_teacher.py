"""teacher.api against a real OpenAI-compatible HTTP server on 127.0.0.1 (tests/api_server.py): faults
end in a completion or a recorded failure, none lost or duplicated; the budget holds and a rerun with a
larger one continues without paying twice; the server's rate-limit headers set the pace; SIGKILL and
rerun give the uninterrupted result; the key appears nowhere; a refused key stops pre-flight."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from api_server import ApiServer, Behaviour
from mlflow.tracking import MlflowClient
from test_preflight import assert_rejected, dist_bench

from conftest import PROJECT, SMALL, bare_environment, small_config
from dist_bench import pipeline
from dist_bench.redact import redact, treat_as_secret
from dist_bench.teacher import generation
from dist_bench.teacher.api import ApiAuthError, ApiTeacher, BudgetExceeded, Pacer, SampleStore, retry_after
from dist_bench.teacher.interface import Decoding

KEY_ENV = "DIST_BENCH_TEST_API_KEY"
KEY = "sk-test-4f9c2a7e1d"
SFT_CONFIG = str(PROJECT / "configs/experiments/tiny_sft.yaml")


def api_overrides(server: ApiServer, *more: str) -> list[str]:
    return [
        "pipeline=sft",
        "generation.enabled=true",
        "generation.max_prompts=12",
        "generation.shard_size=4",
        "generation.max_new_tokens=12",
        "generation.filters.verify=none",  # the server's answers are words, not arithmetic
        "generation.filters.dedupe=none",
        f"teacher.api.base_url={server.base_url}",
        "teacher.api.model=teacher-model",
        f"teacher.api.api_key_env={KEY_ENV}",
        *more,
    ]


def rows_of(result: pipeline.ParentRun) -> list[dict]:
    shards = sorted((result.stages[0].outputs["generation"] / "shards").glob("shard-*.jsonl"))
    return [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]


def answered(server: ApiServer) -> Counter[str]:
    """How often the server answered each request content with a real (paid) completion."""
    return Counter(
        r.key for r in server.log if r.path.endswith("completions") and r.status == 200 and r.fault is None
    )


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY


def test_injected_faults_end_in_a_completion_or_a_recorded_failure(workdir: Path, key: str) -> None:
    behaviour = Behaviour(api_key=key, failure_rate=0.3, seed=3, retry_after_s=0.05, timeout_sleep_s=1.0)
    with ApiServer(behaviour) as server:
        cfg = small_config(
            workdir, *api_overrides(server, "generation.n=2", "teacher.api.timeout_s=0.4",
                                    "teacher.api.max_retries=2", "teacher.api.max_concurrency=4",
                                    "teacher.api.energy_j_per_token=0.5"),
        )  # fmt: skip
        result = pipeline.generate(cfg)
        faults = Counter(r.fault for r in server.log if r.fault)
    rows = rows_of(result)
    assert sorted((r["prompt_id"], r["sample"]) for r in rows) == [
        (p, s) for p in range(12) for s in range(2)
    ]
    assert {"429", "500", "timeout", "malformed"} <= set(faults)  # every kind was injected
    failed = [r for r in rows if r["finish_reason"] == "error"]
    assert all(r["error"] and r["completion"] == "" for r in failed)
    assert all(r["completion"].startswith(" w") for r in rows if r["finish_reason"] != "error")
    assert max(answered(server).values()) == 1  # nothing bought twice
    metrics = result.stages[0].metrics
    summary = result.stages[0].summary
    assert summary["energy_sources"]["gpu"] == "unavailable" and summary["gpu_energy_joules"] is None
    assert "remote teacher" in summary["energy_notes"]["gpu"]
    assert metrics["estimated_teacher_energy_j"] == 0.5 * metrics["decode_tokens"]  # the user's figure
    assert metrics["generation/failed_samples"] == len(failed)
    assert metrics["generation/dropped/failed"] == len(failed)
    assert metrics["generation/paid_requests"] == len(rows) - len(failed)


def test_the_budget_holds_and_a_larger_one_continues_without_paying_twice(workdir: Path, key: str) -> None:
    # 12 completion tokens at 2500 per million: 0.03 a request, plus a little for the prompt
    prices = ["teacher.api.price.output_per_million=2500", "teacher.api.price.input_per_million=50"]
    with ApiServer(Behaviour(api_key=key)) as server:
        cfg = small_config(workdir, *api_overrides(server, *prices, "teacher.api.budget=0.10"))
        with pytest.raises(BudgetExceeded, match="budget exceeded"):
            pipeline.generate(cfg)
        paid = sum(answered(server).values())
        assert 1 <= paid <= 4
        client = MlflowClient()
        experiments = [e.experiment_id for e in client.search_experiments()]
        (run,) = client.search_runs(experiments, "tags.dist_bench.stage = 'teacher_generation'")
        assert run.info.status == "FAILED"
        assert run.data.metrics["generation/spend_usd"] <= 0.10
        assert run.data.metrics["generation/paid_requests"] == paid
        journal = list((Path(cfg.output.run_dir) / "teacher_generation").rglob("api-samples/*/*.json"))
        assert len(journal) == paid  # every paid sample checkpointed

        result = pipeline.generate(
            small_config(workdir, *api_overrides(server, *prices, "teacher.api.budget=10"))
        )
        assert max(answered(server).values()) == 1 and sum(answered(server).values()) == 12
        assert len(rows_of(result)) == 12
        assert result.stages[0].metrics["generation/paid_requests"] == 12  # both attempts, each once


def test_rate_limit_headers_set_the_pace(workdir: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key, requests_per_minute=120)) as server:  # 2 requests/s
        cfg = small_config(
            workdir, *api_overrides(server, "generation.max_prompts=9", "generation.shard_size=3")
        )
        pipeline.generate(cfg)
        times = [r.time for r in server.log if r.path.endswith("completions") and r.status == 200]
        limited = [r for r in server.log if r.fault == "rate_limited"]
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert len(times) == 9 and not limited
    assert abs(rate - 2.0) <= 0.2, rate


def test_without_headers_the_configured_pace_holds(workdir: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key)) as server:
        overrides = [
            "generation.max_prompts=9",
            "generation.shard_size=9",
            "teacher.api.requests_per_minute=240",
        ]
        pipeline.generate(small_config(workdir, *api_overrides(server, *overrides)))
        times = [r.time for r in server.log if r.path.endswith("completions")]
    assert abs((len(times) - 1) / (times[-1] - times[0]) - 4.0) <= 0.4


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0.5"}, 0.5),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(headers) == seconds


def test_rate_limit_headers_in_openai_format() -> None:
    pacer = Pacer(None, None)
    pacer.read_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000",
                        "x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m2.5s"})  # fmt: skip
    assert pacer.request_interval == 0.1 and pacer.tokens_per_second == 1000
    assert 62 < pacer.paused_until - time.monotonic() <= 62.5  # nothing is sent before the tokens reset


def test_corrupt_cache_entries_are_fetched_again(workdir: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key)) as server:
        pipeline.generate(small_config(workdir, *api_overrides(server)))
        assert sum(answered(server).values()) == 12
        other_run_dir = f"output.run_dir={workdir / 'runs2'}"  # a new stage dir: only the cache is shared
        cache = f"teacher.api.cache_dir={workdir / 'runs' / 'api-cache'}"
        entries = sorted((workdir / "runs" / "api-cache").glob("*/*.json"))
        entries[0].write_text(entries[0].read_text()[:-5])  # truncated
        data = json.loads(entries[1].read_text())
        data["sample"]["text"] = " tampered"
        entries[1].write_text(json.dumps(data))
        pipeline.generate(small_config(workdir, *api_overrides(server, other_run_dir, cache)))
        again = [k for k, n in answered(server).items() if n == 2]
    assert len(again) == 2 and sum(answered(server).values()) == 14  # the two corrupt ones, nothing else
    store = SampleStore(workdir / "runs" / "api-cache")
    assert all(store.get(e.stem)["text"].startswith(" w") for e in entries[:2])  # refetched and rewritten


def test_the_sft_pipeline_trains_on_what_the_api_teacher_wrote(workdir: Path, key: str) -> None:
    """Selecting teacher.api is the only change: generation through the server, then the shared trainer."""
    with ApiServer(Behaviour(api_key=key)) as server:
        result = pipeline.sft(small_config(workdir, *api_overrides(server, "train.max_steps=4")))
    generation, train, *_ = result.stages
    assert (generation.stage, train.stage) == ("teacher_generation", "student_train")
    kept = generation.outputs["train_data"].read_text().splitlines()
    assert len(kept) == 12 and all(json.loads(line)["completion"].startswith(" w") for line in kept)
    assert train.metrics["tokens"] > 0


def test_a_key_refused_mid_run_stops_at_once_naming_the_variable(tmp_path: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key)) as server:
        cfg = small_config(tmp_path, *api_overrides(server))
        server.behaviour.api_key = "sk-rotated"  # revoked after pre-flight
        teacher = ApiTeacher(cfg.teacher.api, tmp_path / "journal", None)
        with pytest.raises(ApiAuthError, match=KEY_ENV):
            teacher.generate(generation.read_prompts(cfg), Decoding.from_config(cfg.generation), seed=0)
        refused = [r for r in server.log if r.status == 401]
    assert len(refused) == 1  # nothing retried, nothing else sent
    assert key not in str(teacher.spend) and not list((tmp_path / "journal").rglob("*.json"))


def test_sample_store_rejects_a_changed_entry(tmp_path: Path) -> None:
    store = SampleStore(tmp_path)
    store.put("ab12", {"text": " w1", "paid": 0.5})
    assert store.get("ab12") == {"text": " w1", "paid": 0.5}
    path = tmp_path / "ab" / "ab12.json"
    path.write_text(path.read_text().replace("0.5", "0.0"))
    assert store.get("ab12") is None and not path.exists()
    assert store.total_paid() == (0.0, 0)


def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path: Path, key: str) -> None:
    args = ["generate", "--config", SFT_CONFIG, *SMALL]
    env = {KEY_ENV: key, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with ApiServer(Behaviour(api_key=key, requests_per_minute=300)) as reference_server:
        reference = tmp_path / "reference"
        reference.mkdir()
        done = dist_bench(
            reference, *args, *api_overrides(reference_server, "teacher.api.cache=false"), env=env
        )
        assert done.returncode == 0, done.stderr[-2000:]
    with ApiServer(Behaviour(api_key=key, requests_per_minute=300)) as server:
        folder = tmp_path / "killed"
        folder.mkdir()
        overrides = api_overrides(server, "teacher.api.cache=false", "teacher.api.max_concurrency=2")
        process = _start(folder, [*args, *overrides], env)
        journal = folder / "runs" / "teacher_generation"
        deadline = time.monotonic() + 60
        while len(list(journal.rglob("api-samples/*/*.json"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait()
        before = sum(answered(server).values())
        assert 5 <= before < 12  # killed part-way
        done = dist_bench(folder, *args, *overrides, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        counts = answered(server)
    assert sorted(counts) == sorted(answered(reference_server))  # the same requests
    assert sum(n - 1 for n in counts.values()) <= 2  # sent again: at most those in flight at the kill
    assert _final_rows(folder) == _final_rows(reference)


def test_the_key_appears_nowhere(tmp_path: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key)) as server:
        done = dist_bench(
            tmp_path, "generate", "--config", SFT_CONFIG, *SMALL, *api_overrides(server),
            env={KEY_ENV: key, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert key not in done.stdout + done.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files) and any("shard-" in p.name for p in files)
    assert [p for p in files if key.encode() in p.read_bytes()] == []


def test_the_key_variable_is_masked_whatever_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_ACCESS", "sk-ordinary-name-123")
    assert redact("failed with sk-ordinary-name-123") == "failed with sk-ordinary-name-123"
    treat_as_secret("TEACHER_ACCESS")  # what pre-flight and the API teacher do with teacher.api.api_key_env
    assert redact("failed with sk-ordinary-name-123") == "failed with ***"


def test_a_refused_key_stops_preflight(tmp_path: Path) -> None:
    with ApiServer(Behaviour(api_key=KEY)) as server:
        done = dist_bench(
            tmp_path, "generate", "--config", SFT_CONFIG, *SMALL, *api_overrides(server),
            env={KEY_ENV: "sk-wrong", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )  # fmt: skip
    assert_rejected(done, tmp_path, KEY_ENV, "401")
    assert "sk-wrong" not in done.stderr


def test_dry_run_prints_the_plan_and_spends_nothing(tmp_path: Path, key: str) -> None:
    with ApiServer(Behaviour(api_key=key)) as server:
        done = dist_bench(
            tmp_path, "generate", "--dry-run", "--config", SFT_CONFIG, *SMALL,
            *api_overrides(server, "generation.n=2", "teacher.api.price.output_per_million=1000000"),
            env={KEY_ENV: key, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert not answered(server)
    assert "requests: 24 (12 prompts x 2 completions)" in done.stdout
    assert "worst-case cost: 288.0000" in done.stdout  # 24 x 12 completion tokens at 1 per token
    assert not (tmp_path / "runs").exists()


def _start(folder: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    defaults = {
        "HOME": str(folder),
        "HF_HOME": str(folder / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    environment = bare_environment(**{**defaults, **env})  # `env` wins over the defaults
    return subprocess.Popen([sys.executable, "-m", "dist_bench", *args], cwd=folder, env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _final_rows(folder: Path) -> list[tuple[int, int, str]]:
    shards = sorted((folder / "runs" / "teacher_generation").glob("*/generation/shards/shard-*.jsonl"))
    rows = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
    return sorted((r["prompt_id"], r["sample"], r["completion"]) for r in rows)
