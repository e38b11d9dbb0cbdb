"""Training data: records -> token ids with the supervised positions marked.

Teacher logit caching and student training read the same records through the same function, so the
positions the teacher's log-probs were cached for are exactly the positions the student is trained on.
Records come through `dist_bench.data.sources.open_source`, so `data.train` is anything it reads: a
JSON-lines file, a Parquet/Arrow/JSON file or folder, a `save_to_disk` folder, a Hub dataset id (with
`data.split`, `data.subset`), or `tinyworld:<split>`. Two formats (`data.format`):

- `prompt_completion`: prompt and completion are tokenized separately and concatenated (the way lm-eval
  splits context and continuation), then EOS is appended so the model learns where an answer ends. The
  completion and EOS are supervised.
- `messages`: a conversation, `[{"role", "content"}, ...]`, rendered with a chat template (the tokenizer's
  own, or `data.chat_template` for base models that have none) and tokenized as one text. Every token of an
  assistant message's rendered content is supervised, with the end-of-turn marker the template puts after
  it (the model must learn to stop); system, user and tool turns and the role headers are not. Templates with
  `{% generation %}` markers are masked by transformers (`return_assistant_tokens_mask`); others by rendering
  each prefix of the conversation and taking token-length differences, which is only sound when every
  prefix tokenizes to a prefix of the whole: a template that is not is refused, naming the row.

`data.supervise: all` supervises every token from position 1 in both formats. Every error is one
`DataError` line naming the file and line (JSON-lines) or row, and the field.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError, TemplateSyntaxError
from transformers import PreTrainedTokenizerBase

from dist_bench import models, tinyworld
from dist_bench.config import PROJECT_ROOT, DataConfig
from dist_bench.data.sources import Source, data_files, open_source
from dist_bench.errors import DataError  # re-exported: `from dist_bench.dataset import DataError` works

IGNORE = -100  # label of a position without a loss (HF convention)
ROLES = ("system", "user", "assistant", "tool")
TEMPLATE_SUFFIXES = (".jinja", ".jinja2", ".j2")
READ_BATCH = 1024  # rows fetched from Arrow at a time: one Python conversion per batch, not per row
# TRL's `has_generation_markers` regex (trl/chat_template_utils.py), inlined: importing trl costs ~3 s.
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class Example:
    """One tokenized sequence and, per token, whether it gets a loss (several spans in a multi-turn chat)."""

    input_ids: list[int]
    supervised: list[bool]  # supervised[p]: token p is a target, predicted from the output at p - 1

    def __post_init__(self) -> None:
        if len(self.supervised) != len(self.input_ids):
            raise ValueError(
                f"Example: {len(self.supervised)} supervised flags for {len(self.input_ids)} tokens"
            )
        if self.supervised and self.supervised[0]:
            raise ValueError("Example: token 0 cannot be supervised (no token before it predicts it)")

    @classmethod
    def from_first_target(cls, input_ids: list[int], first_target: int) -> Example:
        """Every token from `first_target` on supervised (a prompt/completion pair; supervise=all is 1)."""
        first = max(first_target, 1)
        return cls(input_ids, [False] * min(first, len(input_ids)) + [True] * (len(input_ids) - first))

    @property
    def labels(self) -> list[int]:
        """The token ids, IGNORE where a token gets no loss (as HF's and TRL's trainers take labels)."""
        return [t if s else IGNORE for t, s in zip(self.input_ids, self.supervised, strict=True)]

    @property
    def supervised_tokens(self) -> int:
        """Tokens that get a loss (each predicted from the token before it)."""
        return sum(self.supervised)


@dataclass(frozen=True)
class Record:
    """One training record as read from the source, before tokenization."""

    where: str  # `file:line: row i` (JSON-lines) or `source: row i`: what an error about it names
    prompt: str = ""  # format prompt_completion
    completion: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)  # format messages: role/content and more


# ---- reading ------------------------------------------------------------------------------------------


def open_data(cfg: DataConfig) -> Source:
    """data.train (tinyworld:<split> resolved to its JSON-lines file) opened through data/sources.py."""
    return open_source(_train(cfg), split=cfg.split, subset=cfg.subset)


def _train(cfg: DataConfig) -> str:
    try:
        return tinyworld.resolve(cfg.train)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None


def data_fingerprint(cfg: DataConfig) -> str:
    """Identity of the data for stage reuse. Local files and folders: sha256 of the data files' bytes, in
    row order (a single JSON-lines file hashes as before: its bytes). A Hub id or snapshot read with its
    card: datasets' own fingerprint of what it loaded, with id, subset and split. A data.chat_template file
    is part of what the stages train on, so its hash is appended (a model's template is covered by that
    model's fingerprint, or by the data.chat_template param that names it)."""
    train = _train(cfg)
    files = data_files(train, split=cfg.split, subset=cfg.subset)
    if files is None:
        rows = open_source(train, split=cfg.split, subset=cfg.subset).rows
        identity = f"hub:{train}:{cfg.subset or 'default'}:{cfg.split}@{rows._fingerprint}"
    else:
        digest = hashlib.sha256()
        for path in files:
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        identity = "sha256:" + digest.hexdigest()
    template = _template_file(cfg.chat_template) if cfg.format == "messages" and cfg.chat_template else None
    if template is not None:
        identity += "+chat_template:sha256:" + hashlib.sha256(_read_template(template).encode()).hexdigest()
    return identity


def read_records(cfg: DataConfig) -> Iterator[Record]:
    """Every record that will be used (the first data.max_samples), checked field by field.

    The pre-flight scan and load_examples both read through here, so data that passes the scan loads.
    """
    source = open_data(cfg)
    rows = source.rows
    count = len(rows) if cfg.max_samples is None else min(len(rows), cfg.max_samples)
    if count == 0:
        raise DataError(f"{source.name}: no records")
    fields = [cfg.messages_field] if cfg.format == "messages" else [cfg.prompt_field, cfg.completion_field]
    for name in fields:
        if name not in rows.column_names:
            raise DataError(
                f"{source.where(0)}: field '{name}' missing (the data has {', '.join(rows.column_names)})"
            )
    rows = rows.select_columns(fields)  # only these columns leave Arrow
    for start in range(0, count, READ_BATCH):
        batch = rows[start : min(start + READ_BATCH, count)]
        for offset in range(len(batch[fields[0]])):
            where = source.where(start + offset)
            if cfg.format == "messages":
                yield Record(
                    where, messages=_conversation(where, cfg.messages_field, batch[fields[0]][offset])
                )
            else:
                prompt, completion = (_text(where, name, batch[name][offset]) for name in fields)
                yield Record(where, prompt=prompt, completion=completion)


def _text(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' missing or not a string")
    return value


def _conversation(where: str, name: str, value: object) -> list[dict[str, Any]]:
    """A list of {role, content} messages with at least one assistant turn; keys holding null are dropped
    (Arrow fills keys other rows have with null; templates test for a key's presence, not for null)."""
    if not isinstance(value, list):
        raise DataError(f"{where}: field '{name}' missing or not a list of messages")
    messages = []
    for at, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"{where}: field '{name}[{at}]' is not an object with role and content")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise DataError(f"{where}: field '{name}[{at}].{key}' missing or not a string")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: field '{name}[{at}].role': '{message['role']}' is not one of {', '.join(ROLES)}"
            )
        messages.append({key: item for key, item in message.items() if item is not None})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(f"{where}: field '{name}': no assistant turn, so nothing to learn")
    return messages


# ---- chat templates -----------------------------------------------------------------------------------


def chat_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Jinja text conversations are rendered with: data.chat_template's, else the tokenizer's own.

    data.chat_template is a Jinja file (absolute, or relative to the project root) or a model id/folder whose
    tokenizer's template is taken. Errors are one line starting `data.chat_template:`.
    """
    spec = cfg.chat_template
    if spec is None:
        if not tokenizer.chat_template:
            raise DataError(
                f"data.chat_template: the tokenizer of {tokenizer.name_or_path or 'the student'} has no chat "
                "template (a base model); set data.chat_template to a Jinja file or a model that has one"
            )
        return _default_variant(tokenizer.chat_template)
    path = _template_file(spec)
    if path is not None:
        return _read_template(path)
    folder = Path(spec).expanduser()
    folder = folder if folder.is_absolute() else PROJECT_ROOT / folder
    try:
        other = models.load_tokenizer(str(folder) if folder.is_dir() else spec)
    except (OSError, ValueError) as err:  # what from_pretrained raises for a missing or unreadable model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"data.chat_template: '{spec}' is neither a Jinja file nor a model whose tokenizer loads "
            f"({first})"
        ) from None
    if not other.chat_template:
        raise DataError(f"data.chat_template: the tokenizer of {spec} has no chat template")
    return _default_variant(other.chat_template)


def _template_file(spec: str) -> Path | None:
    """data.chat_template as a file path when it names one (or ends like a template); None for a model."""
    path = Path(spec).expanduser()
    path = path if path.is_absolute() else PROJECT_ROOT / path
    return path if path.is_file() or path.suffix.lower() in TEMPLATE_SUFFIXES else None


def _read_template(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"data.chat_template: {path}: not found (no such file)") from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else "not valid UTF-8"
        raise DataError(f"data.chat_template: {path}: cannot be read ({why})") from None
    if not text.strip():
        raise DataError(f"data.chat_template: {path}: empty file")
    return text


def _default_variant(template: str | dict[str, str]) -> str:
    # A tokenizer may ship named variants (default, tool_use, rag): conversations use the default one.
    return template["default"] if isinstance(template, dict) else template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks assistant content with `{% generation %}` (HF's assistant mask)."""
    return _GENERATION_MARKER.search(template) is not None


# ---- tokenizing ---------------------------------------------------------------------------------------


def load_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    template = chat_template(cfg, tokenizer) if cfg.format == "messages" else None
    return list(encode_all(read_records(cfg), tokenizer, cfg, template))


def encode_all(
    records: Iterable[Record],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str | None = None,
) -> Iterator[Example]:
    """`encode` over records, the first one with nothing to learn raising DataError. Prompt/completion pairs are
    tokenized READ_BATCH at a time: a fast tokenizer's batch call gives each text the ids a call of its own
    gives, about 4x sooner (pre-flight encodes every record this way, then the stage again)."""
    if cfg.format == "messages":
        yield from (encode(record, tokenizer, cfg, template) for record in records)
        return
    remaining = iter(records)
    while batch := list(itertools.islice(remaining, READ_BATCH)):
        prompts = tokenizer([r.prompt for r in batch], add_special_tokens=True)["input_ids"]
        completions = tokenizer([r.completion for r in batch], add_special_tokens=False)["input_ids"]
        for record, prompt_ids, completion_ids in zip(batch, prompts, completions, strict=True):
            yield _pair_example(record, prompt_ids, completion_ids, tokenizer.eos_token_id, cfg)


def encode(
    record: Record, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, template: str | None = None
) -> Example:
    """The record's tokens and supervised mask, truncated to data.max_length. `template`: the chat template
    (messages format; resolved from cfg and the tokenizer when not given). Raises DataError when nothing
    supervised is left."""
    if cfg.format == "messages":
        template = template if template is not None else chat_template(cfg, tokenizer)
        example = tokenize_messages(record.messages, tokenizer, cfg, template, record.where)
        if example is None:
            raise DataError(
                f"{record.where}: the assistant turns all fall beyond data.max_length={cfg.max_length}; "
                "nothing to learn"
            )
        return example
    prompt_ids = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(record.completion, add_special_tokens=False)["input_ids"]
    return _pair_example(record, prompt_ids, completion_ids, tokenizer.eos_token_id, cfg)


def _pair_example(
    record: Record, prompt_ids: list[int], completion_ids: list[int], eos: int, cfg: DataConfig
) -> Example:
    """A prompt/completion pair's tokens, EOS after the completion, cut at data.max_length."""
    input_ids = (prompt_ids + completion_ids + [eos])[: cfg.max_length]
    # Position 0 has no previous token to predict it from, so targets start at 1 at the earliest.
    first_target = 1 if cfg.supervise == "all" else max(len(prompt_ids), 1)
    if first_target >= len(input_ids):
        raise DataError(f"{record.where}: prompt fills data.max_length={cfg.max_length}; nothing to learn")
    return Example.from_first_target(input_ids, first_target)


def tokenize_messages(
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig,
    template: str,
    where: str,
) -> Example | None:
    """A conversation rendered with `template`; None when max_length cuts every assistant token."""
    if cfg.supervise == "all":
        text = _render(tokenizer, messages, template, where)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        supervised = [True] * len(input_ids)
    elif has_generation_markers(template):
        out = _render(tokenizer, messages, template, where, tokenize=True, return_assistant_tokens_mask=True)
        input_ids, supervised = list(out["input_ids"]), [bool(flag) for flag in out["assistant_masks"]]
        if not any(supervised):
            raise DataError(
                f"data.chat_template: {where}: the template's {{% generation %}} markers cover none of this "
                "conversation's assistant tokens"
            )
    else:
        input_ids, supervised = _mask_by_prefixes(messages, tokenizer, template, where)
    input_ids, supervised = input_ids[: cfg.max_length], supervised[: cfg.max_length]
    if supervised:
        supervised[0] = False  # nothing predicts the first token (a conversation opening with the assistant)
    if not any(supervised):
        return None
    return Example(input_ids, supervised)


def _mask_by_prefixes(
    messages: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, template: str, where: str
) -> tuple[list[int], list[bool]]:
    """Assistant tokens of a template without generation markers, from the token lengths of prefixes.

    Message i spans the tokens between the conversation up to i - 1 and the conversation up to i; for an
    assistant message, the role header at its start is the template's generation prompt after the messages
    before it (rendered with add_generation_prompt, as TRL finds where a completion starts: the common prefix
    of the two renderings). The rest, including the end-of-turn marker, is supervised. A template that ignores
    add_generation_prompt leaves the header supervised; one that renders earlier turns differently once later
    ones follow (or whose tokens merge across a turn boundary) is not prefix-stable, and refused.
    """
    texts = [_render(tokenizer, messages[: i + 1], template, where) for i in range(len(messages))]
    # An opening assistant message has no messages before it to render a generation prompt after.
    heads = [i for i, message in enumerate(messages) if message["role"] == "assistant" and i > 0]
    texts += [_render(tokenizer, messages[:i], template, where, add_generation_prompt=True) for i in heads]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    prefixes, head_ids = encoded[: len(messages)], dict(zip(heads, encoded[len(messages) :], strict=True))
    full = prefixes[-1]
    for i, prefix in enumerate(prefixes):
        if full[: len(prefix)] != prefix:
            raise DataError(
                f"data.chat_template: {where}: the template is not prefix-stable: the conversation up to "
                f"message {i} ({messages[i]['role']}) does not tokenize to a prefix of the whole "
                "conversation, so its turns cannot be told apart; use a template with {% generation %} "
                "markers (TRL ships training templates in trl/chat_templates/)"
            )
    supervised = [False] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(prefixes[i - 1]) if i > 0 else 0
        if i in head_ids:
            start = max(start, _common_prefix_length(head_ids[i], prefixes[i]))
        supervised[start : len(prefixes[i])] = [True] * (len(prefixes[i]) - start)
    return full, supervised


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    # trl.data_utils.common_prefix_length, inlined for the same import cost as above.
    length = 0
    for token, other_token in zip(ids, other, strict=False):
        if token != other_token:
            break
        length += 1
    return length


def _render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    template: str,
    where: str,
    *,
    tokenize: bool = False,
    **kwargs: Any,
) -> Any:
    """apply_chat_template, its failures as one DataError line: a broken template names the field, a
    conversation the template refuses (roles that must alternate, a tool turn without a name) the row."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=tokenize, return_dict=tokenize, **kwargs
        )
    except TemplateSyntaxError as err:
        raise DataError(
            f"data.chat_template: not valid Jinja ({err.message}, template line {err.lineno})"
        ) from None
    except (TemplateError, TypeError, ValueError) as err:  # raise_exception() in templates, type errors
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"{where}: the chat template cannot render this conversation ({type(err).__name__}: {first})"
        ) from None


# ---- batches ------------------------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    predict_mask: torch.Tensor  # [B, T] True where the model's output predicts a supervised next token
    targets: torch.Tensor  # [P] the supervised next tokens, in predict_mask order
    indices: list[int]  # dataset index of each row

    @property
    def tokens(self) -> int:
        """Non-padding input tokens: what 'tokens processed' counts."""
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def supervised_tokens(self) -> int:
        return int(self.predict_mask.sum())


def collate(examples: list[Example], indices: list[int], pad_id: int) -> Batch:
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    predict_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        # The output at position p predicts the token at p + 1: p is marked when token p + 1 is supervised.
        predict_mask[row, : n - 1] = torch.tensor(example.supervised[1:], dtype=torch.bool)
    shifted = torch.roll(input_ids, shifts=-1, dims=1)
    return Batch(input_ids, attention_mask, predict_mask, shifted[predict_mask], list(indices))
