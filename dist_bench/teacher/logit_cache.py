"""Stage `logit_caching`: run the teacher over the training set and keep its top-k log-probs.

    dist-bench cache_logits --config configs/experiments/tiny_kd.yaml

For every supervised position (see dataset.py) the shard stores the teacher's k most likely next
tokens and their log-probabilities at temperature 1 (the student applies its own temperature), never
the full vocabulary. Layout:

    shards/shard-00000.safetensors   token_ids int32 [P, k], logprobs float32|float16 [P, k],
                                     offsets int64 [S + 1] (rows of sequence i: offsets[i]:offsets[i+1]),
                                     sequence_index int64 [S] (dataset index of each sequence)
    shards/shard-00000.json          the shard's sha256 and counts; written after the shard, so a shard
                                     without it is incomplete
    manifest.json                    written last: shard hashes, k, vocab size, tokenizer and teacher identity

(all under `<stage dir>/logit_cache/`). A shard covers `logits.shard_size` consecutive sequences, always cut into the same batches, so a resumed
run recomputes exactly the missing shards and ends byte-identical to an uninterrupted one. Safetensors is
the container because it is mmap-able and lets a later format add compressed tensors beside these.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dist_bench import models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import Example, chat_template, collate, data_fingerprint, load_examples
from dist_bench.progress import Progress
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "logit_caching"
FORMAT = "dist-bench-topk/1"


def run(parent: ParentRun) -> StageResult:
    cfg = parent.cfg
    device = models.pick_device(cfg.train.device)
    tokenizer = models.load_tokenizer(cfg.teacher.model, cfg.teacher.revision, cfg.teacher.trust_remote_code)
    # The data is encoded as the student will see it: the same vocabulary (pre-flight checks it), but a chat
    # template, when the config names none, is the student's own, so that the cached positions are
    # exactly the student's supervised positions.
    data_tokenizer = models.load_tokenizer(
        cfg.student.model, cfg.student.revision, cfg.student.trust_remote_code
    )
    params = {
        **flatten(cfg.teacher.model_dump(), "teacher."),
        **flatten(cfg.data.model_dump(), "data."),
        **flatten(cfg.logits.model_dump(), "logits."),
        "teacher.fingerprint": models.fingerprint(cfg.teacher.model, cfg.teacher.revision),
        "data.fingerprint": data_fingerprint(cfg.data),
        "tokenizer.fingerprint": models.tokenizer_fingerprint(tokenizer),
        **(
            {"data.chat_template.sha256": _sha256(chat_template(cfg.data, data_tokenizer))}
            if cfg.data.format == "messages"
            else {}
        ),
        "device": device.type,
    }

    def work(ctx: StageContext) -> StageWork:
        examples = load_examples(cfg.data, data_tokenizer)
        teacher = models.load_model(
            cfg.teacher.model, device, cfg.teacher.dtype, cfg.teacher.revision, cfg.teacher.trust_remote_code
        ).eval()
        out = ctx.stage_dir / "logit_cache"
        manifest = cache_logits(teacher, examples, tokenizer.pad_token_id, cfg, out, ctx.commit_energy)
        manifest.update(teacher=params["teacher.fingerprint"], tokenizer=params["tokenizer.fingerprint"])
        manifest_path = out / "manifest.json"
        _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return StageWork(
            tokens=manifest["input_tokens"],
            outputs={"logit_cache": out},
            fingerprints={"logit_cache": "sha256:" + hashlib.sha256(manifest_path.read_bytes()).hexdigest()},
            metrics={"supervised_positions": manifest["positions"], "cache_bytes": manifest["bytes"]},
            details={"top_k": cfg.logits.top_k, "shards": len(manifest["shards"])},
        )

    return execute_stage(parent, STAGE, params, work, tags={"dist_bench.teacher": cfg.teacher.model})


def cache_logits(
    teacher: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    cfg: RunConfig,
    out: Path,
    on_shard_committed: Callable[[], None] = lambda: None,
) -> dict:
    """Write every missing shard under out/shards; return the manifest (without teacher/tokenizer identity)."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.logits.shard_size
    n_shards = (len(examples) + size - 1) // size
    done = sum(_shard_complete(shard_dir, shard) for shard in range(n_shards))
    with Progress("logit_caching", n_shards, "shards", done=done) as progress:
        for shard in range(n_shards):
            if _shard_complete(shard_dir, shard):
                continue
            indices = list(range(shard * size, min((shard + 1) * size, len(examples))))
            tensors = _teacher_topk(teacher, examples, indices, pad_id, cfg)
            _write_shard(shard_dir, shard, tensors)
            on_shard_committed()
            progress.advance()
    shards = [json.loads((shard_dir / f"shard-{i:05d}.json").read_text()) for i in range(n_shards)]
    return {
        "format": FORMAT,
        "top_k": cfg.logits.top_k,
        "logprob_dtype": cfg.logits.logprob_dtype,
        "vocab_size": int(teacher.config.vocab_size),
        "sequences": len(examples),
        "positions": sum(s["positions"] for s in shards),
        "input_tokens": sum(s["input_tokens"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "shards": shards,
    }


@torch.no_grad()
def _teacher_topk(
    teacher: torch.nn.Module, examples: list[Example], indices: list[int], pad_id: int, cfg: RunConfig
) -> dict[str, torch.Tensor]:
    device = next(teacher.parameters()).device
    ids, logprobs, counts = [], [], []
    input_tokens = 0
    for start in range(0, len(indices), cfg.logits.batch_size):
        chunk = indices[start : start + cfg.logits.batch_size]
        batch = collate([examples[i] for i in chunk], chunk, pad_id)
        input_tokens += batch.tokens
        hidden = _last_hidden(teacher, batch.input_ids.to(device), batch.attention_mask.to(device))
        # Only the supervised positions go through the LM head: [P, vocab] instead of [B, T, vocab].
        logits = teacher.get_output_embeddings()(hidden[batch.predict_mask.to(device)]).float()
        top = torch.log_softmax(logits, dim=-1).topk(cfg.logits.top_k, dim=-1)
        ids.append(top.indices.to(torch.int32).cpu())
        logprobs.append(top.values.to(getattr(torch, cfg.logits.logprob_dtype)).cpu())
        counts.append(batch.predict_mask.sum(dim=1).cpu())
    counts_all = torch.cat(counts)
    offsets = torch.zeros(len(indices) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts_all, 0)
    return {
        "token_ids": torch.cat(ids).contiguous(),
        "logprobs": torch.cat(logprobs).contiguous(),
        "offsets": offsets,
        "sequence_index": torch.tensor(indices, dtype=torch.int64),
        "input_tokens": torch.tensor([input_tokens], dtype=torch.int64),
    }


def _last_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Final hidden states [B, T, H] from the model body, skipping the full-vocab LM head."""
    body = model.get_decoder()
    return body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _write_shard(shard_dir: Path, shard: int, tensors: dict[str, torch.Tensor]) -> None:
    path = shard_dir / f"shard-{shard:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})
    os.replace(tmp, path)
    data = path.read_bytes()
    record = {
        "index": shard,
        "file": path.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "sequences": int(tensors["sequence_index"].numel()),
        "positions": int(tensors["token_ids"].shape[0]),
        "input_tokens": int(tensors["input_tokens"].item()),
    }
    _write_atomic(shard_dir / f"shard-{shard:05d}.json", json.dumps(record, sort_keys=True).encode())


def _shard_complete(shard_dir: Path, shard: int) -> bool:
    record_path = shard_dir / f"shard-{shard:05d}.json"
    path = shard_dir / f"shard-{shard:05d}.safetensors"
    if not (record_path.exists() and path.exists()):
        return False
    record = json.loads(record_path.read_text())
    return hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]


@dataclass
class TopKCache:
    """A finished cache, loaded for training: rows of one sequence by its dataset index."""

    manifest: dict
    token_ids: torch.Tensor  # [P, k] int32, as stored: half the memory of int64
    logprobs: torch.Tensor  # [P, k] as stored (float32 or float16)
    row_start: torch.Tensor  # [N] first row of sequence i
    row_count: torch.Tensor  # [N]

    @classmethod
    def open(cls, cache_dir: Path) -> TopKCache:
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"{cache_dir}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT}"
            )
        ids, logprobs = [], []
        row_start = torch.zeros(manifest["sequences"], dtype=torch.int64)
        row_count = torch.zeros(manifest["sequences"], dtype=torch.int64)
        rows = 0
        for shard in manifest["shards"]:
            path = cache_dir / "shards" / shard["file"]
            if hashlib.sha256(path.read_bytes()).hexdigest() != shard["sha256"]:
                raise ValueError(f"{path}: content does not match the manifest's sha256")
            tensors = load_file(str(path))
            counts = tensors["offsets"][1:] - tensors["offsets"][:-1]
            row_start[tensors["sequence_index"]] = tensors["offsets"][:-1] + rows
            row_count[tensors["sequence_index"]] = counts
            rows += tensors["token_ids"].shape[0]
            ids.append(tensors["token_ids"])
            logprobs.append(tensors["logprobs"])
        return cls(manifest, torch.cat(ids), torch.cat(logprobs), row_start, row_count)

    def rows(self, indices: list[int]) -> torch.Tensor:
        """Row numbers of these sequences' positions, in order: matches Batch.predict_mask order."""
        return torch.cat(
            [torch.arange(self.row_start[i], self.row_start[i] + self.row_count[i]) for i in indices]
        )


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
