"""Pre-flight: every bad input is answered before anything starts, with one line naming the culprit.

Each case runs the real command in its own process, folder and MLflow store, as a user would, and checks
what the user gets: exit code 2, exactly one stderr line naming the field, file and line, URI or option,
no MLflow run left RUNNING or FINISHED, and no stage started (no run dir written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import PROJECT, bare_environment, free_port, small_config, store_outside_the_checkout
from dist_bench import preflight, tinyworld
from dist_bench.teacher.cache_format import open_cache

STUDENT = tinyworld.ASSETS / "student-init"
ARITH_TASK = PROJECT / "configs" / "tasks" / "tiny_arith.yaml"


def dist_bench(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m dist_bench args` in `folder`, with a store of its own there and the Hub off limits."""
    defaults = {
        "HOME": str(folder),
        "HF_HOME": str(folder / "hf-home"),  # an empty Hugging Face cache
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
    }
    environment = bare_environment(**{**defaults, **(env or {})})  # `env` wins over the defaults
    return subprocess.run(
        [sys.executable, "-m", "dist_bench", *args],
        cwd=folder,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_rejected(done: subprocess.CompletedProcess[str], folder: Path, *culprit: str) -> str:
    """Exit 2, one stderr line naming the culprit, nothing RUNNING or FINISHED, no stage started."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("dist-bench: error: "), lines[0]
    for part in culprit:
        assert part in lines[0], lines[0]
    assert "Traceback" not in done.stdout + done.stderr
    db = folder / "mlflow.db"
    if db.exists():
        statuses = [row[0] for row in sqlite3.connect(db).execute("select status from runs")]
        assert not {"RUNNING", "FINISHED"} & set(statuses), statuses
    assert not (folder / "runs").exists(), "a stage started"
    return lines[0]


def copy_student(folder: Path, edit: Callable[[Path], None]) -> Path:
    student = folder / "student"
    shutil.copytree(STUDENT, student)
    edit(student)
    return student


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- late failure after paid work: now found before the first stage --------------------------------------


def test_student_path_that_does_not_exist(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", f"student.model={tmp_path / 'no-such-student'}")
    assert_rejected(done, tmp_path, "student.model:", "no-such-student", "no such folder")


def test_student_with_another_tokenizer(tmp_path: Path) -> None:
    def add_token(folder: Path) -> None:
        edit_json(folder / "tokenizer.json", lambda t: t["model"]["vocab"].update({"<extra>": 999}))

    student = copy_student(tmp_path, add_token)
    done = dist_bench(tmp_path, "kd", f"student.model={student}")
    assert_rejected(done, tmp_path, "student.model:", "tokenizer", "differs from the teacher's")


def test_student_with_another_vocabulary_size(tmp_path: Path) -> None:
    student = copy_student(
        tmp_path, lambda f: edit_json(f / "config.json", lambda c: c.update(vocab_size=300))
    )
    done = dist_bench(tmp_path, "kd", f"student.model={student}")
    assert_rejected(done, tmp_path, "student.model:", "vocab_size 300", "teacher's 258")


def test_unknown_eval_task(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", "eval.tasks=[tiny_arith,tiny_nope]")
    assert_rejected(done, tmp_path, "eval.tasks:", "'tiny_nope'")


def test_a_bad_value_in_a_config_file_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    """The value came from a file: the line leads with that file and line, as a compiler's would; the names
    the task folder knows are its top-level ones (not the OLMES group's 140 subtasks)."""
    text = (PROJECT / "configs" / "experiments" / "tiny_kd.yaml").read_text()
    config = tmp_path / "experiment.yaml"
    config.write_text(text.replace("tasks: [tiny_arith, tiny_mc]", "tasks: [tiny_arith, tiny_nope]"))
    line = config.read_text().splitlines().index("  tasks: [tiny_arith, tiny_nope]") + 1
    done = dist_bench(
        tmp_path, "kd", "--config", str(config), f"eval.task_dir={PROJECT / 'configs' / 'tasks'}"
    )
    message = assert_rejected(
        done, tmp_path, f"error: experiment.yaml:{line}: eval.tasks: unknown task 'tiny_nope'"
    )
    assert "(known there: olmes, tiny_arith, tiny_mc, and " in message and len(message) < 500


def test_energy_devices_must_be_gpus_nvml_has_here(tmp_path: Path) -> None:
    """Named GPUs that NVML cannot read would leave every stage's GPU energy out of the table, in a tag."""
    done = dist_bench(tmp_path, "kd", "energy.gpu_devices=[0]")
    if done.returncode == 0:
        pytest.skip("this host's NVML reads GPU 0")
    assert_rejected(done, tmp_path, "energy.gpu_devices: [0]: NVML cannot be read on this host")


@pytest.mark.parametrize(
    ("devices", "culprit"),
    [
        ("[0]", None),
        ("[1]", "energy.gpu_devices: no NVML device 1: this host has 1 (indices 0 to 0)"),
        ("[0,0]", "energy.gpu_devices: [0, 0] names device 0 twice"),
    ],
)
def test_energy_devices_are_checked_against_nvml(
    workdir: Path, simulated_gpu: object, devices: str, culprit: str | None
) -> None:
    cfg = small_config(workdir, f"energy.gpu_devices={devices}", "pipeline=sft")
    if culprit is None:
        checks = preflight.run(cfg, "sft")
        assert checks[-1].name == "energy.gpu_devices" and "of 1 on this host" in checks[-1].detail
    else:
        with pytest.raises(preflight.PreflightError, match=re.escape(culprit)):
            preflight.run(cfg, "sft")


def test_missing_task_folder(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", f"eval.task_dir={tmp_path / 'no-tasks'}")
    assert_rejected(done, tmp_path, "eval.task_dir:", "no-tasks", "is not a folder")


def test_task_whose_data_file_is_missing(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    text = ARITH_TASK.read_text().replace("../../dist_bench", str(PROJECT / "dist_bench"))
    (tasks / "tiny_arith.yaml").write_text(text.replace("arith_eval.jsonl", "gone.jsonl"))
    done = dist_bench(tmp_path, "kd", f"eval.task_dir={tasks}", "eval.tasks=[tiny_arith]")
    assert_rejected(done, tmp_path, "eval.tasks:", "tiny_arith", "gone.jsonl", "not found")


def test_task_on_a_hub_dataset_that_is_not_cached_while_offline(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    lines = ARITH_TASK.read_text().replace("task: tiny_arith", "task: gsm8k_like").splitlines()
    at = lines.index("dataset_kwargs:")
    del lines[at : at + 4]  # dataset_kwargs: data_files: train: test: -> the dataset comes from the Hub
    lines[lines.index("dataset_path: json")] = "dataset_path: openai/gsm8k\ndataset_name: main"
    (tasks / "gsm8k_like.yaml").write_text("\n".join(lines) + "\n")
    done = dist_bench(tmp_path, "kd", f"eval.task_dir={tasks}", "eval.tasks=[gsm8k_like]")
    assert_rejected(done, tmp_path, "eval.tasks:", "'gsm8k_like'", "'openai/gsm8k'", "not in the local cache")


def test_unknown_tinyworld_asset(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", "teacher.model=tinyworld:teacher-xl")
    assert_rejected(done, tmp_path, "teacher.model:", "tinyworld:teacher-xl")


# ---- what used to end in a traceback -----------------------------------------------------------------


def test_model_folder_without_a_config(tmp_path: Path) -> None:
    (tmp_path / "empty-model").mkdir()
    done = dist_bench(tmp_path, "kd", f"teacher.model={tmp_path / 'empty-model'}")
    assert_rejected(done, tmp_path, "teacher.model:", "empty-model", "no config.json")


def test_hub_id_that_is_not_cached_while_offline(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", "student.model=nobody/no-such-model")
    assert_rejected(done, tmp_path, "student.model:", "'nobody/no-such-model'", "HF_HUB_OFFLINE")


def test_hub_id_in_the_local_cache_passes_offline(tmp_path: Path) -> None:
    """The real Hugging Face cache layout (models--org--name/snapshots/<commit>, refs/main) is accepted."""
    repo = tmp_path / "hf-home" / "hub" / "models--tiny--student"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(STUDENT, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    done = dist_bench(tmp_path, "validate", "kd", "student.model=tiny/student")
    assert done.returncode == 0, done.stderr
    assert "student.model" in done.stdout and "tiny/student (Hugging Face cache)" in done.stdout


def test_runs_uri_of_a_run_that_does_not_exist(tmp_path: Path) -> None:
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("dist-bench")
    uri = "runs:/0123456789abcdef0123456789abcdef/final_model"
    done = dist_bench(tmp_path, "eval", "--model", uri)
    assert_rejected(done, tmp_path, "--model:", uri)


def test_runs_uri_with_an_artifact_path_that_does_not_exist(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("dist-bench"))
    client.set_terminated(run.info.run_id, "FAILED")  # a run of some earlier, unrelated attempt
    uri = f"runs:/{run.info.run_id}/final_model"
    done = dist_bench(tmp_path, "kd", f"student.model={uri}")
    assert_rejected(done, tmp_path, "student.model:", uri, "no such artifact")


def test_models_uri_that_is_not_registered(tmp_path: Path) -> None:
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").create_experiment("dist-bench")
    done = dist_bench(tmp_path, "eval", "--model", "models:/tiny-student/3")
    assert_rejected(done, tmp_path, "--model:", "models:/tiny-student/3")


def test_cuda_requested_without_a_gpu(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = dist_bench(tmp_path, "kd", "train.device=cuda")
    assert_rejected(done, tmp_path, "train.device=cuda", "no CUDA device")


@pytest.mark.parametrize("pipeline", ["kd", "sft", "dpo"])
def test_liger_kernels_without_a_gpu(tmp_path: Path, pipeline: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = PROJECT / "configs" / "experiments" / f"tiny_{pipeline}.yaml"
    done = dist_bench(tmp_path, pipeline, "--config", str(config), "train.liger_kernel=true")
    assert_rejected(done, tmp_path, "train.liger_kernel", "need a CUDA device")


def test_run_dir_that_is_not_writable(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    # Root may write anywhere os.access says no; an immutable folder it cannot.
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        done = dist_bench(tmp_path, "kd", f"output.run_dir={locked / 'runs'}")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert_rejected(done, tmp_path, "output.run_dir:", "locked", "not writable")
    assert not (locked / "runs").exists()


def test_run_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "runs.txt").write_text("not a folder")
    done = dist_bench(tmp_path, "kd", f"output.run_dir={tmp_path / 'runs.txt'}")
    assert_rejected(done, tmp_path, "output.run_dir:", "runs.txt", "is a file")


def test_data_line_that_is_not_utf8(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    good = json.dumps({"prompt": "Question: 1 + 1?\nAnswer:", "completion": " #### 2"}).encode() + b"\n"
    data.write_bytes(good * 2 + b'{"prompt": "caf\xe9", "completion": " x"}\n' + good)
    done = dist_bench(tmp_path, "kd", f"data.train={data}")
    assert_rejected(done, tmp_path, f"data.train: {data}:3: not valid UTF-8 (byte 0xe9")


def test_data_line_that_is_not_json(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n')
    done = dist_bench(tmp_path, "cache_logits", f"data.train={data}")
    assert_rejected(done, tmp_path, f"data.train: {data}:2: not valid JSON")


@pytest.mark.parametrize(("pipeline", "generation"), [("kd", "false"), ("sft", "false"), ("sft", "true")])
def test_a_record_far_down_with_nothing_to_learn(tmp_path: Path, pipeline: str, generation: str) -> None:
    """Record 1,500 of 1,600 (past the first tokenizer batch): its prompt fills data.max_length, so the
    stage would stop when it loads the data, after the MLflow runs are open (with generation: after the
    teacher has written every completion)."""
    data = tmp_path / "train.jsonl"
    rows = [
        {"prompt": "What is 1 + 1?" if i != 1499 else "x " * 200, "completion": " 2"} for i in range(1600)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = PROJECT / "configs" / "experiments" / f"tiny_{pipeline}.yaml"
    done = dist_bench(tmp_path, pipeline, "--config", str(config), f"data.train={data}", f"generation.enabled={generation}",
                      f"eval.task_dir={PROJECT / 'configs' / 'tasks'}", "data.max_length=96")  # fmt: skip
    assert_rejected(done, tmp_path, f"data.train: {data}:1500: row 1499: prompt fills data.max_length=96")


def test_data_file_that_does_not_exist(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", f"data.train={tmp_path / 'nope.jsonl'}")
    assert_rejected(done, tmp_path, "data.train:", "nope.jsonl", "not found")


def test_tracking_uri_with_a_typo_in_its_scheme(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "kd", env={"MLFLOW_TRACKING_URI": f"sqlte:///{tmp_path / 'mlflow.db'}"})
    assert_rejected(done, tmp_path, "MLFLOW_TRACKING_URI:", "unknown scheme 'sqlte'")


def test_tracking_uri_at_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    done = dist_bench(tmp_path, "kd", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'notes.txt'}"})
    assert_rejected(done, tmp_path, "MLFLOW_TRACKING_URI:", "notes.txt", "is not an SQLite database")
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def test_tracking_server_that_is_not_listening(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = dist_bench(tmp_path, "kd", env={"MLFLOW_TRACKING_URI": url})
    assert_rejected(done, tmp_path, "MLFLOW_TRACKING_URI:", url, "no tracking server answers")
    assert time.monotonic() - started < 30  # not minutes of MLflow's retries


def test_report_against_a_server_that_is_not_listening(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = dist_bench(tmp_path, "report", "--output-dir", "table", env={"MLFLOW_TRACKING_URI": url})
    assert_rejected(done, tmp_path, "MLFLOW_TRACKING_URI:", url)
    assert not (tmp_path / "table").exists()


def test_prerun_output_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_text("")
    done = dist_bench(tmp_path, "prerun", "--quick", "--output-dir", str(tmp_path / "report.txt"))
    assert_rejected(done, tmp_path, "--output-dir:", "report.txt", "is a file")


def test_unbalanced_quote_in_mlproject_overrides(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(PROJECT / "entry_points" / "kd.py"), "--overrides", "name='unclosed seed=3"],
        cwd=tmp_path,
        env=bare_environment(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_rejected(done, tmp_path, "--overrides:", "No closing quotation")


# ---- limits that used to be found inside the work ------------------------------------------------------


def test_top_k_larger_than_the_teacher_vocabulary(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "cache_logits", "logits.top_k=300")
    assert_rejected(done, tmp_path, "logits.top_k:", "300", "258 tokens")


def write_long_generation_task(folder: Path) -> Path:
    """tiny_arith as real GSM8K is written: no max_gen_toks, so lm-eval generates up to its 256 tokens."""
    tasks = folder / "tasks"
    tasks.mkdir()
    text = ARITH_TASK.read_text().replace("task: tiny_arith", "task: tiny_arith_long")
    text = text.replace("  max_gen_toks: 16", "").replace("../../dist_bench", str(PROJECT / "dist_bench"))
    (tasks / "tiny_arith_long.yaml").write_text(text)
    return tasks


def test_task_that_generates_beyond_the_model_context(tmp_path: Path) -> None:
    tasks = write_long_generation_task(tmp_path)
    done = dist_bench(tmp_path, "kd", f"eval.task_dir={tasks}", "eval.tasks=[tiny_arith_long]")
    assert_rejected(
        done,
        tmp_path,
        "eval.tasks:",
        "'tiny_arith_long' generates up to 256 tokens",
        "128",
        "eval.max_length",
    )


def test_eval_max_length_reaches_lm_eval(workdir: Path) -> None:
    """With eval.max_length above the generation length, the same task runs through lm-eval (which would
    otherwise stop on its assertion that max_length exceeds max_gen_toks)."""
    from dist_bench import pipeline

    tasks = write_long_generation_task(workdir)
    cfg = small_config(workdir, f"eval.task_dir={tasks}", "eval.tasks=[tiny_arith_long]", "eval.limit=2")
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_length": 384})})
    parent = pipeline.evaluate(cfg, "tinyworld:teacher")
    assert "eval/tiny_arith_long/exact_match" in parent.stages[0].metrics


# ---- disk ---------------------------------------------------------------------------------------------


def test_planned_cache_size_matches_the_cache_written(workdir: Path) -> None:
    from dist_bench import pipeline

    # cover 1.0 keeps exactly top_k per position: the estimate is then the size, less each shard file's few
    # hundred bytes of safetensors header; an adaptive cover keeps fewer, and the estimate is a bound
    for cover, at_most in (("1.0", True), ("0.9", False)):
        cfg = small_config(workdir, f"logits.cover={cover}")
        teacher = preflight.model_facts(preflight.model_source("teacher.model", cfg.teacher), cfg.teacher)
        planned = preflight.planned_cache_bytes(
            cfg, teacher.tokenizer, preflight.data_records(cfg, trained_on=True)
        )
        manifest = open_cache(pipeline.cache_logits(cfg).stages[0].outputs["logit_cache"]).manifest
        written, headers = manifest["bytes"], 1000 * len(manifest["shards"])  # safetensors' JSON header
        if at_most:
            assert 0 < written - planned < 0.05 * written + headers, (planned, written)
        else:
            assert written < 0.5 * planned, (planned, written)


def test_logit_cache_larger_than_the_free_disk(tmp_path: Path) -> None:
    small_disk = tmp_path / "small-disk"
    small_disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small_disk)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        done = dist_bench(
            tmp_path, "cache_logits", f"output.run_dir={small_disk / 'runs'}", "logits.top_k=64"
        )
    finally:
        subprocess.run(["umount", str(small_disk)], check=True)
    assert_rejected(done, tmp_path, "output.run_dir:", "small-disk", "logit cache", "needs up to")


# ---- dist-bench validate ------------------------------------------------------------------------------


def test_validate_lists_its_checks_and_writes_nothing(tmp_path: Path) -> None:
    config = PROJECT / "configs" / "experiments" / "tiny_kd.yaml"
    done = dist_bench(tmp_path, "validate", "kd", "--config", str(config))
    assert done.returncode == 0, done.stderr
    listed = [line for line in done.stdout.splitlines() if line.startswith("ok  ")]
    names = ["pipeline", "tracking store", "output.run_dir", "teacher.model", "student.model", "data.train",
             "train.device", "eval.device", "logits.top_k", "vocabulary", "eval.tasks", "disk"]  # fmt: skip
    assert [line[4:].split("  ")[0].strip() for line in listed] == names
    assert done.stdout.strip().endswith(f"kd: all {len(names)} pre-flight checks passed")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


def test_validate_a_config_with_a_missing_student_in_under_5_seconds(tmp_path: Path) -> None:
    config = tmp_path / "missing_student.yaml"
    text = (PROJECT / "configs" / "experiments" / "tiny_kd.yaml").read_text()
    config.write_text(text.replace("model: tinyworld:student-init", f"model: {tmp_path / 'students' / 'v2'}"))
    started = time.monotonic()
    done = dist_bench(tmp_path, "validate", "kd", "--config", str(config))
    elapsed = time.monotonic() - started
    assert_rejected(done, tmp_path, "student.model:", "students/v2")
    assert elapsed < 5, elapsed


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = dist_bench(tmp_path, "--debug", "kd", "teacher.model=tinyworld:teacher-xl")
    assert done.returncode == 2
    assert "Traceback" in done.stderr and done.stderr.strip().splitlines()[-1].startswith(
        "dist-bench: error:"
    )


def test_pipeline_records_its_preflight_checks(workdir: Path) -> None:
    from dist_bench import pipeline

    parent = pipeline.cache_logits(small_config(workdir))
    logged = MlflowClient().download_artifacts(parent.run_id, "preflight.json", str(workdir))
    names = [check["name"] for check in json.loads(Path(logged).read_text())]
    assert names[:2] == ["tracking store", "output.run_dir"] and "logits.top_k" in names


# ---- a Hub id while the Hub may be used: answered by a real HTTP server in the Hub's API shape ------------


class FakeHubApi(BaseHTTPRequestHandler):
    """The two answers of the Hub's model API that pre-flight turns into messages (huggingface_hub reads
    the X-Error-Code header)."""

    def do_GET(self) -> None:
        code = "RevisionNotFound" if "/revision/" in self.path else "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": code}).encode())

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHubApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def online(endpoint: str) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}


def test_hub_id_that_the_hub_does_not_have(tmp_path: Path, hub: str) -> None:
    done = dist_bench(tmp_path, "kd", "student.model=nobody/missing", env=online(hub))
    assert_rejected(done, tmp_path, "student.model:", "'nobody/missing'", "no such model is on the Hub")


def test_hub_revision_that_does_not_exist(tmp_path: Path, hub: str) -> None:
    done = dist_bench(tmp_path, "kd", "student.model=org/model", "student.revision=v9", env=online(hub))
    assert_rejected(done, tmp_path, "student.revision: 'v9' not found in org/model")


def test_hub_id_while_the_hub_is_unreachable(tmp_path: Path) -> None:
    done = dist_bench(
        tmp_path, "kd", "student.model=org/model", env=online(f"http://127.0.0.1:{free_port()}")
    )
    assert_rejected(done, tmp_path, "student.model:", "'org/model'", "the Hub is unreachable")


# ---- under `mlflow run` -------------------------------------------------------------------------------


def test_under_mlflow_run_the_one_line_comes_last_before_mlflows_framing(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store_outside_the_checkout(tmp_path)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env.pop("MLFLOW_RUN_ID", None)
    done = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "kd", "--env-manager", "local",
         "-P", f"overrides=student.model={tmp_path / 'no-such-student'} output.run_dir={tmp_path / 'runs'}"],
        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    ours = [i for i, line in enumerate(lines) if line.startswith("dist-bench: error: ")]
    assert len(ours) == 1 and "student.model:" in lines[ours[0]], done.stderr[-3000:]
    after = lines[ours[0] + 1 :]  # MLflow's own framing only
    assert len(after) == 1 and "mlflow.cli: === Run (ID" in after[0] and after[0].endswith("failed ==="), (
        after
    )
    runs = MlflowClient(env["MLFLOW_TRACKING_URI"]).search_runs(
        [e.experiment_id for e in MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()]
    )
    assert [r.info.status for r in runs] == ["FAILED"]  # the run `mlflow run` made; no stage was started
    assert not (tmp_path / "runs").exists()
