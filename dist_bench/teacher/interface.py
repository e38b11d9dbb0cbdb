"""What a teacher that writes completions is: the one interface of the local (transformers) teacher and the
teacher behind an API.

    teacher.generate(prompts, decoding, seed) -> one list of `decoding.n` Completions per prompt

Kept free of torch and transformers so an API teacher needs neither.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dist_bench.config import GenerationConfig


@dataclass(frozen=True)
class Decoding:
    """The decoding settings every completion row records."""

    n: int
    temperature: float  # 0: greedy
    top_p: float
    top_k: int | None
    max_new_tokens: int
    stop: tuple[str, ...]

    @classmethod
    def from_config(cls, cfg: GenerationConfig) -> Decoding:
        return cls(cfg.n, cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, tuple(cfg.stop))

    @classmethod
    def greedy_up_to(cls, max_new_tokens: int) -> Decoding:
        """One greedy completion: what judges and judged answers use, so a rerun gets the same text."""
        return cls(n=1, temperature=0.0, top_p=1.0, top_k=None, max_new_tokens=max_new_tokens, stop=())

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


@dataclass(frozen=True)
class Prompt:
    """One prompt: a text (format prompt_completion) or a conversation ending before an assistant turn."""

    id: int  # index in the prompt set: rows, shards and filters refer to it
    text: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    reference: str | None = None  # the source's own answer, for answer verification

    @classmethod
    def from_record(cls, index: int, record: Any, messages: bool) -> Prompt:
        """A data record (dataset.Record) as a prompt: a prompt/completion record's prompt, its completion
        the reference; or a conversation up to its last assistant turn, that turn the reference."""
        if not messages:
            return cls(index, text=record.prompt, reference=record.completion)
        conversation = list(record.messages)
        reference = (
            conversation.pop()["content"]
            if conversation and conversation[-1]["role"] == "assistant"
            else None
        )
        return cls(index, messages=conversation, reference=reference)


@dataclass(frozen=True)
class Completion:
    text: str  # without the EOS token and without a stop string that ended it
    finish_reason: str  # "stop": EOS or a stop string; "length": max_new_tokens reached; "error": none came
    prompt_tokens: int  # tokens of the prompt as the teacher saw it (chat template applied)
    completion_tokens: int  # tokens the teacher generated for it (EOS included when generated)
    error: str | None = None  # finish_reason "error": why no completion came (an API teacher's last failure)


class Teacher(Protocol):
    def identity(self) -> dict[str, str]:
        """What every row records about who wrote it: model, revision or fingerprint, backend."""
        ...

    def generate(self, prompts: list[Prompt], decoding: Decoding, seed: int) -> list[list[Completion]]:
        """decoding.n completions for each prompt, in prompt order. Deterministic for a given seed where
        the backend allows (greedy always; sampling on CPU)."""
        ...
