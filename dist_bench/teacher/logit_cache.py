"""Stage `logit_caching`: run the teacher over the training set and keep what KD needs of its distribution.

    dist-bench cache_logits --config configs/experiments/tiny_kd.yaml

For every supervised position (see dataset.py) the shard keeps the teacher's most likely next tokens at
temperature 1 (the student applies its own temperature) in format 2 (cache_format.py: adaptive top-p,
8-bit log-prob codes, bit-packed ids), never the full vocabulary. Layout, under `<stage dir>/logit_cache/`:

    shards/shard-00000.safetensors   the shard's tensors (cache_format.py)
    shards/shard-00000.json          the shard's sha256, counts and fidelity sums; written after the shard,
                                     so a shard without it is incomplete
    manifest.json                    written last: shard hashes, the format's settings, vocabulary size,
                                     tokenizer and teacher identity, bytes per position, kept tokens, fidelity

A shard covers `logits.shard_size` consecutive sequences, always cut into the same batches, so a resumed
run recomputes exactly the missing shards and ends byte-identical to an uninterrupted one.

Speed (the teacher's cost is KD's whole teacher cost, so it is what the KD row reports): a shard's sequences
are batched longest first (little padding); the forward stops at the last hidden state and the LM head runs
on the supervised positions only, HEAD_CHUNK rows at a time; the selection (top-k, the cover cut, the codes)
runs on the teacher's device into fixed-width tensors, so nothing waits for the host; those are copied into
pinned host memory without blocking, and a writer thread waits for each copy and packs it while the teacher
runs the next batch. No attention mask is passed: batches are right-padded and attention is causal, so a
real token never sees a pad, and without a mask SDPA takes its plain causal kernel (and transformers does
not check the mask on the device, a host sync per batch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dist_bench import models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import Example, chat_template, collate, data_fingerprint, load_examples
from dist_bench.progress import Progress
from dist_bench.student.kernels import fold_tile
from dist_bench.teacher import cache_format
from dist_bench.teacher.cache_format import FORMAT_V2, Selected
from dist_bench.tracking import ParentRun, StageContext, StageResult, StageWork, execute_stage

STAGE = "logit_caching"
FORMAT = FORMAT_V2
# Supervised positions per LM-head call: a [4096, V] fp32 logit buffer (2.5 GB at V = 151,936) is large
# enough for the GEMM and the top-k to run at full speed and small enough to sit beside a 7B teacher.
HEAD_CHUNK = 4096


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
        "logits.format": FORMAT,
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
            metrics={
                "supervised_positions": manifest["positions"],
                "cache_bytes": manifest["bytes"],
                "cache_bytes_per_position": manifest["bytes_per_position"],
                "mean_kept_tokens": manifest["mean_kept_tokens"],
                "fidelity_kl": manifest["fidelity_kl"],
                "fidelity_positions": manifest["fidelity_positions"],
                "teacher_entropy": manifest["teacher_entropy"],
            },
            details={
                "format": FORMAT,
                "top_k": cfg.logits.top_k,
                "cover": cfg.logits.cover,
                "shards": len(manifest["shards"]),
            },
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
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    n_shards = (len(examples) + size - 1) // size
    done = sum(_shard_complete(shard_dir, shard) for shard in range(n_shards))
    with Progress("logit_caching", n_shards, "shards", done=done) as progress:
        for shard in range(n_shards):
            if _shard_complete(shard_dir, shard):
                continue
            indices = list(range(shard * size, min((shard + 1) * size, len(examples))))
            tensors, sums = _teacher_shard(teacher, examples, indices, pad_id, cfg, vocab)
            _write_shard(shard_dir, shard, tensors, sums)
            on_shard_committed()
            progress.advance()
    shards = [json.loads((shard_dir / f"shard-{i:05d}.json").read_text()) for i in range(n_shards)]
    positions = sum(s["positions"] for s in shards)
    sampled = sum(s["fidelity_positions"] for s in shards)
    total_bytes = sum(s["bytes"] for s in shards)
    return {
        "format": FORMAT,
        "top_k": cfg.logits.top_k,
        "cover": cfg.logits.cover,
        "logprob_step": cfg.logits.logprob_step,
        "id_bits": cache_format.id_bits(vocab),
        "vocab_size": vocab,
        "sequences": len(examples),
        "positions": positions,
        "kept_tokens": sum(s["kept_tokens"] for s in shards),
        "input_tokens": sum(s["input_tokens"] for s in shards),
        "bytes": total_bytes,
        "bytes_per_position": total_bytes / max(positions, 1),
        "mean_kept_tokens": sum(s["kept_tokens"] for s in shards) / max(positions, 1),
        "fidelity_positions": sampled,
        "fidelity_kl": sum(s["fidelity_kl_sum"] for s in shards) / max(sampled, 1),
        "teacher_entropy": sum(s["entropy_sum"] for s in shards) / max(sampled, 1),
        "shards": shards,
    }


@torch.no_grad()
def _teacher_shard(
    teacher: torch.nn.Module,
    examples: list[Example],
    indices: list[int],
    pad_id: int,
    cfg: RunConfig,
    vocab: int,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One shard's tensors (cache_format.py's layout) and its fidelity sums. The shard's sequences, longest
    first, in batches of logits.batch_size: the same batches whenever the shard is computed."""
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    order = sorted(indices, key=lambda i: (-len(examples[i].input_ids), i))
    writer = _HostWriter()
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    entropy_sum = torch.zeros((), dtype=torch.float64, device=device)
    sampled, input_tokens, counts = 0, 0, []
    every = cfg.logits.fidelity_every
    try:
        for start in range(0, len(order), cfg.logits.batch_size):
            chunk = order[start : start + cfg.logits.batch_size]
            batch = collate([examples[i] for i in chunk], chunk, pad_id)
            input_tokens += batch.tokens
            counts.append(batch.predict_mask.sum(dim=1))
            # Where the supervised positions are, found on the host (a boolean index on the device would
            # wait for the device to learn the count).
            where = batch.predict_mask.flatten().nonzero().squeeze(1)
            hidden = _last_hidden(teacher, _to_device(batch.input_ids, device))
            hidden = hidden.flatten(0, 1).index_select(0, _to_device(where, device))
            for c0 in range(0, hidden.shape[0], HEAD_CHUNK):
                rows = hidden[c0 : c0 + HEAD_CHUNK]
                logits = head(rows)  # the teacher's dtype, as its own forward would give them
                chosen = cache_format.select(
                    logits, cfg.logits.top_k, cfg.logits.cover, cfg.logits.logprob_step, _log_sum_exp(logits)
                )
                # The fidelity sample: every `every`-th supervised position of the batch.
                sample = range((-c0) % every, rows.shape[0], every)
                if len(sample):
                    picked = torch.arange(sample.start, sample.stop, every, device=device)
                    kl, entropy = cache_format.fidelity(
                        logits.index_select(0, picked),
                        Selected(*(t.index_select(0, picked) for t in chosen)),
                        cfg.logits.logprob_step,
                    )
                    kl_sum += kl
                    entropy_sum += entropy
                    sampled += len(sample)
                del logits
                writer.put(chosen)
        kept = writer.finish()
    finally:
        writer.close()
    positions_per_sequence = torch.cat(counts)
    offsets = torch.zeros(len(order) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(positions_per_sequence, 0)
    count_dtype = np.uint8 if cfg.logits.top_k <= 255 else np.int16
    tensors = {
        "counts": torch.from_numpy(kept["counts"].astype(count_dtype)),
        "log_tail": torch.from_numpy(kept["log_tail"]),
        "codes": torch.from_numpy(kept["codes"]),
        "token_ids": torch.from_numpy(cache_format.pack_ids(kept["ids"], cache_format.id_bits(vocab))),
        "offsets": offsets,
        "sequence_index": torch.tensor(order, dtype=torch.int64),
        "input_tokens": torch.tensor([input_tokens], dtype=torch.int64),
    }
    sums = {
        "fidelity_kl_sum": float(kl_sum),
        "entropy_sum": float(entropy_sum),
        "fidelity_positions": sampled,
        "kept_tokens": int(kept["counts"].sum()),
    }
    return tensors, sums


class _HostWriter:
    """Brings the selected tokens to the host while the teacher runs on: each batch's fixed-width tensors
    are copied into pinned memory without blocking, and this thread waits for the copy (a CUDA event) and
    keeps only the kept entries (cache_format.encode_rows). At most two batches wait, so a slow host holds
    the teacher back instead of filling memory. On a CPU teacher the copies are plain."""

    def __init__(self) -> None:
        self.pending: queue.Queue = queue.Queue(maxsize=2)
        self.parts: list[dict[str, np.ndarray]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._drain, name="logit-cache-writer", daemon=True)
        self.thread.start()

    def put(self, chosen: Selected) -> None:
        if self.error is not None:
            raise self.error
        if chosen.ids.is_cuda:
            host = Selected(*(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in chosen))
            for dst, src in zip(host, chosen, strict=True):
                dst.copy_(src, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record()
        else:
            host, copied = chosen, None
        self.pending.put((host, copied))

    def finish(self) -> dict[str, np.ndarray]:
        """Every batch's kept entries, in order, once the last copy has landed."""
        self.pending.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return {key: np.concatenate([part[key] for part in self.parts]) for key in self.parts[0]}

    def close(self) -> None:
        if self.thread.is_alive():  # an exception in the teacher's loop: let the thread end
            self.pending.put(None)
            self.thread.join()

    def _drain(self) -> None:
        while (item := self.pending.get()) is not None:
            if self.error is not None:
                continue
            try:
                host, copied = item
                if copied is not None:
                    copied.synchronize()
                self.parts.append(cache_format.encode_rows(host))
            except BaseException as error:  # re-raised in the teacher's thread
                self.error = error


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without stopping the host: a copy from pageable memory waits for the
    device to reach it, one from pinned memory does not."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _log_sum_exp(logits: torch.Tensor) -> torch.Tensor:
    """Each row's log-sum-exp (float32) in one read of the logits, by the KD loss's fold kernel (Triton on
    CUDA): torch.logsumexp would write two float32 copies of the [rows, V] logits first."""
    rows = logits.shape[0]
    running_max = torch.full((rows,), -math.inf, dtype=torch.float32, device=logits.device)
    running_sum = torch.zeros((rows,), dtype=torch.float32, device=logits.device)
    no_ids = torch.zeros(
        (rows, 1), dtype=torch.long, device=logits.device
    )  # the kernel also reads ids' logits
    fold_tile(logits, 0, no_ids[:, 0], no_ids, running_max, running_sum, None, None,
              torch.zeros_like(running_sum), torch.zeros((rows, 1), device=logits.device), 1.0)  # fmt: skip
    return running_max + running_sum.log()


def _last_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states [B, T, H] from the model body, skipping the full-vocab LM head. Right-padded
    rows need no attention mask under causal attention (the module docstring)."""
    return model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state


def _write_shard(shard_dir: Path, shard: int, tensors: dict[str, torch.Tensor], sums: dict) -> None:
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
        "positions": int(tensors["counts"].numel()),
        "input_tokens": int(tensors["input_tokens"].item()),
        **sums,
    }
    _write_atomic(shard_dir / f"shard-{shard:05d}.json", json.dumps(record, sort_keys=True).encode())


def _shard_complete(shard_dir: Path, shard: int) -> bool:
    record_path = shard_dir / f"shard-{shard:05d}.json"
    path = shard_dir / f"shard-{shard:05d}.safetensors"
    if not (record_path.exists() and path.exists()):
        return False
    record = json.loads(record_path.read_text())
    return hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _sha256(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
