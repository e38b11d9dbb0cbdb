"""Loading models and tokenizers: one path for the tiny world, local dirs, MLflow artifacts and Hub ids.

A model spec is a string: a Hugging Face model id (`Qwen/Qwen2.5-0.5B`), a local model dir,
`tinyworld:<name>` for the embedded models, or an MLflow artifact URI (`runs:/<run_id>/final_model`).
Whatever it is, it ends in `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dist_bench import tinyworld

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model(spec: str) -> str:
    """A local path or Hub id that from_pretrained accepts."""
    if spec.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        return _transformers_flavour(Path(mlflow.artifacts.download_artifacts(artifact_uri=spec)))
    return tinyworld.resolve(spec)


def _transformers_flavour(path: Path) -> str:
    """An MLflow transformers model (registry.py logs one) keeps the weights in model/ and the tokenizer in
    components/tokenizer/: one folder that from_pretrained reads for both (the download is a private copy).
    Anything else (a final_model artifact, a checkpoint) is returned as it is."""
    weights, tokenizer = path / "model", path / "components" / "tokenizer"
    if not ((path / "MLmodel").is_file() and (weights / "config.json").is_file() and tokenizer.is_dir()):
        return str(path)
    for file in tokenizer.iterdir():
        if not (weights / file.name).exists():
            shutil.copy2(file, weights / file.name)
    return str(weights)


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but torch sees no CUDA device")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float32
    return _DTYPES[requested]


def load_tokenizer(
    spec: str, revision: str | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(spec), revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:  # many base models ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    spec: str,
    device: torch.device,
    dtype: str = "auto",
    revision: str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(spec),
        revision=revision,
        dtype=pick_dtype(dtype, device),
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation,
    )
    return model.to(device)


def fingerprint(spec: str, revision: str | None = None) -> str:
    """Identity of a model's weights for cache keys: a content hash for local dirs, id@revision for the Hub."""
    path = Path(resolve_model(spec))
    if path.is_dir():
        return "sha256:" + hash_files(sorted(p for p in path.rglob("*") if p.is_file()), root=path)
    return f"hub:{spec}@{revision or 'main'}"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Identity of a vocabulary: logit distillation needs teacher and student to share it exactly."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    return "sha256:" + hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()


def hash_files(files: list[Path], root: Path | None = None) -> str:
    """sha256 over (relative name, content) of each file, in the given order."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(root) if root else file.name).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def free_memory() -> None:
    """Free a released local model before the next one loads (on a GPU both may not fit)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
