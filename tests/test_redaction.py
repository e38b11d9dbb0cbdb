"""Credentials never leave the process: not in what is printed, not in the store, not in the run dir."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SMALL
from dist_bench.redact import redact

PASSWORD = "secret"


def test_uri_passwords_are_masked_and_users_kept() -> None:
    text = "API request to http://alice:hunter2@mlflow.internal:5000/api/2.0 failed; see https://b:x%40y@h/"
    assert (
        redact(text)
        == "API request to http://alice:***@mlflow.internal:5000/api/2.0 failed; see https://b:***@h/"
    )
    assert redact("sqlite:///mlflow.db and http://host:5000 stay as they are") == (
        "sqlite:///mlflow.db and http://host:5000 stay as they are"
    )


def test_secret_environment_values_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-abcdef123456")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pa55word-xyz")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # not a secret; "1" is never masked
    text = "key sk-live-abcdef123456, password pa55word-xyz, offline 1"
    assert redact(text) == "key ***, password ***, offline 1"


def store_text(db: Path) -> str:
    """Every value in every table of an MLflow SQLite store (its schema has a `secrets` table of its own,
    so the file's bytes would find the word there whatever we did)."""
    connection = sqlite3.connect(db)
    tables = [row[0] for row in connection.execute("select name from sqlite_master where type = 'table'")]
    values = [repr(row) for table in tables for row in connection.execute(f'select * from "{table}"')]
    return "\n".join(values)


def files_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_pipeline_and_report_through_a_server_reached_with_credentials(server: str, tmp_path: Path) -> None:
    with_credentials = server.replace("http://", f"http://user:{PASSWORD}@")
    env = {**os.environ, "MLFLOW_TRACKING_URI": with_credentials}
    env.pop("MLFLOW_RUN_ID", None)
    work = tmp_path / "work"
    work.mkdir()

    def dist_bench(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dist_bench", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    kd = dist_bench("kd", *SMALL, f"output.run_dir={work / 'runs'}")
    assert kd.returncode == 0, kd.stderr[-3000:]
    report = dist_bench("report", "--experiment", "dist-bench", "--output-dir", str(work / "report"))
    assert report.returncode == 0, report.stderr[-3000:]
    missing = dist_bench("report", "--experiment", "no-such-experiment")  # an error line naming the store
    assert missing.returncode == 2 and "http://user:***@127.0.0.1" in missing.stderr, missing.stderr
    failing = dist_bench(
        "kd", *SMALL, f"output.run_dir={work / 'runs'}", "student.model=runs:/0123abcd/final_model"
    )
    assert failing.returncode == 2, failing.stderr

    printed = "\n".join(p.stdout + p.stderr for p in (kd, report, missing, failing))
    assert "tiny-kd" in printed and PASSWORD not in printed
    assert "tiny-kd" in store_text(tmp_path / "server.db") and PASSWORD not in store_text(
        tmp_path / "server.db"
    )
    artifacts = files_text(tmp_path / "server-artifacts")
    assert "environment.json" in str(list((tmp_path / "server-artifacts").rglob("environment.json")))
    assert PASSWORD not in artifacts
    assert PASSWORD not in files_text(work)


def test_mlflow_telemetry_is_off_unless_asked() -> None:
    """Its background thread pops an environment variable while others read the environment (KeyError at
    random in the API teacher's HTTP client); dist_bench turns it off unless the user set the switch."""
    code = "import dist_bench, mlflow.telemetry as t; print(t.get_telemetry_client() is None)"
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_DISABLE_TELEMETRY"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
