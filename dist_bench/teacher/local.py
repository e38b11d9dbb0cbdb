"""The local teacher: a transformers model writing completions, batched.

    teacher = LocalTeacher.load(cfg, device)
    rows = teacher.generate(prompts, Decoding.from_config(cfg.generation), seed)

Prompts are batched by length (longest first, so a batch that does not fit fails at once, and each batch
pads little), left-padded, and decoded by one of two backends (generation.backend):
- `generate`: `model.generate`, whose sampling is transformers' own;
- `graph`: static_decode.py, a static-cache decode loop whose step is replayed as a CUDA graph (on CPU
  it runs eagerly): the same forward, warpers and sampling as `generate`, 12x its tokens per joule on an
  H200. `auto` picks it on CUDA.
Either way the decoding is exactly the config's: the teacher's own generation_config.json defaults
(repetition penalty, min_p, ...) are not applied behind the config's back. Per batch the seed is reset
from (seed, the batch's first prompt id), so a prompt's completions do not depend on which shard or
resumed attempt generated it, only on how the prompt set is cut into batches, which is fixed by the
config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import transformers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from dist_bench import models
from dist_bench.config import ModelSpec, RunConfig
from dist_bench.dataset import chat_template
from dist_bench.teacher.interface import Completion, Decoding, Prompt
from dist_bench.teacher.static_decode import StaticDecoder


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, chat_template: str | None) -> list[int]:
    """The prompt's tokens as the teacher sees them: a text as it is, a conversation through the chat
    template with the assistant's turn opened (add_generation_prompt). Pre-flight measures prompts so too."""
    if prompt.text is not None:
        return tokenizer(prompt.text, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(
        prompt.messages, chat_template=chat_template, add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


BACKENDS = {"generate": "transformers.generate", "graph": "transformers.static-cache-graph"}

# Set so that `generate` does not fill them from the teacher's generation_config.json: the rows record
# the config's decoding, and the graph backend applies exactly that.
NEUTRAL: dict[str, Any] = {
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
}  # fmt: skip


def resolve_backend(
    backend: str, device: torch.device, model_class: type | None
) -> Literal["generate", "graph"]:
    """generation.backend -> the decode path: `auto` is the graph loop on CUDA (12x plain generate's
    tokens per joule on an H200, docs/benchmarks.md) for a teacher that can run it, `generate` elsewhere
    (on CPU there is no launch overhead to save). Pre-flight refuses an explicit `graph` it cannot run."""
    if backend == "auto":
        return "graph" if device.type == "cuda" and supports_graph(model_class) else "generate"
    return "graph" if backend == "graph" else "generate"


def supports_graph(model_class: type | None) -> bool:
    """Whether a decode step of this architecture can be captured: transformers marks the models whose
    forward over a static cache has no host syncs or graph breaks (`_can_compile_fullgraph`, what its own
    static-cache compile relies on)."""
    return bool(getattr(model_class, "_can_compile_fullgraph", False))


class LocalTeacher:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int,
        chat_template: str | None = None,
        identity: dict[str, str] | None = None,
        backend: Literal["generate", "graph"] = "generate",
    ) -> None:
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.chat_template = chat_template
        self.backend = backend
        self._identity = {"model": str(model.name_or_path), **(identity or {}), "backend": BACKENDS[backend]}
        eos = model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = {e for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
        self._decoder = (
            StaticDecoder(model, tokenizer.pad_token_id, self.eos_ids) if backend == "graph" else None
        )

    @classmethod
    def load(
        cls, cfg: RunConfig, device: torch.device, spec: ModelSpec | None = None, own_template: bool = False
    ) -> LocalTeacher:
        """cfg.teacher, or another writer (`spec`: the policy init, a judge) with the same generation
        settings, rendering conversations with data.chat_template or the model's own template
        (`own_template`: always its own, for prompts that are not the data's, such as a judge's)."""
        spec = cfg.teacher if spec is None else spec
        model = models.load_model(spec.model, device, spec.dtype, spec.revision, spec.trust_remote_code)
        tokenizer = models.load_tokenizer(spec.model, spec.revision, spec.trust_remote_code)
        # None: apply_chat_template takes the tokenizer's own
        data_template = cfg.data.format == "messages" and not own_template
        template = chat_template(cfg.data, tokenizer) if data_template else None
        identity = {
            "model": spec.model,
            "revision": spec.revision or "",
            "fingerprint": models.fingerprint(spec.model, spec.revision),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
        backend = resolve_backend(cfg.generation.backend, device, type(model))
        return cls(model, tokenizer, cfg.generation.batch_size, template, identity, backend)

    def identity(self) -> dict[str, str]:
        return dict(self._identity)

    def encode(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template)

    def generate(self, prompts: list[Prompt], decoding: Decoding, seed: int) -> list[list[Completion]]:
        return self.generate_tokens(
            [self.encode(p) for p in prompts], [p.id for p in prompts], decoding, seed
        )

    def generate_tokens(
        self, encoded: list[list[int]], ids: list[int], decoding: Decoding, seed: int
    ) -> list[list[Completion]]:
        """`generate` on prompts already tokenized (`ids`: their prompt ids, which fix the batch seeds)."""
        order = sorted(range(len(encoded)), key=lambda i: (-len(encoded[i]), i))
        out: list[list[Completion]] = [[] for _ in encoded]
        # the graph backend's batches share one cache length (and so one captured step): the longest prompt's
        cache_len = max((len(ids) for ids in encoded), default=0) + decoding.max_new_tokens
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            transformers.set_seed(seed * 1_000_003 + ids[batch[0]])  # torch, CUDA, numpy, random
            for index, completions in zip(
                batch, self._generate([encoded[i] for i in batch], decoding, cache_len), strict=True
            ):
                out[index] = completions
        return out

    @torch.no_grad()
    def _generate(self, batch: list[list[int]], decoding: Decoding, cache_len: int) -> list[list[Completion]]:
        if self._decoder is not None:
            sequences = self._decoder.decode(batch, decoding, cache_len).tolist()
        else:
            width = max(len(ids) for ids in batch)
            pad = self.tokenizer.pad_token_id
            device = next(self.model.parameters()).device
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
            attention_mask = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device
            )
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._generation_config(decoding),
                tokenizer=self.tokenizer if decoding.stop else None,  # stop strings are matched on tokens
            )[:, width:].tolist()
        results = []
        for row, ids in enumerate(batch):
            samples = sequences[row * decoding.n : (row + 1) * decoding.n]
            results.append([self._completion(new, len(ids), decoding) for new in samples])
        return results

    def _generation_config(self, decoding: Decoding) -> GenerationConfig:
        sampling = {} if decoding.greedy else {
            "temperature": decoding.temperature, "top_p": decoding.top_p, "top_k": decoding.top_k or 0,
            "min_p": 0.0,  # keeps every token; set so the teacher's default cannot apply
        }  # fmt: skip
        return GenerationConfig(
            **NEUTRAL,
            do_sample=not decoding.greedy,
            num_return_sequences=decoding.n,
            max_new_tokens=decoding.max_new_tokens,
            stop_strings=list(decoding.stop) or None,
            eos_token_id=sorted(self.eos_ids) or None,
            pad_token_id=self.tokenizer.pad_token_id,
            **sampling,
        )

    def _completion(self, new: list[int], prompt_tokens: int, decoding: Decoding) -> Completion:
        """One generated row (padded after it ended) -> text, why it ended, and the tokens it cost."""
        end = next((i for i, token in enumerate(new) if token in self.eos_ids), None)
        if end is not None:
            body, generated = new[:end], end + 1  # the EOS is generated work too
        else:  # ended by a stop string (then padded while the batch went on) or by max_new_tokens
            body = list(new)
            pad = self.tokenizer.pad_token_id
            while body and body[-1] == pad:
                body.pop()
            generated = len(body)
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        hits = [at for at in (text.find(s) for s in decoding.stop) if at >= 0]
        if hits:  # the completion ends before its first stop string
            text = text[: min(hits)]
            generated = self._tokens_through_stop(body, decoding.stop)
        reason = "stop" if end is not None or hits else "length"
        return Completion(text, reason, prompt_tokens, generated)

    def _tokens_through_stop(self, body: list[int], stop: tuple[str, ...]) -> int:
        """How many tokens it took to write the first stop string: the fewest whose text contains one.
        `generate` ends the row there; the graph loop runs on (its later tokens are dropped, not counted).
        Containment only grows with the prefix, so a binary search finds it."""
        low, high = 1, len(body)
        while low < high:
            middle = (low + high) // 2
            text = self.tokenizer.decode(body[:middle], skip_special_tokens=True)
            if any(s in text for s in stop):
                high = middle
            else:
                low = middle + 1
        return low
