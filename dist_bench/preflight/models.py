"""Model specs: where a model's config and tokenizer are (local, Hub cache, MLflow), without loading weights;
vocabulary and top-k checks between teacher and student."""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_bench import tinyworld
from dist_bench.config import ModelSpec, RunConfig
from dist_bench.preflight.base import Check, PreflightError
from dist_bench.preflight.store import HTTP_TIMEOUT_S, tracking_uri
from dist_bench.redact import redact
from dist_bench.teacher.cache_format import MAX_ID_BITS

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


# ---- models -------------------------------------------------------------------------------------------


@dataclass
class ModelSource:
    field: str  # the config field or option that named it
    spec: str  # as the user wrote it
    location: str  # what from_pretrained opens for config and tokenizer: a local dir or a Hub id
    check: Check


@dataclass
class ModelFacts:
    source: ModelSource
    config: Any  # transformers.PretrainedConfig
    tokenizer: Any  # transformers.PreTrainedTokenizerBase

    @property
    def vocab_size(self) -> int | None:
        text = getattr(self.config, "text_config", None) or self.config
        return getattr(text, "vocab_size", None)


def model_source(field: str, spec: ModelSpec) -> ModelSource:
    """Where a model spec's config and tokenizer can be read, without loading weights.

    tinyworld:<name> and local dirs must hold a config.json; runs:/, models:/ and mlflow-artifacts:/ URIs must
    exist in the tracking store (their small files are fetched to a temp dir); a Hub id must be in the local
    cache or, when the Hub is allowed and reachable, exist there.
    """
    name = spec.model
    if name.startswith(tinyworld.PREFIX):
        try:
            path = Path(tinyworld.resolve(name))
        except FileNotFoundError as err:
            raise PreflightError(f"{field}: {err}") from None
        return _local_dir(field, name, path)
    if name.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        return _mlflow_model(field, name)
    path = Path(name).expanduser()
    if path.exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return _local_dir(field, name, path)
    return _hub_model(field, name, spec.revision)


def _local_dir(field: str, spec: str, path: Path) -> ModelSource:
    if not path.exists():
        raise PreflightError(f"{field}: {path}: no such folder")
    if not path.is_dir():
        raise PreflightError(f"{field}: {path} is a file; a model is a folder with config.json")
    if not (path / "config.json").is_file():
        raise PreflightError(f"{field}: {path} has no config.json (not a Hugging Face model folder)")
    return ModelSource(field, spec, str(path), Check(field, f"{spec} (local folder {path})"))


def _hub_model(field: str, repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    at = f"@{revision}" if revision else ""
    try:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError as err:  # not a valid repo id at all
        raise PreflightError(
            f"{field}: '{repo_id}' is neither a local folder nor a Hub model id ({err})"
        ) from None
    if isinstance(cached, str):
        return ModelSource(field, repo_id, repo_id, Check(field, f"{repo_id}{at} (Hugging Face cache)"))
    if constants.HF_HUB_OFFLINE:
        raise PreflightError(
            f"{field}: '{repo_id}{at}' is not a local folder and not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE is set"
        )
    try:
        HfApi().model_info(repo_id, revision=revision, timeout=HTTP_TIMEOUT_S[1])
    except RevisionNotFoundError:
        raise PreflightError(
            f"{field.rsplit('.', 1)[0]}.revision: '{revision}' not found in {repo_id}"
        ) from None
    except GatedRepoError:
        raise PreflightError(
            f"{field}: '{repo_id}' is gated: accept its licence on the Hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise PreflightError(
            f"{field}: '{repo_id}' is not a local folder and no such model is on the Hub (private ones need HF_TOKEN)"
        ) from None
    except Exception as err:  # any network failure means the same thing here
        raise PreflightError(
            f"{field}: '{repo_id}' is not a local folder, not in the Hugging Face cache, and the Hub is "
            f"unreachable ({type(err).__name__})"
        ) from None
    return ModelSource(field, repo_id, repo_id, Check(field, f"{repo_id}{at} (on the Hub)"))


FLAVOUR_DIRS = ("model", "components/tokenizer")


def _mlflow_model(field: str, uri: str) -> ModelSource:
    """An MLflow artifact URI that exists; its config and tokenizer files (not its weights) fetched."""
    sqlite = tracking_uri().removeprefix("sqlite:///") if tracking_uri().startswith("sqlite:///") else None
    if sqlite is not None and not Path(sqlite).expanduser().is_file():
        raise PreflightError(f"{field}: {uri}: the tracking store {redact(tracking_uri())} holds no runs yet")
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.set_tracking_uri(tracking_uri())
    try:
        repo = get_artifact_repository(uri)
        entries = repo.list_artifacts(None)  # models:/ repositories take no default path
    except MlflowException as err:
        raise PreflightError(f"{field}: {uri}: {redact(str(err.message)).splitlines()[0]}") from None
    files = [entry.path for entry in entries if not entry.is_dir]
    if not files:
        raise PreflightError(f"{field}: {uri}: no such artifact (nothing logged under that path)")
    flavour = any(Path(f).name == "MLmodel" for f in files)
    if flavour:  # an MLflow transformers model (registry.py): weights in model/, tokenizer in components/
        try:
            files = [e.path for sub in FLAVOUR_DIRS for e in repo.list_artifacts(sub) if not e.is_dir]
        except MlflowException as err:
            raise PreflightError(f"{field}: {uri}: {redact(str(err.message)).splitlines()[0]}") from None
    if not any(Path(f).name == "config.json" for f in files):
        raise PreflightError(f"{field}: {uri} has no config.json (not a Hugging Face model folder)")
    local = Path(tempfile.mkdtemp(prefix="dist-bench-preflight-"))
    for file in files:
        if not file.endswith(WEIGHT_SUFFIXES):
            repo.download_artifacts(file, str(local))
    # Entries are relative to the artifact repository's root or to the URI's own path, by repository kind.
    config = next(local.rglob("config.json"))
    if flavour:  # the tokenizer beside the config, as models.resolve_model arranges it for the stages
        for file in next(local.rglob("components/tokenizer"), local).glob("*"):
            shutil.copy2(file, config.parent / file.name)
    return ModelSource(field, uri, str(config.parent), Check(field, f"{uri} (in the tracking store)"))


def model_facts(source: ModelSource, spec: ModelSpec) -> ModelFacts:
    """The model's config and tokenizer, as the stages will load them (no weights)."""
    from transformers import AutoConfig

    from dist_bench.models import load_tokenizer

    try:
        config = AutoConfig.from_pretrained(
            source.location, revision=spec.revision, trust_remote_code=spec.trust_remote_code
        )
        tokenizer = load_tokenizer(source.location, spec.revision, spec.trust_remote_code)
    except (OSError, ValueError) as err:
        first = redact(str(err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PreflightError(f"{source.field}: {source.spec}: cannot be loaded ({first})") from None
    return ModelFacts(source, config, tokenizer)


def top_k(cfg: RunConfig, teacher: ModelFacts) -> Check:
    vocab = teacher.vocab_size
    if vocab is not None and cfg.logits.top_k > vocab:
        raise PreflightError(
            f"logits.top_k: {cfg.logits.top_k} is more than the teacher's vocabulary "
            f"({vocab} tokens, {cfg.teacher.model})"
        )
    if vocab is not None and vocab > 1 << MAX_ID_BITS:
        raise PreflightError(
            f"teacher.model: {cfg.teacher.model} has {vocab} tokens; the logit cache packs ids in at most "
            f"{MAX_ID_BITS} bits ({1 << MAX_ID_BITS} tokens)"
        )
    return Check("logits.top_k", f"{cfg.logits.top_k} of {vocab} teacher tokens")


def same_vocabulary(teacher: ModelFacts, student: ModelFacts) -> Check:
    """Logit distillation compares distributions token by token: one tokenizer, one vocabulary size."""
    from dist_bench.models import tokenizer_fingerprint

    if teacher.vocab_size != student.vocab_size:
        raise PreflightError(
            f"student.model: vocab_size {student.vocab_size} ({student.source.spec}) differs from the teacher's "
            f"{teacher.vocab_size} ({teacher.source.spec}); logit distillation needs one vocabulary "
            "(the sft pipeline takes cross-tokenizer pairs)"
        )
    if tokenizer_fingerprint(teacher.tokenizer) != tokenizer_fingerprint(student.tokenizer):
        raise PreflightError(
            f"student.model: the tokenizer of {student.source.spec} differs from the teacher's "
            f"({teacher.source.spec}); logit distillation needs one vocabulary "
            "(the sft pipeline takes cross-tokenizer pairs)"
        )
    return Check("vocabulary", f"teacher and student share one tokenizer ({teacher.vocab_size} tokens)")


def student_kernels(cfg: RunConfig, student: ModelFacts) -> list[Check]:
    """train.liger_kernel, where set: a GPU, the liger-kernel package, and a model family Liger patches (for
    any other, transformers' Trainer only logs a warning and trains without them: a run the config does not
    describe)."""
    import importlib.util

    import torch

    if not cfg.train.liger_kernel:
        return []
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        raise PreflightError("train.liger_kernel: Liger's kernels are Triton kernels and need a CUDA device")
    if importlib.util.find_spec("liger_kernel") is None:
        raise PreflightError(
            "train.liger_kernel: the liger-kernel package is not installed (pip install liger-kernel)"
        )
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = getattr(student.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise PreflightError(
            f"train.liger_kernel: Liger has no kernels for model_type {model_type!r} of "
            f"{student.source.spec} (it has: {', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))})"
        )
    return [Check("train.liger_kernel", f"Liger kernels for {model_type}")]
