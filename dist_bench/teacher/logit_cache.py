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
runs on the teacher's device into fixed-width tensors (cache_format.select: one Triton pass for the tile
maxima and the log-sum-exp, a top-k through the best tiles), so nothing waits for the host; those are copied
into pinned host memory without blocking, and a writer thread waits for each copy, packs it, and writes each
shard's files while the teacher runs on. No attention mask is passed: batches are right-padded and attention is causal, so a
real token never sees a pad, and without a mask SDPA takes its plain causal kernel (and transformers does
not check the mask on the device, a host sync per batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dist_bench import distributed, models
from dist_bench.config import RunConfig, flatten
from dist_bench.dataset import Example, chat_template, collate, data_fingerprint, load_examples
from dist_bench.progress import Progress
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
        if not distributed.is_main():  # its shards are written; rank 0 writes the manifest and logs
            return StageWork(tokens=0, outputs={}, fingerprints={})
        manifest.update(teacher=params["teacher.fingerprint"], tokenizer=params["tokenizer.fingerprint"])
        manifest_path = out / "manifest.json"
        _write_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        return StageWork(
            tokens=manifest["input_tokens"],
            outputs={"logit_cache": out},
            fingerprints={"logit_cache": "sha256:" + hashlib.sha256(manifest_path.read_bytes()).hexdigest()},
            # the shards are top-k logits for every supervised position: tens of GB on a real corpus, read by
            # student_train from the run dir; the manifest records what they hold
            unlogged=() if cfg.tracking.log_logit_cache else ("logit_cache",),
            artifacts={} if cfg.tracking.log_logit_cache else {"logit_cache/manifest.json": manifest_path},
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

    return execute_stage(
        parent, STAGE, params, work, tags={"dist_bench.teacher": cfg.teacher.model}, data_parallel=True
    )


def cache_logits(
    teacher: torch.nn.Module,
    examples: list[Example],
    pad_id: int,
    cfg: RunConfig,
    out: Path,
    on_shard_committed: Callable[[], None] = lambda: None,
) -> dict:
    """Write every missing shard under out/shards; return the manifest (without teacher/tokenizer identity).

    Under several ranks (distributed.py) each computes every world_size-th missing shard (rank 0's list of
    the missing ones, so all agree) and all wait for the last; a shard's bytes do not depend on who
    computes it, so the cache is the same as one process's, and a resume may use any number of ranks.

    The teacher's thread runs the shards one after the other; the writer thread (_ShardWriter) packs and
    writes each shard while the teacher runs the next, so the device never waits for a shard's file.
    `on_shard_committed` (the stage's energy commit) is called by the writer as soon as a shard's files are
    on disk: its figure includes the part of the next shard run meanwhile, which a resume after a kill
    runs again (at most the writer's queue, a few batches)."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    size = cfg.logits.shard_size
    vocab = int(teacher.get_output_embeddings().weight.shape[0])
    n_shards = (len(examples) + size - 1) // size
    missing = distributed.broadcast([i for i in range(n_shards) if not _shard_complete(shard_dir, i)])
    mine = distributed.my_share(missing)
    found = n_shards - len(missing)
    what = "logit_caching" if distributed.world_size() == 1 else f"logit_caching (rank {distributed.rank()})"
    with Progress(what, found + len(mine), "shards", done=found) as progress:

        def written() -> None:
            on_shard_committed()
            progress.advance()

        writer = _ShardWriter(shard_dir, vocab, cfg.logits.top_k, written)
        try:
            for shard in mine:
                indices = list(range(shard * size, min((shard + 1) * size, len(examples))))
                _teacher_shard(teacher, examples, indices, pad_id, cfg, writer, shard)
            writer.finish()
        finally:
            writer.close()
    distributed.barrier()  # every rank's shards are on disk
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
    writer: _ShardWriter,
    shard: int,
) -> None:
    """Run the teacher over one shard's sequences, longest first, in batches of logits.batch_size (the same
    batches whenever the shard is computed), and hand each chunk's selection and then the shard's end to the
    writer. Nothing here waits for the device."""
    device = next(teacher.parameters()).device
    head = teacher.get_output_embeddings()
    order = sorted(indices, key=lambda i: (-len(examples[i].input_ids), i))
    fidelity_sums = torch.zeros(2, dtype=torch.float64, device=device)  # KL, entropy
    sampled, input_tokens, counts = 0, 0, []
    every = cfg.logits.fidelity_every
    for start in range(0, len(order), cfg.logits.batch_size):
        chunk = order[start : start + cfg.logits.batch_size]
        batch = collate([examples[i] for i in chunk], chunk, pad_id)
        input_tokens += batch.tokens
        counts.append(batch.predict_mask.sum(dim=1))
        # Where the supervised positions are, found on the host (a boolean index on the device would wait
        # for the device to learn the count).
        where = batch.predict_mask.flatten().nonzero().squeeze(1)
        hidden = _last_hidden(teacher, _to_device(batch.input_ids, device))
        hidden = hidden.flatten(0, 1).index_select(0, _to_device(where, device))
        for c0 in range(0, hidden.shape[0], HEAD_CHUNK):
            rows = hidden[c0 : c0 + HEAD_CHUNK]
            logits = head(rows)  # the teacher's dtype, as its own forward would give them
            chosen = cache_format.select(logits, cfg.logits.top_k, cfg.logits.cover, cfg.logits.logprob_step)
            # The fidelity sample: every `every`-th supervised position of the batch.
            sample = range((-c0) % every, rows.shape[0], every)
            if len(sample):
                picked = torch.arange(sample.start, sample.stop, every, device=device)
                kl, entropy = cache_format.fidelity(
                    logits.index_select(0, picked),
                    Selected(*(t.index_select(0, picked) for t in chosen)),
                    cfg.logits.logprob_step,
                )
                fidelity_sums += torch.stack([kl, entropy])
                sampled += len(sample)
            del logits
            writer.put(chosen)
    positions_per_sequence = torch.cat(counts)
    offsets = torch.zeros(len(order) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(positions_per_sequence, 0)
    writer.end_shard(
        shard,
        {
            "offsets": offsets,
            "sequence_index": torch.tensor(order, dtype=torch.int64),
            "input_tokens": torch.tensor([input_tokens], dtype=torch.int64),
        },
        fidelity_sums,
        sampled,
    )


class _ShardWriter:
    """The writer thread: brings each chunk's selection to the host while the teacher runs on, keeps only
    the kept entries (cache_format.encode_rows) and packs their ids as they come, and at a shard's end
    writes its files (_write_shard). Copies go into pinned memory without blocking; the thread waits for
    each one (a CUDA event). At most QUEUE chunks wait, so a slow host holds the teacher back instead of
    filling memory; the queue is deep enough to cover a shard's file writing. On a CPU teacher the copies
    are plain. `written` is called (in this thread) after each shard's files are on disk. An error here is
    raised in the teacher's thread at its next call."""

    QUEUE = 16

    def __init__(self, shard_dir: Path, vocab: int, top_k: int, written: Callable[[], None]) -> None:
        self.shard_dir, self.bits, self.written = shard_dir, cache_format.id_bits(vocab), written
        self.count_dtype = np.uint8 if top_k <= 255 else np.int16
        self.pending: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self.error: BaseException | None = None
        self._new_shard()
        self.thread = threading.Thread(target=self._drain, name="logit-cache-writer", daemon=True)
        self.thread.start()

    def put(self, chosen: Selected) -> None:
        self._raise()
        self.pending.put(("chunk", *_to_host(chosen)))

    def end_shard(self, shard: int, tensors: dict[str, torch.Tensor], fidelity_sums: torch.Tensor,
                  sampled: int) -> None:  # fmt: skip
        """The shard's last chunk has been put: write it with these tensors and sums once its chunks are in."""
        self._raise()
        (sums,), copied = _to_host((fidelity_sums,))
        self.pending.put(("end", (shard, tensors, sums, sampled), copied))

    def finish(self) -> None:
        """Wait until every shard handed over is written."""
        self.pending.put(None)
        self.thread.join()
        self._raise()

    def close(self) -> None:
        if self.thread.is_alive():  # an exception in the teacher's loop: let the thread end
            self.pending.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _new_shard(self) -> None:
        self.packer = cache_format.IdPacker(self.bits)
        self.parts: dict[str, list[np.ndarray]] = {"token_ids": [], "codes": [], "counts": [], "log_tail": []}

    def _drain(self) -> None:
        while (item := self.pending.get()) is not None:
            if self.error is not None:
                continue
            try:
                kind, payload, copied = item
                if copied is not None:
                    copied.synchronize()
                if kind == "chunk":
                    rows = cache_format.encode_rows(payload)
                    self.parts["token_ids"].append(self.packer.add(rows["ids"]))
                    self.parts["codes"].append(rows["codes"])
                    self.parts["counts"].append(rows["counts"].astype(self.count_dtype))
                    self.parts["log_tail"].append(rows["log_tail"])
                else:
                    self._write(*payload)
            except BaseException as error:  # re-raised in the teacher's thread
                self.error = error

    def _write(self, shard: int, tensors: dict[str, torch.Tensor], sums: torch.Tensor, sampled: int) -> None:
        self.parts["token_ids"].append(self.packer.close())
        kept = {key: torch.from_numpy(np.concatenate(parts)) for key, parts in self.parts.items()}
        self._new_shard()
        kl_sum, entropy_sum = sums.tolist()
        _write_shard(self.shard_dir, shard, {**kept, **tensors}, {
            "fidelity_kl_sum": kl_sum,
            "entropy_sum": entropy_sum,
            "fidelity_positions": sampled,
            "kept_tokens": int(kept["counts"].long().sum()),
        })  # fmt: skip
        self.written()


def _to_host(tensors: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None]:
    """Host copies of device tensors, started without blocking (pinned memory), and the event that marks
    their arrival; host tensors as they are."""
    if not tensors[0].is_cuda:
        return tensors, None
    host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for dst, src in zip(host, tensors, strict=True):
        dst.copy_(src, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return (Selected(*host) if isinstance(tensors, Selected) else tuple(host)), copied


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without stopping the host: a copy from pageable memory waits for the
    device to reach it, one from pinned memory does not."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
