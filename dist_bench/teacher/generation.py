"""Stage `teacher_generation`: the teacher writes completions for the data's prompts; filters pick the ones
the student learns from.

    dist-bench generate --config configs/experiments/tiny_sft.yaml      (the stage alone)
    dist-bench sft --config configs/experiments/tiny_sft.yaml           (then student_train on its output)

Prompts are data.train's records: the prompt of a prompt/completion record (its completion is the
reference answer for verification), or a conversation up to its last assistant turn (that turn is the
reference). Layout under `<stage dir>/generation/`:

    shards/shard-00000.jsonl   generation.shard_size prompts' rows, one per completion: prompt_id, sample,
                               prompt (text or messages), completion, finish_reason, prompt_tokens,
                               completion_tokens, reference, teacher, decoding; written whole (temporary
                               name, then renamed), so a shard that exists is complete
    train.jsonl                the completions every filter kept, in data.format (what student_train reads)
    filter_report.json         per filter: seen, kept, dropped, settings
    manifest.json              written last: counts, shard hashes, teacher, decoding

A killed stage resumes at the first missing shard; each batch's seed is fixed by the config (see
local.py), so with greedy decoding, or sampling on CPU, the output is byte-identical to an uninterrupted
run. Unfiltered shards stay for audit. The filters are part of this stage's inputs: changing one
regenerates; changing only a training setting reuses the stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_bench import distributed, models
from dist_bench.config import DataConfig, ModelSpec, RunConfig, flatten
from dist_bench.dataset import data_fingerprint, read_records
from dist_bench.errors import DataError
from dist_bench.generation.filters import Generated, apply_filters
from dist_bench.progress import Progress
from dist_bench.teacher.interface import Decoding, Prompt, Teacher
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

if TYPE_CHECKING:
    import torch

STAGE = "teacher_generation"
FORMAT = "dist-bench-generation/1"


def run(parent: ParentRun) -> StageResult:
    cfg = parent.cfg
    device = models.pick_device(cfg.train.device)

    def work(ctx: StageContext) -> StageWork:
        out = ctx.stage_dir / "generation"
        return generate(
            load_writer(cfg, cfg.teacher, out / "api-samples", device), cfg, out, ctx.commit_energy
        )

    # A local teacher writes shards on every rank; an API teacher is one client (its budget and pace are
    # one process's), and the server behind it is what scales.
    return execute_stage(
        parent,
        STAGE,
        stage_params(cfg, device),
        work,
        tags=stage_tags(cfg),
        gpu_unmeasured=unmeasured_gpu(cfg),
        data_parallel=cfg.teacher.api is None,
    )


def stage_params(cfg: RunConfig, device: torch.device, skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """What every teacher_generation run depends on: the teacher, the prompts and the decoding
    (`skip`: generation settings that do not apply, such as the SFT filters in preference mode)."""
    return {
        **writer_params(cfg.teacher, "teacher", device),
        **flatten(cfg.data.model_dump(), "data."),
        **flatten(cfg.generation.model_dump(exclude=set(skip)), "generation."),
        "generation.seed": str(seed_of(cfg)),
        "data.fingerprint": data_fingerprint(cfg.data),
    }


def stage_tags(cfg: RunConfig) -> dict[str, str]:
    api = cfg.teacher.api
    return {"dist_bench.teacher": api.model if api is not None else cfg.teacher.model}


def writer_params(spec: ModelSpec, prefix: str, device: torch.device) -> dict[str, str]:
    """What a writer's completions depend on: an API's server, model and endpoint (pace, budget, price and
    cache change only how they are bought), or a local model's spec, weights and device."""
    api = getattr(spec, "api", None)
    if api is not None:
        return {f"{prefix}.api.base_url": api.base_url, f"{prefix}.api.model": api.model,
                f"{prefix}.api.endpoint": api.endpoint}  # fmt: skip
    return {
        **flatten(spec.model_dump(exclude={"api"}), f"{prefix}."),
        f"{prefix}.fingerprint": models.fingerprint(spec.model, spec.revision),
        "device": device.type,
    }


def load_writer(
    cfg: RunConfig, spec: ModelSpec, journal: Path, device: torch.device, own_template: bool = False
) -> Teacher:
    """A model that writes completions: behind an API (spec.api; its per-sample journal in `journal`), or
    loaded here (`own_template`: conversations through the model's own chat template, not the data's)."""
    api = getattr(spec, "api", None)
    if api is not None:
        from dist_bench.teacher.api import ApiTeacher

        return ApiTeacher(api, journal, Path(cfg.output.run_dir) / api.cache_dir)
    from dist_bench.teacher.local import LocalTeacher  # torch and transformers only when generating

    return LocalTeacher.load(cfg, device, spec, own_template)


def unmeasured_gpu(cfg: RunConfig) -> str | None:
    """Why the stage's GPU energy cannot be measured here: a remote teacher, unless energy.gpu_devices names
    the local GPUs its server runs on."""
    if cfg.teacher.api is not None and cfg.energy.gpu_devices is None:
        return "remote teacher: its GPUs cannot be measured from here (energy.gpu_devices names local ones)"
    return None


def seed_of(cfg: RunConfig) -> int:
    return cfg.generation.seed if cfg.generation.seed is not None else cfg.seed


def read_prompts(cfg: RunConfig) -> list[Prompt]:
    """data.train's prompts (the first generation.max_prompts), each with its reference answer."""
    prompts: list[Prompt] = []
    for record in read_records(cfg.data):
        if len(prompts) == cfg.generation.max_prompts:
            break
        prompts.append(Prompt.from_record(len(prompts), record, cfg.data.format == "messages"))
    return prompts


def generate(
    teacher: Teacher, cfg: RunConfig, out: Path, on_shard_committed: Callable[[], None] = lambda: None
) -> StageWork:
    """Every missing shard, then the filters over all of them; the stage's outputs and metrics."""
    gen = cfg.generation
    prompts = read_prompts(cfg)
    decoding = Decoding.from_config(gen)
    shard_dir = out / "shards"
    rows = write_shards(
        teacher, prompts, decoding, seed_of(cfg), shard_dir, gen.shard_size, on_shard_committed
    )
    if not distributed.is_main():  # its shards are written; rank 0 filters, writes the set and logs
        return StageWork(tokens=0, outputs={}, fingerprints={})
    n_shards = shard_count(len(prompts), gen.shard_size)
    kept, report = apply_filters([_generated(row) for row in rows], gen.filters)
    kept_keys = {(g.prompt_id, g.sample) for g in kept}
    train = [
        _training_record(row, cfg.data) for row in rows if (row["prompt_id"], row["sample"]) in kept_keys
    ]
    if not train:
        raise DataError(
            f"teacher_generation: the filters kept none of {len(rows)} completions "
            f"(see {out / 'filter_report.json'}); nothing to train on"
        )
    write_atomic(out / "train.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in train).encode())
    write_atomic(out / "filter_report.json", json.dumps(report.to_json(), indent=2).encode())
    prefill = sum(row["prompt_tokens"] for row in rows)  # each of the n samples reads its prompt
    decode = sum(row["completion_tokens"] for row in rows)
    manifest = {
        "format": FORMAT,
        "prompts": len(prompts),
        "completions": len(rows),
        "kept": len(train),
        "prefill_tokens": prefill,
        "decode_tokens": decode,
        "teacher": teacher.identity(),
        "decoding": decoding.to_dict(),
        "seed": seed_of(cfg),
        "shards": [sha256_of(shard_dir / f"shard-{i:05d}.jsonl") for i in range(n_shards)],
        "train_sha256": sha256_of(out / "train.jsonl"),
    }
    write_atomic(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    metrics = api_metrics(teacher)
    api = cfg.teacher.api
    if api is not None and api.energy_j_per_token is not None:  # the user's figure, not a measurement
        metrics["estimated_teacher_energy_j"] = api.energy_j_per_token * decode
    return StageWork(
        tokens=prefill + decode,
        outputs={"generation": out, "train_data": out / "train.jsonl"},
        fingerprints={"train_data": manifest["train_sha256"]},
        metrics={
            "prompts": len(prompts),
            "completions": len(rows),
            "kept_completions": len(train),
            "prefill_tokens": prefill,
            "decode_tokens": decode,
            **report.metrics(),
            **metrics,
        },
        details={"teacher": teacher.identity(), "decoding": decoding.to_dict(), "shards": n_shards},
    )


def write_shards(
    writer: Teacher | None,
    prompts: list[Prompt],
    decoding: Decoding,
    seed: int,
    shard_dir: Path,
    shard_size: int,
    on_shard_committed: Callable[[], None] = lambda: None,
) -> list[dict]:
    """Every missing shard of `writer`'s completions of `prompts`, then all rows, in shard order. A shard
    is written whole (temporary name, then renamed), so one that exists is complete and is not redone.
    `writer` None: every shard exists already (see shards_complete; a resumed stage need not load it).
    Under several ranks each writes every world_size-th missing shard (rank 0's list) and all wait for the
    last: a shard's rows depend on its prompts and the seed only, so the set is one process's."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    n_shards = shard_count(len(prompts), shard_size)
    chunks = [prompts[shard * shard_size : (shard + 1) * shard_size] for shard in range(n_shards)]
    paths = [shard_dir / f"shard-{shard:05d}.jsonl" for shard in range(n_shards)]
    missing = distributed.broadcast([shard for shard, path in enumerate(paths) if not path.exists()])
    mine = distributed.my_share(missing)
    done = len(prompts) - sum(len(chunks[shard]) for shard in missing)
    what = f"{STAGE} ({shard_dir.name})" + (
        f" rank {distributed.rank()}" if distributed.world_size() > 1 else ""
    )
    with Progress(what, done + sum(len(chunks[shard]) for shard in mine), "prompts", done=done) as progress:
        for shard in mine:
            chunk, path = chunks[shard], paths[shard]
            if writer is None:
                raise ValueError(f"{path}: missing, and no writer to write it")
            try:
                completions = writer.generate(chunk, decoding, seed)
            except Exception:
                _log_api_metrics(writer)  # a budget stop still records what was spent and fetched
                raise
            lines = [
                _row(prompt, sample, completion, writer.identity(), decoding)
                for prompt, samples in zip(chunk, completions, strict=True)
                for sample, completion in enumerate(samples)
            ]
            write_atomic(path, "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode())
            on_shard_committed()
            progress.advance(len(chunk))
    distributed.barrier()  # every rank's shards are on disk
    return [json.loads(line) for shard in range(n_shards) for line in _shard_lines(shard_dir, shard)]


def shard_count(prompts: int, shard_size: int) -> int:
    return (prompts + shard_size - 1) // shard_size


def shards_complete(shard_dir: Path, prompts: int, shard_size: int) -> bool:
    return all((shard_dir / f"shard-{i:05d}.jsonl").exists() for i in range(shard_count(prompts, shard_size)))


def api_metrics(teacher: Teacher | None) -> dict[str, float]:
    """An API teacher's spend (all attempts of the stage), paid requests and failed samples."""
    from dist_bench.teacher.api import ApiTeacher  # no client imported: the module loads openai lazily

    if not isinstance(teacher, ApiTeacher):
        return {}
    return {
        "generation/spend_usd": teacher.spend.spent,
        "generation/paid_requests": teacher.spend.paid_requests,
        "generation/failed_samples": len(teacher.failures),
    }


def _log_api_metrics(teacher: Teacher | None) -> None:
    import mlflow

    if mlflow.active_run() is not None and (metrics := api_metrics(teacher)):
        mlflow.log_metrics(metrics)


def training_data(cfg: DataConfig, train_file: Path) -> DataConfig:
    """data.* for student_train: the kept completions, in the source's format, all of them."""
    fields = {"prompt_field": "prompt", "completion_field": "completion", "messages_field": "messages"}
    return cfg.model_copy(update={"train": str(train_file), "split": "train", "subset": None,
                                  "max_samples": None, **fields})  # fmt: skip


def _row(prompt: Prompt, sample: int, completion: Any, teacher: dict[str, str], decoding: Decoding) -> dict:
    return {
        "prompt_id": prompt.id,
        "sample": sample,
        "prompt": prompt.text if prompt.text is not None else prompt.messages,
        "reference": prompt.reference,
        "completion": completion.text,
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        **({"error": completion.error} if completion.error else {}),
        "teacher": teacher,
        "decoding": decoding.to_dict(),
    }


def _generated(row: dict) -> Generated:
    return Generated(
        prompt_id=row["prompt_id"],
        sample=row["sample"],
        completion=row["completion"],
        finish_reason=row["finish_reason"],
        completion_tokens=row["completion_tokens"],
        reference=row["reference"],
    )


def _training_record(row: dict, data: DataConfig) -> dict:
    if data.format == "messages":
        return {"messages": [*row["prompt"], {"role": "assistant", "content": row["completion"]}]}
    return {"prompt": row["prompt"], "completion": row["completion"]}


def _shard_lines(shard_dir: Path, shard: int) -> list[str]:
    return (shard_dir / f"shard-{shard:05d}.jsonl").read_text(encoding="utf-8").splitlines()


def sha256_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
