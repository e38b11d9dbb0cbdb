"""The run configuration: one pydantic schema, loaded as base.yaml + experiment file + dotted overrides.

    cfg = load_config("configs/experiments/tiny_kd.yaml", ["train.optimizer.lr=1e-3", "kd.temperature=2"])

`configs/base.yaml` holds the fixed defaults every experiment shares (seed, token budget, optimizer,
energy, tracking); an experiment file overrides part of it; `key.path=value` overrides from the command
line come last (values parsed as YAML scalars). Unknown keys and bad values raise `ConfigError` naming
the dotted path, where the value came from and why it is wrong; the CLI turns that into exit code 2
before anything is started.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = PROJECT_ROOT / "configs" / "base.yaml"
DEFAULT_EXPERIMENT = PROJECT_ROOT / "configs" / "experiments" / "tiny_kd.yaml"


class ConfigError(ValueError):
    """A config problem, already phrased as the one line the user sees."""


class Strict(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Strict):
    model: str = Field(
        description="Hugging Face model id, local model dir, or tinyworld:<name> for the embedded models"
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for a model id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype when loading; auto = bfloat16 on a bf16-capable GPU, else float32"
    )
    trust_remote_code: bool = Field(
        False, description="run the model repository's own Python code (transformers' trust_remote_code)"
    )


class ApiPrice(Strict):
    input_per_million: float = Field(
        0.0, ge=0, description="price of a million prompt tokens (budget's currency)"
    )
    output_per_million: float = Field(
        0.0, ge=0, description="price of a million completion tokens (budget's currency)"
    )


class ApiTeacherConfig(Strict):
    """An OpenAI-compatible server that writes the completions (teacher_generation): a hosted model, or a
    vLLM / SGLang server (`vllm serve <model>`). Settings that do not change the answers (concurrency,
    pace, retries, price, budget, cache) are not part of the stage's identity: changing them resumes it."""

    base_url: str = Field(description="the API's base URL, e.g. http://127.0.0.1:8000/v1")
    model: str = Field(min_length=1, description="the model name the server serves")
    api_key_env: str | None = Field(
        None,
        description="name of the environment variable holding the API key (the key itself never goes "
        "in config, params, tags, artifacts or logs); unset: no key",
    )
    endpoint: Literal["chat", "completions"] = Field(
        "chat", description="chat: /chat/completions with messages (a text prompt as one user turn); "
        "completions: /completions with the text"
    )  # fmt: skip
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(60.0, gt=0, description="seconds before a request counts as timed out")
    max_retries: int = Field(6, ge=0, description="retries of a request (429, 5xx, timeout, malformed)")
    price: ApiPrice = Field(ApiPrice(), description="what tokens cost, for spend and budget")
    budget: float | None = Field(
        None, ge=0, description="the most this stage may spend, all attempts together; unset: no limit"
    )
    requests_per_minute: float | None = Field(
        None, gt=0, description="pace until the server's x-ratelimit-* headers give its own"
    )
    tokens_per_minute: float | None = Field(
        None, gt=0, description="token pace until the server's x-ratelimit-* headers give its own"
    )
    cache: bool = Field(
        True, description="keep responses across runs (in cache_dir): a rerun pays nothing twice"
    )
    cache_dir: str = Field("api-cache", description="the response cache, relative to output.run_dir")
    energy_j_per_token: float | None = Field(
        None,
        ge=0,
        description="the remote teacher's energy per generated token if known: logged as an estimate, "
        "labelled 'estimated' (a remote GPU cannot be measured)",
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{url!r} is not an http(s) URL")
        return url.rstrip("/")


class TeacherSpec(ModelSpec):
    api: ApiTeacherConfig | None = Field(
        None,
        description="generate through an OpenAI-compatible API instead of loading teacher.model "
        "(teacher_generation only; kd's logit cache needs the local model)",
    )


class DataConfig(Strict):
    train: str = Field(
        description="the training data: a JSON-lines file; a Parquet, Arrow or JSON file or a folder of "
        "them; a datasets save_to_disk folder; a Hugging Face dataset id; or tinyworld:<split> for the "
        "embedded corpus"
    )
    split: str = Field(
        "train",
        description="split of a Hub dataset, a saved DatasetDict or a folder laid out in splits "
        "(train-00000-of-00002.parquet); a single file is one split already",
    )
    subset: str | None = Field(
        None, description="Hub dataset config (subset) name, for a Hub id or a downloaded Hub snapshot folder"
    )
    format: Literal["prompt_completion", "messages"] = Field(
        "prompt_completion",
        description="prompt_completion: two text fields, the loss on the completion; messages: a "
        "conversation rendered with a chat template, the loss on the assistant turns",
    )
    prompt_field: str = Field("prompt", description="format prompt_completion: the prompt's field")
    completion_field: str = Field(
        "completion", description="format prompt_completion: the completion's field"
    )
    messages_field: str = Field(
        "messages", description="format messages: the field holding the list of {role, content} messages"
    )
    chat_template: str | None = Field(
        None,
        description="format messages: a Jinja chat template file (relative paths: to the project), or a "
        "model id/folder whose tokenizer's template is used; unset: the student tokenizer's own",
    )
    max_length: int = Field(256, ge=8, description="sequences are truncated to this many tokens")
    max_samples: int | None = Field(None, ge=1, description="use only the first N records")
    supervise: Literal["completion", "all"] = Field(
        "completion",
        description="positions that get a loss and cached teacher log-probs: completion = the completion "
        "(prompt_completion) or the assistant turns (messages); all = every token after the first",
    )


class LogitCacheConfig(Strict):
    """The teacher's logit cache (teacher/cache_format.py): per supervised position, its most likely tokens
    until they hold `cover` of the probability, at most `top_k`."""

    top_k: int = Field(
        16, ge=1, le=1024, description="at most this many teacher tokens kept per supervised position"
    )
    cover: float = Field(
        1.0,
        gt=0,
        le=1,
        description="keep tokens, most likely first, until their probability sums to this (adaptive top-p); "
        "1.0 keeps top_k. The cover is of the teacher's mass at T = 1, not of what KD learns from it: the "
        "tiny world's KD fell from 0.99 to 0.64 exact match at 0.99 (docs/benchmarks.md)",
    )
    logprob_step: float = Field(
        1 / 8,
        gt=0,
        le=1,
        description="nats per 8-bit log-prob code: every cached log-prob is within one step of the "
        "teacher's; tokens more than 255 steps (32 nats at 1/8) below the top-1 go to the tail",
    )
    fidelity_every: int = Field(
        256,
        ge=1,
        description="every n-th supervised position of a batch (and its first) also measures KL(teacher || "
        "what the cache keeps of it) (metric fidelity_kl): ~1,000 positions of a shard of 256 sequences of 1024 "
        "tokens; each costs a full-vocabulary softmax",
    )
    batch_size: int = Field(32, ge=1, description="teacher sequences per forward pass")
    shard_size: int = Field(256, ge=1, description="sequences per shard; resume granularity")


class OptimizerConfig(Strict):
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW's (beta1, beta2)")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon")
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up to lr")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after warm-up, to 0 at the last step (constant: none)"
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0, description="clip the global gradient norm to this; unset: no clipping"
    )


class TrainConfig(Strict):
    token_budget: int = Field(
        ge=1, description="training stops once this many non-padding input tokens have been processed"
    )
    max_steps: int | None = Field(None, ge=1, description="optional hard cap on optimizer steps")
    batch_size: int = Field(
        32,
        ge=1,
        description="sequences per micro-batch; an optimizer step is batch_size x grad_accum sequences on any "
        "number of ranks (each runs a share of them: distributed.step_split)",
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how several ranks (--nproc, torchrun) train: ddp, each holds the whole student; fsdp, "
        "FSDP2 shards its parameters, gradients and optimizer state over the ranks (a student that does not "
        "fit one GPU)",
    )
    precision: Literal["fp32", "bf16", "bf16_pure"] = Field(
        "fp32",
        description="fp32; bf16 = bf16 autocast over fp32 master weights (CUDA only); bf16_pure = bf16 weights",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the teacher and the student run: auto takes CUDA when torch sees it"
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~20% slower"
    )
    packing: bool = Field(
        False,
        description="padding-free batches (one flattened row per micro-batch); needs flash attention on GPU",
    )
    attn_implementation: str = Field(
        "sdpa", description="attention kernels: sdpa, eager, flash_attention_2 (where installed), ..."
    )
    liger_kernel: bool = Field(
        False,
        description="Liger's Triton kernels for the student's RMSNorm, SwiGLU MLP and rotary embedding (TRL's "
        "use_liger_kernel; CUDA and the liger-kernel package): fewer, fused kernels per layer, so less host "
        "time per step, for SFT, KD and DPO alike. The LM-head losses stay the project's. Liger patches the "
        "model family's classes for the rest of the process",
    )
    pad_to_multiple_of: int = Field(
        1,
        ge=1,
        description="a padded batch's length rounded up to a multiple of this (TRL's pad_to_multiple_of), for SFT, "
        "KD and DPO alike; a packed row (train.packing) is left as it is. On CUDA each new padded length makes "
        "cuDNN build its attention plans (~2 ms per layer call, against 0.15 ms once built), so a few lengths "
        "(e.g. 64) may train faster than many; docs/benchmarks.md says what is measured. The padding is computed "
        "on, never counted as tokens (metric padded_tokens)",
    )
    dataloader_workers: int | None = Field(
        None,
        ge=0,
        description="processes that collate the next micro-batches (KD: decode the teacher cache) while the "
        "current step runs (TrainingArguments.dataloader_num_workers), for SFT, KD and DPO alike; the batches "
        "and their order are the same. Unset: 2 on CUDA, where collating in the training process leaves the "
        "GPU idle; 0 on CPU, where workers would take the cores the step computes on",
    )
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept on disk; older ones removed")
    log_every: int = Field(10, ge=1, description="optimizer steps between train/* metrics in the stage run")
    optimizer: OptimizerConfig = Field(
        OptimizerConfig(), description="AdamW (fused on CUDA) and its schedule, the same for every method"
    )


class KDConfig(Strict):
    temperature: float = Field(
        1.0, gt=0, description="both distributions are softened by T before the divergence"
    )
    ce_weight: float = Field(
        0.5, ge=0, le=1, description="loss = ce_weight * CE + (1 - ce_weight) * T^2 * D(teacher || student)"
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="the divergence D between the cached teacher top-k and the student"
    )
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="mixture weight of the generalised JSD (loss=jsd)")
    tail: Literal["renormalize", "bucket"] = Field(
        "renormalize",
        description="renormalize: the teacher's top-k renormalised; bucket: one extra bucket holds the rest",
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="positions per chunk of the loss; unset: 4096 for renormalize (one [chunk, 32768] logit "
        "tile at a time), 1024 for bucket (whose full-vocabulary fp32 buffers are [chunk, V])",
    )


class FiltersConfig(Strict):
    """Which generated completions the student learns from (dist_bench/generation/filters.py). Applied in
    this order; each reports what it saw, kept and dropped."""

    empty: bool = Field(True, description="drop completions that are empty or only whitespace")
    truncated: bool = Field(
        True, description="drop completions cut off by generation.max_new_tokens (finish reason 'length')"
    )
    min_tokens: int | None = Field(None, ge=0, description="drop completions of fewer tokens than this")
    max_tokens: int | None = Field(None, ge=1, description="drop completions of more tokens than this")
    refusal_patterns: list[str] = Field(
        default_factory=list,
        description="regular expressions (Python re, case-insensitive); a completion matching any is dropped",
    )
    verify: Literal["none", "gsm8k", "boxed", "exact", "auto"] = Field(
        "none",
        description="rejection sampling against the prompt's reference answer: keep a completion only when "
        "its answer (gsm8k: the number after '####'; boxed: the last \\boxed{...}; exact: the whole text, "
        "whitespace collapsed; auto: whichever of the three the reference's own form calls for) equals the "
        "reference's",
    )
    dedupe: Literal["none", "exact", "near"] = Field(
        "exact",
        description="drop repeated completions of one prompt: exact (same text after whitespace "
        "normalisation) or near (MinHash-estimated Jaccard of word n-grams >= near_threshold)",
    )
    near_threshold: float = Field(0.9, gt=0, le=1, description="dedupe=near: Jaccard similarity threshold")
    ngram: int = Field(3, ge=1, description="dedupe=near: words per n-gram")
    max_per_prompt: int | None = Field(
        None,
        ge=1,
        description="keep at most this many completions per prompt (the first ones by sample index)",
    )


class GenerationConfig(Strict):
    """Stage teacher_generation: the teacher writes the SFT data (dist_bench/teacher/generation.py)."""

    enabled: bool = Field(
        False,
        description="sft pipeline: the teacher writes completions for data.train's prompts and the student "
        "trains on the filtered ones; false: the student trains on data.train as it is",
    )
    n: int = Field(1, ge=1, description="completions per prompt")
    temperature: float = Field(0.0, ge=0, description="0: greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass (sampling only)")
    top_k: int | None = Field(None, ge=1, description="sample among the k most likely tokens (sampling only)")
    max_new_tokens: int = Field(
        256, ge=1, description="completions stop here at the latest (finish reason 'length')"
    )
    stop: list[str] = Field(
        default_factory=list,
        description="strings that end a completion (excluded from it; finish reason 'stop')",
    )
    seed: int | None = Field(None, description="sampling seed; unset: the run's seed")
    batch_size: int = Field(
        64,
        ge=1,
        description="prompts per batch (batched by prompt length); on a GPU large batches pay: a 1.5B "
        "teacher on an H200 made 11 mJ per new token at 2048 (docs/benchmarks.md)",
    )
    shard_size: int = Field(256, ge=1, description="prompts per output shard; resume granularity")
    max_prompts: int | None = Field(None, ge=1, description="use only the first N prompts of data.train")
    backend: Literal["auto", "generate", "graph"] = Field(
        "auto",
        description="decode path: generate = transformers' model.generate; graph = a static-cache decode "
        "loop whose step is replayed as a CUDA graph (same forward, warpers and sampling; eager on CPU); "
        "auto = graph on CUDA, generate elsewhere",
    )
    filters: FiltersConfig = Field(
        FiltersConfig(),
        description="which generated completions are kept for training (generation/filters.py)",
    )


class PreferencesConfig(Strict):
    """The preference pairs the dpo pipeline trains on: built by the teacher (`method`, in stage
    teacher_generation from data.train's prompts and generation.*'s decoding) or read (`path`)."""

    method: Literal["verified", "teacher_vs_student", "judge"] | None = Field(
        None,
        description="verified: of generation.n teacher samples per prompt, one whose answer matches the "
        "reference against one that does not; teacher_vs_student: the teacher's completion against the "
        "policy init's (student.model); judge: a judge rates generation.n teacher samples, best against "
        "worst; unset: read preferences.path",
    )
    path: str | None = Field(
        None,
        description="existing pairs: prompt/chosen/rejected in TRL's standard (strings) or conversational "
        "(message lists) form, from a JSON-lines, JSON, Parquet or Arrow file, a folder, a save_to_disk "
        "folder or a Hugging Face dataset id",
    )
    split: str = Field("train", description="split of a Hub dataset or a saved DatasetDict")
    subset: str | None = Field(None, description="Hub dataset config (subset) name")
    verify: Literal["gsm8k", "boxed", "exact", "auto"] = Field(
        "auto",
        description="verified: how an answer is compared with the reference (as generation.filters.verify)",
    )
    judge: TeacherSpec | None = Field(
        None,
        description="judge: the model that rates the samples, a local model or an OpenAI-compatible API "
        "(judge.api, as teacher.api); unset: the teacher judges its own samples",
    )
    judge_max_new_tokens: int = Field(
        64, ge=1, description="judge: room for its verdict, which must contain 'Rating: [[n]]' (1 to 10)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> PreferencesConfig:
        if self.method is not None and self.path is not None:
            raise ValueError("set preferences.method (build pairs) or preferences.path (read them), not both")
        if self.judge is not None and self.method != "judge":
            raise ValueError(f"preferences.judge is set but preferences.method is {self.method}, not judge")
        return self


# trl.DPOConfig.loss_type's values (TRL 1.x)
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]  # fmt: skip


class DPOSettings(Strict):
    """trl.DPOTrainer's own settings; everything else (optimizer, precision, token budget, checkpoints)
    comes from train.*, as for kd and sft."""

    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference (KL weight)")
    loss_type: DPOLoss | list[DPOLoss] = Field(
        "sigmoid",
        description="TRL's DPO loss (sigmoid: the DPO paper's), or several summed with loss_weights, e.g. "
        "[sigmoid, sft]: RPO (DPO plus the chosen answers' NLL), which keeps the chosen answers likely",
    )
    loss_weights: list[float] | None = Field(
        None, description="one weight per loss_type entry; unset: 1 each"
    )
    precompute_ref_log_probs: bool = Field(
        False,
        description="one reference pass over the pairs before training (inside the stage's energy window, "
        "its tokens counted) instead of a reference forward every step",
    )
    heldout_pairs: int = Field(
        0,
        ge=0,
        description="pairs held out of training (a seeded draw): after training the policy's reward "
        "accuracy and margins on them are logged as heldout/rewards/*",
    )

    @model_validator(mode="after")
    def _one_weight_per_loss(self) -> DPOSettings:
        losses = self.losses()
        if self.loss_weights is not None and len(self.loss_weights) != len(losses):
            raise ValueError(
                f"dpo.loss_weights: {len(self.loss_weights)} weights for {len(losses)} loss types"
            )
        return self

    def losses(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)


class AblationsConfig(Strict):
    """A grid of settings run as one parent per point (`dist-bench sft --ablations`); stages whose inputs
    match across points are reused."""

    name: str = Field(
        min_length=1, description="the sweep's name: tag dist_bench.sweep on every point's parent"
    )
    grid: dict[str, list[Any]] = Field(
        min_length=1,
        description="dotted config key -> the values it takes; the points are every combination, in the "
        "order written (e.g. generation.temperature: [0, 0.7, 1.0] and generation.n: [1, 4] make 6)",
    )

    @field_validator("grid")
    @classmethod
    def _values_given(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"'{key}': no values")
            if key.split(".")[0] in ("ablations", "name", "pipeline"):
                raise ValueError(f"'{key}': not a setting a sweep can vary")
        return grid


class EvalConfig(Strict):
    """Stage eval: lm-eval tasks (the project's YAMLs in task_dir, lm-eval's own built-in tasks by name, the
    OLMES group) and the judge benchmarks alpaca_eval and mt_bench_101, each task in its own energy window."""

    tasks: list[str] = Field(
        min_length=1,
        description="task names: a YAML in task_dir (tiny_arith, olmes, ...), an lm-eval built-in task or group "
        "(gsm8k, mmlu, ifeval, arc_challenge, ...), or a judge benchmark (alpaca_eval, mt_bench_101); "
        "`dist-bench eval --tasks list` shows them with their data",
    )
    task_dir: str = Field(
        "configs/tasks", description="folder of lm-eval task YAMLs, relative to the project"
    )
    data: dict[str, str | dict[str, str]] = Field(
        default_factory=dict,
        description="task or group name -> local data replacing its Hub dataset: a file (the evaluation "
        "split; few-shot examples drawn from it, never the document itself), a {split: file} mapping, or a "
        "folder (a downloaded Hub snapshot: files named by split, test-00000-of-00001.parquet, in a "
        "subfolder named by the task's subset if there is one). Prompts, filters and metrics stay lm-eval's. "
        "alpaca_eval and mt_bench_101 read theirs only from here",
    )
    limit: int | None = Field(None, ge=1, description="evaluate only the first N documents per task")
    num_fewshot: int | None = Field(None, ge=0, description="override every task's few-shot count")
    batch_size: int = Field(
        32, ge=1, description="lm-eval batch size; prompts per batch for judge benchmarks"
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where the evaluated model runs; auto = cuda when available"
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="lm-eval's maximum sequence length (context + generation); unset: the model's own",
    )
    judge: TeacherSpec | None = Field(
        None,
        description="alpaca_eval and mt_bench_101: the judge, a local model or an OpenAI-compatible API "
        "(judge.api, as teacher.api). Scores from a judge other than the original GPT-4 are not comparable "
        "to public leaderboards",
    )
    max_new_tokens: int = Field(
        1024, ge=1, description="judge benchmarks: the evaluated model's longest answer (greedy decoding)"
    )
    judge_max_new_tokens: int = Field(512, ge=1, description="judge benchmarks: room for the judge's verdict")


class EnergyConfig(Strict):
    enabled: bool = Field(True, description="measure each stage's energy (false: time and tokens only)")
    codecarbon: bool = Field(
        True, description="CPU/RAM estimate (when RAPL is unreadable) and CO2e from CodeCarbon's offline data"
    )
    country_iso_code: str = Field(
        "USA", min_length=3, max_length=3, description="grid for CO2e (ISO 3166 alpha-3)"
    )
    sample_interval_ms: int = Field(
        100,
        ge=5,
        le=60_000,
        description="GPU power/memory/utilisation sampling period (timeline, peaks, cross-check)",
    )
    warmup_s: float = Field(
        0.0,
        ge=0,
        description="seconds at the start of each stage reported separately from the post-warmup figures",
    )
    idle_power_w: float | None = Field(
        None,
        ge=0,
        description="idle draw per GPU for net energy; unset: the prerun baseline or idle_measure_s",
    )
    idle_measure_s: float = Field(
        0.0,
        ge=0,
        description="measure GPU idle power this long before the first stage (when idle_power_w is unset)",
    )
    gpu_devices: list[int] | None = Field(
        None,
        description="NVML indices (nvidia-smi's numbering) of the GPUs to measure; unset: the GPUs this "
        "process uses. Name a local server's GPUs (a vLLM teacher behind teacher.api on this node) and "
        "teacher_generation measures them; otherwise an API teacher's GPU energy is unavailable",
    )
    results_csv: str | None = Field(
        "energy_results.csv",
        description="a row per stage appended here (relative to output.run_dir); null: off",
    )


class PrerunConfig(Strict):
    enabled: bool = Field(False, description="run pre-run validation as the pipeline's first stage")
    required: bool = Field(False, description="stop the pipeline (parent FAILED) when a critical check fails")
    quick: bool = Field(True, description="reduced durations (seconds instead of minutes)")
    idle_duration_minutes: float = Field(5.0, gt=0, description="idle baseline length when not quick")
    burn_in_steps: int = Field(500, ge=1, description="burn-in training steps when not quick")
    expected_gpu: str | None = Field(None, description="substring the GPU name must contain, e.g. H100")
    expected_vram_gb: float | None = Field(None, gt=0, description="minimum VRAM per GPU")
    expected_gpu_count: int | None = Field(None, ge=0, description="GPUs the host must show; unset: any")
    expected_cpu: str | None = Field(None, description="substring the CPU model must contain")
    skip_idle: bool = Field(False, description="skip the idle-power baseline")
    skip_burn_in: bool = Field(False, description="skip the burn-in training run")
    skip_sampling: bool = Field(False, description="skip the check of energy sampling intervals")


class TrackingConfig(Strict):
    experiment_name: str = Field("dist-bench", description="MLflow experiment the parent runs go to")
    reuse_stages: bool = Field(True, description="reuse a FINISHED stage run with identical inputs")
    log_checkpoints: Literal["none", "last", "all"] = Field(
        "last",
        description="training checkpoints logged as stage-run artifacts: none, the newest, or all; the last step's checkpoint holds the weights final_model holds, so only its trainer state and arguments are logged",
    )
    log_logit_cache: bool = Field(
        False,
        description="also upload the logit cache's shards as logit_caching artifacts (its manifest always is): "
        "tens of GB for a real corpus, which the next stages read from output.run_dir, not from MLflow",
    )


class OutputConfig(Strict):
    run_dir: str = Field("runs", description="working files of every stage (caches, checkpoints, models)")


class RunConfig(Strict):
    name: str = Field(description="short name of the experiment; the parent run's name")
    pipeline: Literal["kd", "sft", "dpo"] = Field(
        "kd",
        description="kd: from cached teacher logits; sft: on the data; dpo: on preference pairs",
    )
    seed: int = Field(42, description="seeds data order, initialisation, sampling and the trainer")
    teacher: TeacherSpec = Field(description="the model distilled from: local weights or an API")
    student: ModelSpec = Field(
        description="the model trained (dpo: the policy, e.g. an sft run's final_model)"
    )
    data: DataConfig = Field(description="training data: prompt/completion or chat records")
    logits: LogitCacheConfig = Field(LogitCacheConfig(), description="kd: the teacher's top-k logit cache")
    train: TrainConfig = Field(description="the student trainer (TRL), shared by kd, sft and dpo")
    kd: KDConfig = Field(KDConfig(), description="kd: loss, temperature and CE weight")
    generation: GenerationConfig = Field(
        GenerationConfig(), description="teacher_generation: the teacher writes the training data"
    )
    preferences: PreferencesConfig = Field(
        PreferencesConfig(), description="dpo: how preference pairs are made"
    )
    dpo: DPOSettings = Field(
        DPOSettings(), description="dpo: trl.DPOTrainer's beta, loss and reference log-probs"
    )
    ablations: AblationsConfig | None = Field(
        None, description="a grid of overrides run as sibling pipelines"
    )
    eval: EvalConfig = Field(description="the benchmarks run on the trained model")
    energy: EnergyConfig = Field(EnergyConfig(), description="energy measurement and CO2e")
    prerun: PrerunConfig = Field(PrerunConfig(), description="pre-run validation of the host")
    tracking: TrackingConfig = Field(
        TrackingConfig(), description="MLflow experiment, stage reuse, artifacts"
    )
    output: OutputConfig = Field(OutputConfig(), description="where working files go")
    # dotted key -> "file:line" or "override 'k=v'" it came from (load_config), for pre-flight's messages
    _origin: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_is_a_word(cls, value: str) -> str:
        if not value or any(c.isspace() or c == "/" for c in value):
            raise ValueError("must be non-empty without spaces or '/'")
        return value

    @model_validator(mode="after")
    def _cuda_precision(self) -> RunConfig:
        if self.train.precision == "bf16" and self.train.device == "cpu":
            raise ValueError("train.precision=bf16 (autocast) needs train.device cuda or auto")
        return self

    def flat(self) -> dict[str, str]:
        """Dotted key -> string value, the form MLflow params take."""
        return flatten(self.model_dump(mode="json"))

    def hash(self) -> str:
        return config_hash(self.model_dump(mode="json"))

    def line_of(self, key: str) -> str | None:
        """The config file and line ("configs/x.yaml:16") that set the dotted `key`; None for a default or
        a command-line override (the user's own argument names it)."""
        where = self._origin.get(key)
        return where if where is not None and not where.startswith("override ") else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def config_hash(tree: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def load_config(experiment: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """base.yaml, then the experiment file, then `a.b=value` overrides; validated as a whole."""
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}  # dotted path -> where its value came from, for error messages
    for path in [BASE_CONFIG, Path(experiment) if experiment else DEFAULT_EXPERIMENT]:
        data, lines = _read_yaml(path)
        _merge(merged, data, origin, str(_display(path)), lines)
    for item in overrides or []:
        key, value = _parse_override(item)
        _merge(merged, _nest(key, value), origin, f"override '{item}'")
    try:
        cfg = RunConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_one_line(err, origin)) from None
    cfg._origin = origin
    return cfg


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's mapping, and the line of each of its keys (dotted path -> 1-based line)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(
            f"{_display(path)}{where}: not valid YAML ({getattr(err, 'problem', err)})"
        ) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_display(path)}: top level must be a mapping, got {type(data).__name__}")
    return data, lines


def _key_lines(node: yaml.Node | None, prefix: str = "") -> dict[str, int]:
    # PyYAML's composed node tree keeps each key's position (safe_load's plain dicts do not).
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path + "."))
    return lines


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}': expected dotted.key=value")
    try:
        return key, yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return key, raw


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(dotted.split(".")):
        tree = {part: tree}
    return tree


def _merge(
    into: dict[str, Any],
    update: dict[str, Any],
    origin: dict[str, str],
    source: str,
    lines: dict[str, int] | None = None,
    prefix: str = "",
) -> None:
    """`origin` records where each value came from: the source, and for a file the key's line."""
    lines = lines or {}
    for key, value in update.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value, origin, source, lines, path + ".")
            continue
        into[key] = copy.deepcopy(value)
        for replaced in [p for p in origin if p.startswith(path + ".")]:
            del origin[replaced]
        for given in [path, *(p for p in lines if p.startswith(path + "."))]:
            origin[given] = f"{source}:{lines[given]}" if given in lines else source


def _one_line(err: ValidationError, origin: dict[str, str]) -> str:
    # A typo'd key usually also explains a "missing" one: report unknown keys first, missing ones last.
    rank = {"extra_forbidden": 0, "missing": 2}
    first = sorted(err.errors(), key=lambda e: rank.get(e["type"], 1))[0]
    path = ".".join(str(part) for part in first["loc"]) or "<config>"
    source = _source_of(path, origin)
    reason = first["msg"]
    if first["type"] == "extra_forbidden":
        reason = "unknown key"
    elif first["type"] == "missing":
        reason = "required key is missing"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    where = f" (from {source})" if source else ""
    return f"config: {path}{where}: {reason}{more}"


def _source_of(path: str, origin: dict[str, str]) -> str | None:
    while path:
        if path in origin:
            return origin[path]
        path = path.rpartition(".")[0]
    return None


def _display(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path
