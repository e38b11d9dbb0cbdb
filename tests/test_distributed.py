"""Several processes, one pipeline (distributed.py): real ranks on gloo, started by `--nproc`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmark_files import mt_bench_101_rows, write_jsonl
from mlflow.tracking import MlflowClient
from test_dpo import write_pairs

from conftest import PROJECT, SMALL
from dist_bench import models, pipeline
from dist_bench.config import load_config
from dist_bench.energy import EnergyReading, committed
from dist_bench.teacher import logit_cache


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def cache_files(parent: pipeline.ParentRun) -> dict[Path, bytes]:
    return files_under(parent.stages[0].outputs["logit_cache"])


def stage_folder(run_dir: Path) -> Path:
    return next(p for p in (run_dir / "logit_caching").iterdir() if p.is_dir())


def dist_bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIST_BENCH_PROGRESS_EVERY_S": "600"}
    return subprocess.run([sys.executable, "-m", "dist_bench", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip


def runs_by_role() -> dict[str, list]:
    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("dist_bench.role", "?"), []).append(run)
    return out


def test_two_ranks_cache_the_same_bytes_as_one_process_in_one_parent_and_one_stage_run(workdir: Path) -> None:
    overrides = [*SMALL, "data.max_samples=80"]  # 5 shards of 16: ranks take 0, 2, 4 and 1, 3
    reference = pipeline.cache_logits(load_config(None, [*overrides, f"output.run_dir={workdir / 'one'}"]))
    expected = cache_files(reference)
    before = {run.info.run_id for runs in runs_by_role().values() for run in runs}

    done = dist_bench(
        "cache_logits", "--nproc", "2", *overrides, f"output.run_dir={workdir / 'two'}", cwd=workdir
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = stage_folder(workdir / "two")
    assert files_under(folder / "logit_cache") == expected
    # both ranks worked: each committed energy after its shards
    progress = {p.name: json.loads(p.read_text()) for p in folder.glob("energy_progress.rank-*.json")}
    assert sorted(progress) == ["energy_progress.rank-0.json", "energy_progress.rank-1.json"]
    assert (
        progress["energy_progress.rank-0.json"]["attempt"]
        == progress["energy_progress.rank-1.json"]["attempt"]
    )

    new = {role: [r for r in runs if r.info.run_id not in before] for role, runs in runs_by_role().items()}
    parents, stages = new.get("pipeline", []), new.get("stage", [])
    assert len(parents) == 1 and len(stages) == 1, {role: len(runs) for role, runs in new.items()}
    assert parents[0].info.status == "FINISHED" and stages[0].info.status == "FINISHED"
    assert parents[0].data.tags["dist_bench.world_size"] == stages[0].data.tags["dist_bench.ranks"] == "2"
    assert stages[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert (
        stages[0].data.metrics["supervised_positions"] == reference.stages[0].metrics["supervised_positions"]
    )
    assert "parent run:" in done.stdout and done.stdout.count("parent run:") == 1  # rank 0 reports


def test_a_cache_interrupted_in_one_process_resumes_on_two(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*SMALL, "data.max_samples=80"]
    reference = pipeline.cache_logits(load_config(None, [*overrides, f"output.run_dir={workdir / 'one'}"]))
    cfg = load_config(None, [*overrides, f"output.run_dir={workdir / 'runs'}"])
    real_write, written = logit_cache._write_shard, []

    def write_then_die(shard_dir: Path, shard: int, tensors: dict, sums: dict) -> None:
        real_write(shard_dir, shard, tensors, sums)
        written.append(shard)
        if len(written) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(logit_cache, "_write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        pipeline.cache_logits(cfg)
    monkeypatch.undo()
    first = json.loads((stage_folder(workdir / "runs") / "energy_progress.rank-0.json").read_text())

    done = dist_bench(
        "cache_logits", "--nproc", "2", *overrides, f"output.run_dir={workdir / 'runs'}", cwd=workdir
    )
    assert done.returncode == 0, done.stderr[-3000:]
    folder = stage_folder(workdir / "runs")
    assert files_under(folder / "logit_cache") == cache_files(reference)
    (stage,) = [r for r in runs_by_role()["stage"]
                if r.info.status == "FINISHED" and r.data.tags["dist_bench.stage_dir"] == str(folder)]  # fmt: skip
    assert stage.data.tags["dist_bench.resumed"] == "true"
    # the interrupted attempt's committed time is in the figure (prior + the two ranks' longest window)
    assert stage.data.metrics["duration_s"] > first["reading"]["duration_s"] > 0


def test_two_ranks_generate_the_same_set_as_one_process(workdir: Path) -> None:
    generate = [*SMALL, "pipeline=sft", "generation.enabled=true", "generation.max_prompts=40",
                "generation.shard_size=8", "generation.batch_size=4", "generation.max_new_tokens=12",
                "generation.temperature=1.0", "generation.n=2"]  # fmt: skip  # seeded sampling
    reference = pipeline.generate(load_config(None, [*generate, f"output.run_dir={workdir / 'one'}"]))
    expected = files_under(reference.stages[0].outputs["generation"])
    assert len([p for p in expected if p.parts[0] == "shards"]) == 5

    done = dist_bench("generate", "--nproc", "2", *generate, f"output.run_dir={workdir / 'two'}", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = next(p for p in (workdir / "two" / "teacher_generation").iterdir() if p.is_dir()) / "generation"
    assert files_under(folder) == expected


def test_committed_energy_of_several_ranks_is_folded_once_and_stale_files_ignored(tmp_path: Path) -> None:
    def reading(seconds: float, gpu: str, joules: float) -> EnergyReading:
        return EnergyReading(duration_s=seconds, gpu_energy_j=joules, per_gpu_j={gpu: joules}, gpus=(gpu,),
                             cpu_energy_j=10.0, ram_energy_j=1.0)  # fmt: skip

    prior, first = committed.start_attempt(tmp_path)
    assert prior is None
    committed.commit(tmp_path, first, 0, reading(5, "GPU-a", 100))
    committed.commit(tmp_path, first, 1, reading(4, "GPU-b", 80))
    prior, second = committed.start_attempt(tmp_path)  # a resume
    # one attempt's ranks: GPUs add up, the host's CPU/RAM counts once, time is the longest rank's
    assert (prior.gpu_energy_j, prior.cpu_energy_j, prior.ram_energy_j, prior.duration_s) == (180, 10, 1, 5)
    assert not list(tmp_path.glob("energy_progress.rank-*.json"))
    committed.commit(tmp_path, second, 0, reading(2, "GPU-a", 30))
    (tmp_path / "energy_progress.rank-7.json").write_text(
        json.dumps({"attempt": first, "host": "h", "reading": reading(99, "GPU-z", 999).to_dict()})
    )  # left by an attempt killed before it removed its files: not this attempt's
    prior, _ = committed.start_attempt(tmp_path)
    # attempts add up: the same GPU in two attempts is counted in both
    assert (prior.gpu_energy_j, prior.per_gpu_j, prior.duration_s) == (210, {"GPU-a": 130, "GPU-b": 80}, 7)


def test_a_command_that_is_not_data_parallel_yet_refuses_several_processes(workdir: Path) -> None:
    config = str(PROJECT / "configs" / "experiments" / "tiny_dpo.yaml")
    done = dist_bench("preferences", "--nproc", "2", "--config", config, *SMALL, cwd=workdir)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dist-bench: error: --nproc 2: `preferences` does not run on several processes yet (only: cache_logits, "
        "generate, kd, sft, dpo, eval)"
    ]


def test_a_one_process_run_shows_torch_one_of_the_gpus_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' Trainer turns to nn.DataParallel when one process sees several GPUs, which TRL's trainers
    # refuse; the first GPU given is the one `cuda` would have meant
    from dist_bench import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert distributed.one_gpu_per_process() == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert distributed.one_gpu_per_process() is None  # one GPU: nothing to hide
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a,GPU-b")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a rank of a launched job: its launcher placed it
    assert distributed.one_gpu_per_process() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-a,GPU-b"


def test_the_ranks_of_a_host_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_bench import distributed

    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.threads_per_rank() == max(1, cores // 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cores))  # more ranks than cores: one thread each
    assert distributed.threads_per_rank() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # torchrun's, or the user's: kept
    assert distributed.threads_per_rank() == 3


def test_the_cli_says_which_gpu_a_one_process_command_uses(workdir: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1,0"}
    done = subprocess.run([sys.executable, "-m", "dist_bench", "eval", "--tasks", "list"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dist-bench: one process, one GPU: CUDA_VISIBLE_DEVICES=1 (--nproc N: N GPUs)" in done.stderr


def test_two_ranks_evaluate_what_one_process_scores_in_one_parent_and_one_stage_run(workdir: Path) -> None:
    # 9 documents: lm-eval gives the ranks 5 and 4, and pads the second with a repeated request
    common = ["eval", "--model", "tinyworld:teacher", "--max-samples", "9"]
    one = dist_bench(*common, f"output.run_dir={workdir / 'one'}", cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    before = {run.info.run_id for runs in runs_by_role().values() for run in runs}
    two = dist_bench(*common, "--nproc", "2", f"output.run_dir={workdir / 'two'}", cwd=workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("parent run:") == 1  # rank 0 reports

    new = {role: [r for r in runs if r.info.run_id not in before] for role, runs in runs_by_role().items()}
    (parent,), (stage,) = new["pipeline"], new["stage"]
    assert parent.data.tags["dist_bench.world_size"] == stage.data.tags["dist_bench.ranks"] == "2"
    (reference,) = [r for r in runs_by_role()["stage"] if r.info.run_id in before]
    scores = {k: v for k, v in reference.data.metrics.items() if k.startswith("eval/") and "/" in k[5:]}
    assert {"eval/tiny_arith/exact_match", "eval/tiny_mc/acc"} <= scores.keys()
    quality = [
        k for k in scores if k.rsplit("/", 1)[1] not in ("tokens", "duration_s", "energy_j", "j_per_token")
    ]
    assert {k: stage.data.metrics[k] for k in quality} == {k: scores[k] for k in quality}
    # the ranks split the documents (each reading all of them would be twice the tokens); the padded request
    # is work done, so at least the one-process tokens
    assert 1 <= stage.data.metrics["prefill_tokens"] / reference.data.metrics["prefill_tokens"] < 1.3
    (folder,) = [p for p in (workdir / "two" / "eval").iterdir() if p.is_dir()]
    assert (folder / "energy_progress.rank-1.json").exists()  # rank 1 committed after each task
    per_task = [json.loads(p.read_text()) for p in (workdir / "two" / "eval").glob("*/tasks_done/*.json")]
    assert sorted(r["task"] for r in per_task) == ["tiny_arith", "tiny_mc"]


def test_a_judge_benchmark_in_a_two_rank_eval_is_judged_once_as_in_one_process(workdir: Path) -> None:
    # lm-eval's task split by rank; MT-Bench-101 (the tiny teacher answering and judging) on rank 0 alone
    data = write_jsonl(workdir / "mtbench101.jsonl", mt_bench_101_rows())
    common = ["eval", "--model", "tinyworld:teacher", "--max-samples", "5",
              'eval.tasks=["tiny_arith", "mt_bench_101"]', f"eval.data={json.dumps({'mt_bench_101': str(data)})}",
              'eval.judge={"model": "tinyworld:teacher"}', "eval.max_new_tokens=8", "eval.judge_max_new_tokens=8"]  # fmt: skip
    one = dist_bench(*common, f"output.run_dir={workdir / 'one'}", cwd=workdir)
    assert one.returncode == 0, one.stderr[-3000:]
    before = {run.info.run_id for run in runs_by_role()["stage"]}
    two = dist_bench(*common, "--nproc", "2", f"output.run_dir={workdir / 'two'}", cwd=workdir)
    assert two.returncode == 0, two.stderr[-3000:]
    (reference,) = [r.data.metrics for r in runs_by_role()["stage"] if r.info.run_id in before]
    (stage,) = [r.data.metrics for r in runs_by_role()["stage"] if r.info.run_id not in before]
    judged = ["judged_turns", "unrated", "judge_tokens", "tokens"]  # the judge's work: once, not per rank
    for key in [f"eval/mt_bench_101/{name}" for name in judged] + ["eval/tiny_arith/exact_match"]:
        assert stage[key] == reference[key], key
    assert (
        reference["eval/mt_bench_101/judged_turns"] == 2 and reference["eval/mt_bench_101/judge_tokens"] > 0
    )


def final_weights(run_dir: Path, method: str) -> dict:
    from safetensors.torch import load_file

    stage, name = ("dpo_training", "final_policy") if method == "dpo" else ("student_train", "final_model")
    (folder,) = [p for p in (run_dir / stage).iterdir() if p.is_dir()]
    return load_file(str(folder / name / "model.safetensors"))


@pytest.mark.parametrize(
    ("method", "split"),
    [
        ("sft", "train.grad_accum=2"),
        ("sft", "train.grad_accum=1"),
        ("kd", "train.grad_accum=2"),
        ("dpo", "train.grad_accum=2"),
    ],
)
def test_two_ranks_train_the_weights_one_process_trains_with_the_same_global_batch(
    workdir: Path, method: str, split: str
) -> None:
    """grad_accum 2: each rank runs one micro-batch of 8 per step; grad_accum 1: each runs a micro-batch of
    4 (distributed.step_split). Either way a step is the plan's 8 x grad_accum sequences."""
    pairs = [f"preferences.path={write_pairs(workdir)}"] if method == "dpo" else []  # the tiny world's
    overrides = [*SMALL, f"pipeline={method}", "eval.limit=4", split, *pairs]
    cfg = load_config(None, [*overrides, f"output.run_dir={workdir / 'one'}"])
    getattr(pipeline, method)(cfg)
    done = dist_bench(method, "--nproc", "2", *overrides, f"output.run_dir={workdir / 'two'}", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, got = final_weights(workdir / "one", method), final_weights(workdir / "two", method)
    if method != "dpo":
        (trained,) = (workdir / "two" / "student_train").glob("*/student_train.json")
        assert json.loads(trained.read_text())["parallelism"] == "ddp"
    ranks = {r.data.tags["dist_bench.stage"]: r.data.tags["dist_bench.ranks"] for r in runs_by_role()["stage"]
             if r.data.tags["dist_bench.stage_dir"].startswith(str(workdir / "two"))}  # fmt: skip
    trained = "dpo_training" if method == "dpo" else "student_train"
    upstream = {"kd": {"logit_caching": "2"}}.get(method, {})
    assert ranks == {trained: "2", "eval": "2", **upstream}
    initial = models.load_model(cfg.student.model, torch.device("cpu"), "float32").state_dict()
    assert expected.keys() == got.keys()
    for name, weight in expected.items():
        # fp32 on CPU: the ranks' gradients are summed in another order, a few ulps per step
        assert (got[name] - weight).abs().max() <= 1e-5 * max(1.0, float(weight.abs().max())), name
    moved = max(float((expected[n] - initial[n]).abs().max()) for n in expected if n in initial)
    assert moved > 1e-3  # the training did change the weights: the comparison is not of two copies


def test_ranks_that_cannot_share_a_step_are_refused_before_anything_starts(workdir: Path) -> None:
    done = dist_bench("sft", "--nproc", "3", *SMALL, "pipeline=sft", "train.batch_size=4", "train.grad_accum=2",
                      f"output.run_dir={workdir / 'runs'}", cwd=workdir)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dist-bench: error: train.batch_size 4, train.grad_accum 2: 3 processes divide neither, so they cannot "
        "share an optimizer step evenly"
    ]
    assert not (workdir / "runs").exists()


def test_fsdp_on_cpu_ranks_is_refused_before_anything_starts(workdir: Path) -> None:
    done = dist_bench("sft", "--nproc", "2", *SMALL, "pipeline=sft", "train.distributed=fsdp",
                      f"output.run_dir={workdir / 'runs'}", cwd=workdir)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "dist-bench: error: train.distributed=fsdp: accelerate shards a model over GPUs only; CPU ranks train "
        "with ddp"
    ]


def _window_rank(rank: int, folder: str) -> None:
    import time

    import torch.distributed as dist

    from dist_bench.config import EnergyConfig
    from dist_bench.energy import window as window_module

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    own: list = []
    window_module.combine_ranks = lambda reading: own.append(reading) or reading  # this rank's own figure
    if rank == 0:
        time.sleep(0.5)  # rank 0 opens the stage late (it logs the run's params first) ...
    with window_module.EnergyWindow(EnergyConfig(enabled=False), Path(folder), "stage") as window:
        if rank == 0:
            time.sleep(1.0)  # ... and finishes late (it writes the final model)
    Path(folder, f"rank-{rank}.json").write_text(
        json.dumps({"started_at": window.started_at, "duration_s": own[0].duration_s})
    )
    dist.destroy_process_group()


def test_every_rank_measures_the_stage_from_the_same_start_to_the_same_end(tmp_path: Path) -> None:
    # a rank that follows rank 0, or finishes its share first, still holds its GPU for the job
    import torch.multiprocessing as mp

    mp.spawn(_window_rank, args=(str(tmp_path),), nprocs=2)
    zero, one = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert abs(one["started_at"] - zero["started_at"]) < 0.2
    assert one["duration_s"] > 0.9 and abs(one["duration_s"] - zero["duration_s"]) < 0.2
