"""Pre-flight: one pass over every input of a pipeline before any MLflow run opens or any stage starts.

    checks = preflight.run(cfg, "kd")          # a list of Check; raises PreflightError naming the culprit
    dist-bench validate kd --config configs/experiments/tiny_kd.yaml      # runs only this, prints the checks

A mistake that a check of seconds can find must not be found after hours of paid teacher work. The order
is cheap first, so that the commonest mistakes (a path, a typo'd id, a dead server) are answered in about a
second: tracking store, run dir, model specs, data file, devices; then what needs transformers and lm-eval
(configs, tokenizers, vocabularies, top-k, tasks, generation length) and the disk the logit cache will
fill. Nothing here loads weights or writes a file. Every stage adds its checks to its pipeline's function
below (sft and dpo will: generation settings, judges, API base URLs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dist_bench import tinyworld
from dist_bench.config import EvalConfig, ModelSpec, RunConfig
from dist_bench.redact import redact

PIPELINES = ("kd", "sft", "generate", "cache_logits", "eval", "prerun", "report")
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # tracking.py uses the same (it imports mlflow; this must not)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
SQLITE_HEADER = b"SQLite format 3\x00"
HTTP_TIMEOUT_S = (
    3.0,
    10.0,
)  # connect, read: a dead server is reported in seconds, not after minutes of retries
TOKENIZE_SAMPLE = 256  # records tokenized to estimate the logit cache's size


class PreflightError(ValueError):
    """A bad input, phrased as the one line the user sees: the field, file and line, URI or option first."""


@dataclass
class Check:
    name: str  # the field, option or resource checked
    detail: str  # what was found


def run(
    cfg: RunConfig, pipeline: str, *, eval_model: str | None = None, output_dir: Path | None = None
) -> list[Check]:
    """Every check of `pipeline`; the first failure raises PreflightError."""
    if pipeline == "kd":
        return kd(cfg)
    if pipeline == "sft":
        return sft(cfg)
    if pipeline == "cache_logits":
        return cache_logits(cfg)
    if pipeline == "generate":
        return generate(cfg)
    if pipeline == "eval":
        if not eval_model:
            raise PreflightError("--model: required for the eval pipeline")
        return evaluate(cfg, eval_model)
    if pipeline == "prerun":
        return prerun(cfg, output_dir)
    if pipeline == "report":
        return report(output_dir or Path("report"))
    raise PreflightError(f"pipeline: '{pipeline}' is not one of {', '.join(PIPELINES)}")


# ---- the pipelines ------------------------------------------------------------------------------------


def kd(cfg: RunConfig) -> list[Check]:
    """logit_caching -> student_train -> eval: both models, their shared vocabulary, data, tasks, disk."""
    checks = [
        pipeline_matches(cfg, "kd"),
        tracking_store(),
        writable_dir("output.run_dir", cfg.output.run_dir),
    ]
    teacher_source = model_source("teacher.model", cfg.teacher)
    student_source = model_source("student.model", cfg.student)
    checks += [teacher_source.check, student_source.check]
    data = data_records(cfg)
    checks += [data.check, device("train.device", cfg.train.device), device("eval.device", cfg.eval.device)]
    teacher = model_facts(teacher_source, cfg.teacher)
    student = model_facts(student_source, cfg.student)
    checks += [top_k(cfg, teacher), same_vocabulary(teacher, student)]
    checks += [eval_tasks(cfg.eval, student), cache_disk(cfg, teacher, data)]
    return checks


def sft(cfg: RunConfig) -> list[Check]:
    """student_train -> eval: the student (any tokenizer), data, devices, tasks."""
    checks = [
        pipeline_matches(cfg, "sft"),
        tracking_store(),
        writable_dir("output.run_dir", cfg.output.run_dir),
    ]
    student_source = model_source("student.model", cfg.student)
    data = data_records(cfg)
    checks += [student_source.check, data.check]
    if cfg.generation.enabled:  # the teacher writes the data first
        checks += teacher_generation(cfg, data)
    checks += [device("train.device", cfg.train.device), device("eval.device", cfg.eval.device)]
    student = model_facts(student_source, cfg.student)
    return [*checks, eval_tasks(cfg.eval, student)]


def generate(cfg: RunConfig) -> list[Check]:
    """teacher_generation alone: the teacher, the prompts, the decoding and filter settings."""
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    data = data_records(cfg)
    checks += [data.check, *teacher_generation(cfg, data), device("train.device", cfg.train.device)]
    return checks


def teacher_generation(cfg: RunConfig, data: DataScan) -> list[Check]:
    """The teacher loads, the filters' settings are valid, the prompts and completions fit its context."""
    from dist_bench.generation.filters import check_filters

    source = model_source("teacher.model", cfg.teacher)
    teacher = model_facts(source, cfg.teacher)
    gen = cfg.generation
    try:
        check_filters(gen.filters)
    except ValueError as err:
        raise PreflightError(str(err)) from None
    for at, stop in enumerate(gen.stop):
        if not stop:
            raise PreflightError(
                f"generation.stop[{at}]: empty string (it would end every completion at once)"
            )
    if cfg.data.format == "messages" and not cfg.data.chat_template and not teacher.tokenizer.chat_template:
        raise PreflightError(
            f"data.chat_template: the teacher {cfg.teacher.model} has no chat template to render the prompts "
            "with; set data.chat_template"
        )
    longest = max((_teacher_prompt_tokens(teacher, cfg, record) for record in data.sample), default=0)
    context = getattr(teacher.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and longest + gen.max_new_tokens > context:
        raise PreflightError(
            f"generation.max_new_tokens: {gen.max_new_tokens} new tokens after a prompt of {longest} tokens "
            f"exceed the teacher's context of {context} tokens"
        )
    decoding = "greedy" if gen.temperature == 0 else f"temperature {gen.temperature}, top_p {gen.top_p}"
    return [
        source.check,
        Check(
            "generation",
            f"{gen.n} completion(s) per prompt, {decoding}, up to {gen.max_new_tokens} new tokens "
            f"(longest sampled prompt {longest} tokens, teacher context {context}); filters valid",
        ),
    ]


def _teacher_prompt_tokens(teacher: ModelFacts, cfg: RunConfig, record: Any) -> int:
    if cfg.data.format != "messages":
        return len(teacher.tokenizer(record.prompt, add_special_tokens=True)["input_ids"])
    conversation = list(record.messages)
    if conversation and conversation[-1]["role"] == "assistant":
        conversation.pop()  # the reference answer, not part of the prompt
    text = teacher.tokenizer.apply_chat_template(
        conversation, chat_template=cfg.data.chat_template and _template_text(cfg, teacher),
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    return len(teacher.tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_text(cfg: RunConfig, teacher: ModelFacts) -> str:
    from dist_bench.dataset import chat_template

    return chat_template(cfg.data, teacher.tokenizer)


def pipeline_matches(cfg: RunConfig, pipeline: str) -> Check:
    if cfg.pipeline != pipeline:
        raise PreflightError(
            f"pipeline: the config is for '{cfg.pipeline}' but this is the {pipeline} entry point "
            f"(run dist-bench {cfg.pipeline}, or set pipeline={pipeline})"
        )
    return Check("pipeline", pipeline)


def cache_logits(cfg: RunConfig) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    teacher_source = model_source("teacher.model", cfg.teacher)
    data = data_records(cfg)
    checks += [teacher_source.check, data.check, device("train.device", cfg.train.device)]
    teacher = model_facts(teacher_source, cfg.teacher)
    return [*checks, top_k(cfg, teacher), cache_disk(cfg, teacher, data)]


def evaluate(cfg: RunConfig, model: str) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    source = model_source("--model", ModelSpec(model=model))
    checks += [source.check, device("eval.device", cfg.eval.device)]
    facts = model_facts(source, ModelSpec(model=model))
    return [*checks, eval_tasks(cfg.eval, facts)]


def prerun(cfg: RunConfig, output_dir: Path | None) -> list[Check]:
    checks = [tracking_store(), writable_dir("output.run_dir", cfg.output.run_dir)]
    if output_dir is not None:
        checks.append(writable_dir("--output-dir", output_dir))
    return checks


def report(output_dir: Path) -> list[Check]:
    return [tracking_store(), writable_dir("--output-dir", output_dir)]


# ---- tracking store -----------------------------------------------------------------------------------

# MLflow's built-in tracking schemes; anything else is looked up in MLflow's (plugin-extensible) registry.
KNOWN_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "uc"}


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def tracking_store() -> Check:
    """The store MLFLOW_TRACKING_URI names: a scheme MLflow knows, and a database or server that answers."""
    uri = tracking_uri()
    shown = redact(uri)
    scheme = urlparse(uri).scheme
    if len(scheme) == 1:  # C:\... : a Windows path, not a scheme
        scheme = ""
    if scheme.split("+")[0] not in KNOWN_SCHEMES and scheme not in _registered_schemes():
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: '{shown}': unknown scheme '{scheme}' "
            "(sqlite:///file.db, http(s)://host:port, postgresql://..., file:///folder or a folder)"
        )
    if scheme == "sqlite":
        return _sqlite_store(uri, shown)
    if scheme in ("http", "https"):
        return _http_store(uri, shown)
    if scheme in ("", "file"):
        folder = urlparse(uri).path if scheme == "file" else uri
        return Check("tracking store", f"{shown} ({writable_dir('MLFLOW_TRACKING_URI', folder).detail})")
    return Check("tracking store", f"{shown} (scheme '{scheme}': reachability not probed)")


def _registered_schemes() -> set[str]:
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    return set(_tracking_store_registry._registry)


def _sqlite_store(uri: str, shown: str) -> Check:
    path_text = uri.removeprefix("sqlite:///")
    if path_text in ("", ":memory:") or not uri.startswith("sqlite:///"):
        return Check("tracking store", f"{shown} (in memory)")
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise PreflightError(f"MLFLOW_TRACKING_URI: {shown}: {path} is a folder, not a database file")
    if path.exists():
        try:
            with path.open("rb") as handle:
                header = handle.read(len(SQLITE_HEADER))
        except OSError as err:
            raise PreflightError(
                f"MLFLOW_TRACKING_URI: {shown}: cannot read {path} ({err.strerror})"
            ) from None
        if header and header != SQLITE_HEADER:  # an empty file is an empty database
            raise PreflightError(f"MLFLOW_TRACKING_URI: {shown}: {path} is not an SQLite database")
        return Check("tracking store", f"{shown} (SQLite database, {path.stat().st_size / 1e6:.1f} MB)")
    writable_dir("MLFLOW_TRACKING_URI", path.parent)
    return Check("tracking store", f"{shown} (a new SQLite database will be created)")


def _http_store(uri: str, shown: str) -> Check:
    """One real API call with a short timeout (MLflow's own client retries for minutes before giving up)."""
    import requests

    headers, auth = {}, None
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    verify = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search"
    try:
        response = requests.get(
            url, params={"max_results": 1}, headers=headers, auth=auth, timeout=HTTP_TIMEOUT_S, verify=verify
        )
    except requests.Timeout:
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: the tracking server did not answer in time"
        ) from None
    except requests.RequestException as err:
        why = type(err).__name__
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: no tracking server answers there ({why})"
        ) from None
    if response.status_code in (401, 403):
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: the tracking server refused the credentials (HTTP {response.status_code})"
        )
    try:
        body = response.json() if response.ok else None
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise PreflightError(
            f"MLFLOW_TRACKING_URI: {shown}: answered HTTP {response.status_code}, not as an MLflow tracking server"
        )
    return Check("tracking store", f"{shown} (MLflow server answered)")


# ---- folders and devices ------------------------------------------------------------------------------


def writable_dir(field: str, path: str | Path) -> Check:
    """A folder that is, or can be created as, a writable directory; nothing is created."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "" if existing == target else f" ({existing} is a file)"
        what = "is a file, not a folder" if existing == target else "cannot be created"
        raise PreflightError(f"{field}: {target} {what}{where}")
    try:
        with tempfile.TemporaryFile(dir=existing):  # os.access says yes to root even where writing fails
            pass
    except OSError as err:
        raise PreflightError(f"{field}: {target}: not writable ({err.strerror})") from None
    free = shutil.disk_usage(existing).free
    return Check(field, f"{target} (writable, {free / 1e9:.1f} GB free)")


def device(field: str, requested: str) -> Check:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise PreflightError(
            f"{field}=cuda: torch sees no CUDA device (torch {torch.__version__}, {build}); use auto or cpu"
        )
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if requested == "cuda" else "CPU"
    return Check(field, f"{requested} ({name})")


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
        entries = repo.list_artifacts()
    except MlflowException as err:
        raise PreflightError(f"{field}: {uri}: {redact(str(err.message)).splitlines()[0]}") from None
    files = [entry.path for entry in entries if not entry.is_dir]
    if not files:
        raise PreflightError(f"{field}: {uri}: no such artifact (nothing logged under that path)")
    if not any(Path(f).name == "config.json" for f in files):
        raise PreflightError(f"{field}: {uri} has no config.json (not a Hugging Face model folder)")
    local = Path(tempfile.mkdtemp(prefix="dist-bench-preflight-"))
    for file in files:
        if not file.endswith(WEIGHT_SUFFIXES):
            repo.download_artifacts(file, str(local))
    # Entries are relative to the artifact repository's root or to the URI's own path, by repository kind.
    config = next(local.rglob("config.json"))
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


# ---- data ---------------------------------------------------------------------------------------------


@dataclass
class DataScan:
    records: int  # records the stages will read
    sample: list[Any]  # dataset.Record of the first few, parsed as the stages parse them, for estimates
    check: Check
    chat_template: str | None = None  # messages format: the template the stages will render with


def data_records(cfg: RunConfig) -> DataScan:
    """Every record the stages will read, parsed as they will parse it: the first bad one is named.

    For the messages format also the chat template (data.chat_template, else the student tokenizer's own:
    a base model has none), and the first records rendered and masked with it, so that a template the
    stages would refuse (not valid Jinja, not prefix-stable, marking no assistant tokens) stops here too.
    """
    from dist_bench.dataset import chat_template, encode, read_records
    from dist_bench.errors import DataError

    sample: list[Any] = []
    count = 0
    template = None
    try:
        shown = tinyworld.resolve(cfg.data.train)
        tokenizer = None
        if cfg.data.format == "messages":
            # The student's tokenizer renders and tokenizes the conversations in training (its template,
            # special tokens); checked before the data, which may take long to read.
            tokenizer = model_facts(model_source("student.model", cfg.student), cfg.student).tokenizer
            template = chat_template(cfg.data, tokenizer)
        for record in read_records(cfg.data):
            count += 1
            if len(sample) < TOKENIZE_SAMPLE:
                sample.append(record)
        if tokenizer is not None:
            for record in sample:
                encode(record, tokenizer, cfg.data, template)
    except (DataError, FileNotFoundError) as err:
        text = str(err)
        raise PreflightError(
            text if text.startswith(("data.train: ", "data.chat_template: ")) else f"data.train: {text}"
        ) from None
    except OSError as err:
        raise PreflightError(f"data.train: {cfg.data.train}: cannot be read ({err.strerror})") from None
    where = shown if cfg.data.split == "train" else f"{shown}, split {cfg.data.split}"
    if cfg.data.subset is not None:
        where += f", subset {cfg.data.subset}"
    detail = f"{where} ({count} records, every one well-formed"
    if template is not None:
        shown_template = cfg.data.chat_template or f"the tokenizer of {cfg.student.model}"
        detail += f"; the first {len(sample)} rendered with the chat template of {shown_template}"
    return DataScan(count, sample, Check("data.train", detail + ")"), template)


# ---- evaluation ---------------------------------------------------------------------------------------


def eval_tasks(cfg: EvalConfig, model: ModelFacts) -> Check:
    """Every task resolves to a YAML, its data is there, and its generations fit the model's context."""
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import resolve_max_length
    from lm_eval.tasks import TaskManager

    from dist_bench.evaluation.harness import task_dir_path, task_specs

    try:
        folder = task_dir_path(cfg.task_dir)
    except FileNotFoundError as err:
        raise PreflightError(str(err)) from None
    manager = TaskManager(include_path=str(folder), include_defaults=cfg.include_default_tasks)
    try:
        specs = task_specs(cfg.tasks, manager)
    except (ValueError, FileNotFoundError) as err:
        raise PreflightError(f"eval.tasks: {err}") from None
    max_length = cfg.max_length or resolve_max_length(
        model.config, model.tokenizer, default=HFLM._DEFAULT_MAX_LENGTH
    )
    for spec in specs:
        if isinstance(spec, dict):
            _task_data_present(spec)
            _generation_fits(spec, max_length, cfg, model)
    return Check("eval.tasks", f"{', '.join(cfg.tasks)} (data present; model context {max_length} tokens)")


def _generation_fits(task: dict[str, Any], max_length: int, cfg: EvalConfig, model: ModelFacts) -> None:
    # lm-eval keeps max_length - max_gen_toks tokens of context and asserts that this is positive.
    if task.get("output_type") != "generate_until":
        return
    kwargs = task.get("generation_kwargs") or {}
    aliases = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
    max_gen = next(
        (int(kwargs[key]) for key in aliases if kwargs.get(key) is not None), 256
    )  # HFLM's default
    if max_gen >= max_length:
        origin = "eval.max_length" if cfg.max_length else f"the context of {model.source.spec}"
        raise PreflightError(
            f"eval.tasks: task '{task['task']}' generates up to {max_gen} tokens but {origin} is {max_length} "
            "tokens; set eval.max_length above it (a model that supports it) or lower the task's max_gen_toks"
        )


def _task_data_present(task: dict[str, Any]) -> None:
    """Local dataset folders exist (data_files were checked by task_specs); Hub datasets are cached when the
    Hub is off limits."""
    dataset = str(task.get("dataset_path") or "")
    if not dataset or (task.get("dataset_kwargs") or {}).get("data_files") is not None:
        return
    if Path(dataset).is_absolute() or Path(dataset).exists():  # a local folder (made absolute by task_config)
        if not Path(dataset).exists():
            raise PreflightError(f"eval.tasks: task '{task['task']}': dataset folder {dataset} not found")
        return
    offline = any(
        os.environ.get(name, "").lower() in ("1", "true", "yes")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    )
    if offline and not _dataset_cached(dataset):
        raise PreflightError(
            f"eval.tasks: task '{task['task']}' reads the Hub dataset '{dataset}', which is not in the local "
            "cache, and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
        )


def _dataset_cached(dataset: str) -> bool:
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{dataset.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub.is_dir() or (datasets_cache / dataset.replace("/", "___")).is_dir()


# ---- disk ---------------------------------------------------------------------------------------------


def cache_disk(cfg: RunConfig, teacher: ModelFacts, data: DataScan) -> Check:
    """The disk under output.run_dir holds the logit cache the teacher will write."""
    planned = planned_cache_bytes(cfg, teacher.tokenizer, data)
    folder = Path(cfg.output.run_dir).expanduser().absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if planned > free:
        raise PreflightError(
            f"output.run_dir: {folder} has {_size(free)} free but the logit cache (logits.top_k={cfg.logits.top_k}, "
            f"{data.records} records) needs about {_size(planned)}"
        )
    return Check("disk", f"logit cache ~{_size(planned)}; {_size(free)} free under {existing}")


def _size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000:
            return f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    return f"{n_bytes:.1f} TB"


def planned_cache_bytes(cfg: RunConfig, tokenizer: Any, data: DataScan) -> int:
    """The logit cache's size, from the supervised positions of the first records (see logit_cache.py)."""
    from dist_bench.dataset import encode
    from dist_bench.errors import DataError

    positions = []
    for record in data.sample:
        try:
            positions.append(encode(record, tokenizer, cfg.data, data.chat_template).supervised_tokens)
        except DataError:  # nothing to learn in this record: the stage says so; here it adds no positions
            positions.append(0)
    mean_positions = sum(positions) / max(len(positions), 1)
    bytes_per_position = cfg.logits.top_k * (4 + (4 if cfg.logits.logprob_dtype == "float32" else 2))
    return int(
        mean_positions * data.records * bytes_per_position + data.records * 16
    )  # + offsets, sequence index
