"""Quality: lm-eval's harness, with the tokens the model read and wrote.

    lm = load_lm("tinyworld:teacher", cfg.eval)
    outcome = run_lm_eval(lm, "tiny_arith", manager, cfg.eval, Path("runs/eval/tiny_arith"))
    outcome.metrics  # {"tiny_arith/exact_match": 0.93, "tiny_arith/exact_match_stderr": 0.02, ...}

Which tasks exist and on which data is tasks.py's business (`manager` comes from tasks.materialize). Relative
`data_files` in a task_dir YAML are resolved against that YAML's folder, so a task runs the same from any
working directory. The model goes through lm-eval's own `HFLM` (transformers), subclassed only to count
tokens for the eval stage's `tokens` and J/token. One model load serves every task of the stage.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lm_eval import simple_evaluate
from lm_eval.api.model import CacheHook, hash_args
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader (0.4.13): `include:`, `!function`
from lm_eval.utils import handle_non_serializable

from dist_bench import distributed
from dist_bench.config import EvalConfig
from dist_bench.evaluation.tasks import absolute_data_paths, ship_nltk_data
from dist_bench.models import pick_device, pick_dtype, resolve_model

ship_nltk_data()  # before any task module imports nltk (IFEval's would download punkt_tab otherwise)

# A killed task resumes from the answers it had given: they are kept as lm-eval's request cache keys them and
# written to the stage dir, with their token counts, between batches, at most this often; the energy spent
# on them is committed right after. A kill loses at most this much answered work, which the next attempt
# redoes and measures once.
COMMIT_EVERY_S = 2.0


class AnswerLog:
    """One rank's answers to one task's requests, kept across attempts, and the answers the task's other
    logs hold (other ranks', of this attempt or of an earlier one with another number of processes).

    lm-eval has a request cache (simple_evaluate's use_cache: CachingLM), but it commits every answer to
    SQLite as a transaction of its own, writes each answer twice and looks each request up through SQLite's
    thread: 1.76 ms per request on the CI machine, ~100 s of MMLU's 56k requests that the eval stage's energy
    would include. This keeps the answers in a dict under lm-eval's own key (hash_args), takes them from
    HFLM through the same hook (add_partial), and appends the new ones to one file at each checkpoint, which
    ends with the token counts of everything before it in that file. A file cut short by a kill is read up
    to its last checkpoint.

    Every log's answers are taken (lm-eval splits the requests by world size: a resume with another number
    of processes gives a rank requests another rank answered). Each file's tokens are reported once: by the
    rank that appends to it, and those of a rank no longer in the job (`absent`, of `others`) by rank 0."""

    def __init__(self, path: Path, others: Iterable[Path] = (), absent: Collection[Path] = ()) -> None:
        self.path = path
        self.done: dict[str, Any] = {}
        self.new: list[tuple[str, Any]] = []
        # of the answers in this rank's file, every attempt's; the next checkpoint's counts start from these
        self.tokens, good_bytes = self._read(path)
        if path.is_file():
            with path.open("r+b") as records:
                records.truncate(good_bytes)  # answers after the last checkpoint are asked again
        self.absent_tokens = {"prefill": 0, "decode": 0}  # of the `absent` files
        for other in others:
            tokens, _ = self._read(other)
            if other in absent:
                self.absent_tokens = {kind: self.absent_tokens[kind] + tokens[kind] for kind in tokens}

    def _read(self, path: Path) -> tuple[dict[str, int], int]:
        """path's answers up to its last checkpoint into `done`; that checkpoint's token counts and offset.
        (A file another rank is appending to may end in a partial record: it is read up to it.)"""
        kept, tokens, good_bytes = [], {"prefill": 0, "decode": 0}, 0
        if not path.is_file():
            return tokens, good_bytes
        with path.open("rb") as records:
            while True:
                try:
                    record = pickle.load(records)
                except (EOFError, pickle.UnpicklingError, ValueError):
                    break
                if record[0] == "answer":
                    kept.append(record[1:])
                else:  # a checkpoint: what came before it is whole
                    self.done.update(kept)
                    kept, tokens, good_bytes = [], record[1], records.tell()
        return tokens, good_bytes

    def add_partial(self, attr: str, request: Any, result: Any) -> None:
        """lm-eval's CacheHook interface: HFLM gives each answer here as it has it."""
        key = hash_args(attr, request)
        self.done[key] = result
        self.new.append((key, result))

    def checkpoint(self, tokens: dict[str, int]) -> None:
        """The answers since the last checkpoint, then these token counts, on disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as records:
            for key, result in self.new:
                pickle.dump(("answer", key, result), records)
            pickle.dump(("checkpoint", tokens), records)
            records.flush()
            os.fsync(records.fileno())
        self.new.clear()
        self.tokens = tokens


@dataclass
class RequestCache:
    """Where a task's answers are kept across attempts (one AnswerLog per rank), and what commits the energy
    spent on them (the stage's StageContext.commit_energy)."""

    path: Path
    commit_energy: Callable[[], None]

    def log(self, rank: int, world_size: int) -> AnswerLog:
        """Rank `rank`'s log, with every other rank's answers; rank 0 also reports the tokens of the logs
        of ranks that are not in this job (an earlier attempt had more processes)."""
        logs = {int(p.name.rsplit(".rank", 1)[1].split(".")[0]): p
                for p in self.path.parent.glob(f"{self.path.name}.rank*.answers")}  # fmt: skip
        others = [path for other, path in sorted(logs.items()) if other != rank]
        absent = [path for other, path in logs.items() if other >= world_size]
        return AnswerLog(
            self.path.with_name(f"{self.path.name}.rank{rank}.answers"), others, absent if rank == 0 else ()
        )


@dataclass
class EvalOutcome:
    metrics: dict[str, float]  # "<task>/<metric>" (and "<task>/<metric>_stderr") -> value
    results: dict  # lm-eval's output less the per-sample records, JSON-serialisable
    prefill_tokens: int  # tokens the model read: prompts; context + continuation (less its last token)
    decode_tokens: int  # tokens the model generated

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


class CountingHFLM(HFLM):
    """lm-eval's HF model, counting the non-padding tokens it reads and the tokens it generates.

    lm-eval reports no token counts, and the eval stage's energy is divided by them (J/token). The counts
    are of the work actually done: log-likelihood requests that lm-eval answers from one forward pass
    (its one-token-continuation logits cache: the four letters of a multiple-choice question) count once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.answers: AnswerLog | None = None  # the task's, where it resumes (run_lm_eval)
        # Called before each batch, when every answer of the batches before it is in `answers`.
        self.between_batches: Callable[[], None] | None = None

    def _model_call(self, inps: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.between_batches is not None:  # log-likelihood batches
            self.between_batches()
        return super()._model_call(inps, *args, **kwargs)

    # Per-request progress bars: thousands of lines in logs; the stage's own line says when it is done.
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[Any]:
        ask = functools.partial(super().loglikelihood, disable_tqdm=disable_tqdm)
        return self._answered("loglikelihood", requests, ask)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = True) -> list[str]:
        ask = functools.partial(super().generate_until, disable_tqdm=disable_tqdm)
        return self._answered("generate_until", requests, ask)

    def _answered(self, kind: str, requests: list[Any], ask: Callable[[list[Any]], list[Any]]) -> list[Any]:
        """The answers an earlier attempt gave, and the model's to the rest (all of them without a log).
        Sampled generations are always asked: a repeat of the same request must not get the same sample.
        (Perplexity requests, loglikelihood_rolling, do not come here: a task with them has no log,
        tasks.scored_by_rolling_loglikelihood.)"""
        if self.answers is None or not self.answers.done:  # nothing kept: no lookups
            return ask(requests)
        keys = [hash_args(kind, r.args) for r in requests]
        kept = {
            k: self.answers.done[k]
            for k, r in zip(keys, requests, strict=True)
            if k in self.answers.done and not (kind == "generate_until" and r.args[1].get("do_sample"))
        }
        rest = iter(
            ask([r for k, r in zip(keys, requests, strict=True) if k not in kept])
            if len(kept) < len(keys)
            else []
        )
        return [kept[k] if k in kept else next(rest) for k in keys]

    def _select_cont_toks(
        self, logits: torch.Tensor, contlen: int | None = None, inplen: int | None = None
    ) -> torch.Tensor:
        # Log-likelihood batches reach _model_call right-padded with id 0 and without an attention mask,
        # so padding is indistinguishable there from a real token 0. This hook runs once per row of every
        # such batch, right after the forward pass, with that row's unpadded length.
        self.prefill_tokens += inplen or 0
        return super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **kwargs: Any
    ) -> torch.Tensor:
        if self.between_batches is not None:
            self.between_batches()
        mask = kwargs.get("attention_mask")  # prompts are left-padded; the mask marks the real tokens
        self.prefill_tokens += int(mask.sum()) if mask is not None else context.numel()
        output = super()._model_generate(context, max_length, stop, **kwargs)
        # transformers fills a row with pad tokens once it has emitted EOS (the EOS itself is missed
        # when pad == eos); rows that hit a stop string keep generating until the whole batch stops,
        # and that work is counted because it was done.
        new = output[:, context.shape[1] :]
        pad = self.tokenizer.pad_token_id
        self.decode_tokens += int((new != pad).sum()) if pad is not None else new.numel()
        return output

    # lm-eval's data-parallel evaluation (its evaluator gives each rank every world_size-th document, pads
    # the ranks to equal request counts, and gathers the per-document scores on rank 0) needs these
    # collectives. HFLM implements them with the accelerate state it builds only from a model name; the
    # ranks here are the job's process group (distributed.py), so they are torch.distributed's, which is
    # what lm-eval's LM base class asks an integration to provide. gather_object is HFLM's own.
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        part = tensor.reshape(1) if tensor.dim() == 0 else tensor
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, part)
        return torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def load_lm(
    model: str,
    cfg: EvalConfig,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> CountingHFLM:
    """A model spec (tinyworld:<name>, local or checkpoint dir, Hub id, runs:/ URI) as lm-eval's HF model."""
    _quiet_lm_eval()
    device = pick_device(cfg.device)
    if distributed.launched():
        # A rank of a multi-process job. Given a model *name*, HFLM builds its own accelerate state and goes
        # data-parallel over every process it sees; given the loaded model, it takes the ranks run_lm_eval
        # names: the job's (lm-eval tasks), or rank 0 alone (judge benchmarks, while the others wait).
        import transformers

        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            resolve_model(model), revision=revision, dtype=pick_dtype(dtype, device),
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            resolve_model(model), revision=revision, trust_remote_code=trust_remote_code
        )
        return CountingHFLM(pretrained=loaded.to(device).eval(), tokenizer=tokenizer,
                            batch_size=cfg.batch_size, max_length=cfg.max_length)  # fmt: skip
    return CountingHFLM(
        pretrained=resolve_model(model),
        revision=revision or "main",
        device=str(device),
        dtype=pick_dtype(dtype, device),
        batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        trust_remote_code=trust_remote_code,
    )


def run_lm_eval(
    lm: CountingHFLM,
    name: str,
    manager: TaskManager,
    cfg: EvalConfig,
    output_dir: Path,
    seed: int = 42,
    cache: RequestCache | None = None,
) -> EvalOutcome:
    """One task or group of cfg's on `lm`; its results under output_dir. Token counts are this task's: with
    a request cache, also those of the answers earlier attempts left in it (COMMIT_EVERY_S).

    In a multi-process job every rank calls this: lm-eval splits the documents among the ranks and rank 0
    gets the scores (and writes them); the token counts are every rank's, summed, on every rank."""
    _quiet_lm_eval()
    # the job's ranks, or rank 0 alone (distributed.alone()); in one process (0, 1), as HFLM set them
    lm._rank, lm._world_size = distributed.rank(), distributed.world_size()
    lm.answers = answers = cache.log(lm.rank, lm.world_size) if cache is not None else None
    earlier = answers.tokens if answers is not None else {"prefill": 0, "decode": 0}
    # lm's counters minus these are the task's tokens so far, the earlier attempts' included
    prefill, decode = lm.prefill_tokens - earlier["prefill"], lm.decode_tokens - earlier["decode"]
    if cache is not None:
        lm.set_cache_hook(answers)
        lm.between_batches = _committer(lm, cache, prefill, decode)
    try:
        raw = simple_evaluate(
            model=lm,
            tasks=task_specs([name], manager),
            task_manager=manager,
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        lm.set_cache_hook(CacheHook(None))
        lm.answers, lm.between_batches = None, None
    absent = answers.absent_tokens if answers is not None else {"prefill": 0, "decode": 0}
    counts = distributed.all_gather(
        (lm.prefill_tokens - prefill + absent["prefill"], lm.decode_tokens - decode + absent["decode"])
    )
    prefill_tokens, decode_tokens = (sum(column) for column in zip(*counts, strict=True))
    if raw is None:  # a rank other than 0: its scores went to rank 0
        return EvalOutcome(metrics={}, results={}, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens)
    results = _json_safe({key: value for key, value in raw.items() if key != "samples"})
    write_results(results, Path(output_dir))
    return EvalOutcome(
        metrics=flat_metrics(results),
        results=results,
        prefill_tokens=prefill_tokens,
        decode_tokens=decode_tokens,
    )


def _committer(lm: CountingHFLM, cache: RequestCache, prefill: int, decode: int) -> Callable[[], None]:
    """Between batches, at most every COMMIT_EVERY_S: the answers so far and their tokens to disk, then the
    energy spent on them (as a training checkpoint is followed by its energy)."""
    last = time.monotonic()

    def commit() -> None:
        nonlocal last
        if time.monotonic() - last < COMMIT_EVERY_S or lm.answers is None or not lm.answers.new:
            return
        lm.answers.checkpoint({"prefill": lm.prefill_tokens - prefill, "decode": lm.decode_tokens - decode})
        cache.commit_energy()
        last = time.monotonic()

    return commit


def task_specs(names: list[str], manager: TaskManager) -> list[dict[str, Any] | str]:
    """What simple_evaluate takes for each name: a single task's config with its data paths made absolute
    (relative data_files in a YAML are relative to the YAML); a group or tag by name."""
    specs: list[dict[str, Any] | str] = []
    for name in names:
        entry = manager.task_index.get(name)
        if entry is not None and name in manager.all_subtasks and entry.yaml_path is not None:
            specs.append(task_config(Path(entry.yaml_path)))
        else:
            specs.append(name)
    return specs


def task_config(yaml_path: Path) -> dict[str, Any]:
    """A task YAML as a config dict, with relative data_files (and a relative local dataset_path) resolved
    against the YAML's folder, and every local data file checked to exist."""
    cfg = load_yaml(yaml_path, resolve_func=True)
    cfg.update(absolute_data_paths(cfg, yaml_path))
    if isinstance(cfg.get("metadata"), dict):  # provenance: lm-eval records dict tasks as "inline"
        cfg["metadata"]["yaml_path"] = str(yaml_path)
    return cfg


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's {"task": {"exact_match,strict-match": v, "exact_match_stderr,strict-match": s}} as
    {"task/exact_match": v, "task/exact_match_stderr": s}. The filter name is kept, as
    "task/<filter>/<metric>", only where a task reports one metric under several filters (gsm8k's
    strict-match and flexible-extract); non-finite stderrs ("N/A" on one document) are left out."""
    metrics: dict[str, float] = {}
    for task, row in results.get("results", {}).items():
        filters: dict[str, set[str]] = {}
        for key in row:
            metric, _, filter_name = key.partition(",")
            filters.setdefault(metric.removesuffix("_stderr"), set()).add(filter_name)
        for key, value in row.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or not _finite_number(value):
                continue  # "alias", "sample_len", "N/A" stderrs, NaN
            several = len(filters[metric.removesuffix("_stderr")]) > 1
            metrics[f"{task}/{filter_name}/{metric}" if several else f"{task}/{metric}"] = float(value)
    return metrics


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def write_results(results: dict[str, Any], output_dir: Path) -> None:
    """output_dir/results.json (everything) and output_dir/tasks/<task>.json (one task's share of it)."""
    (output_dir / "tasks").mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    sections = {"config": "configs", "version": "versions", "n-shot": "n-shot", "n-samples": "n-samples"}
    sections["higher_is_better"] = "higher_is_better"
    for task, row in results.get("results", {}).items():
        part = {"task": task, "results": row}
        part.update(
            {name: results[key][task] for name, key in sections.items() if task in results.get(key, {})}
        )
        filename = task.replace("/", "_") + ".json"
        (output_dir / "tasks" / filename).write_text(json.dumps(part, indent=2, sort_keys=True))


def _json_safe(tree: dict[str, Any]) -> dict[str, Any]:
    # lm-eval's output holds numpy numbers, dtypes and (for !function tasks) callables.
    return json.loads(json.dumps(tree, default=handle_non_serializable))


def _quiet_lm_eval() -> None:
    # lm-eval logs every task, seed and device choice at INFO; leave that to LMEVAL_LOG_LEVEL=INFO.
    if not os.environ.get("LMEVAL_LOG_LEVEL"):
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
