"""Training data: prompt/completion records -> token ids with the supervised positions marked.

Teacher logit caching and student training read the same records through the same function, so the
positions the teacher's log-probs were cached for are exactly the positions the student is trained on.
Prompt and completion are tokenized separately and concatenated (the way lm-eval splits context and
continuation), then EOS is appended so the model learns where an answer ends.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from dist_bench import tinyworld
from dist_bench.config import DataConfig


class DataError(ValueError):
    """Bad training data, phrased as one line naming the file and line."""


IGNORE = -100  # label of a position without a loss (HF convention)


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    first_target: int  # index of the first token that gets a loss; every later token does too

    @property
    def labels(self) -> list[int]:
        """The token ids, IGNORE where a token gets no loss (as HF's and TRL's trainers take labels)."""
        return [IGNORE] * self.first_target + self.input_ids[self.first_target :]

    @property
    def supervised_tokens(self) -> int:
        """Tokens that get a loss (each predicted from the token before it)."""
        return len(self.input_ids) - self.first_target


def data_path(cfg: DataConfig) -> Path:
    path = Path(tinyworld.resolve(cfg.train))
    if not path.is_file():
        raise DataError(f"data.train: {path}: file not found")
    return path


def data_fingerprint(cfg: DataConfig) -> str:
    return "sha256:" + hashlib.sha256(data_path(cfg).read_bytes()).hexdigest()


def read_records(cfg: DataConfig) -> Iterator[tuple[int, str, str]]:
    """(line number, prompt, completion) of every record that will be used (the first data.max_samples).

    The pre-flight scan and load_examples both read through here, so a file that passes the scan loads.
    Lines are decoded one by one so that a bad byte is reported with its file and line.
    """
    path = data_path(cfg)
    used = 0
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if cfg.max_samples is not None and used >= cfg.max_samples:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                ) from None
            if not line.strip():
                continue
            prompt, completion = _read_record(path, line_no, line, cfg)
            used += 1
            yield line_no, prompt, completion
    if used == 0:
        raise DataError(f"{path}: no records")


def load_examples(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    examples = []
    for line_no, prompt, completion in read_records(cfg):
        example = tokenize(prompt, completion, tokenizer, cfg)
        if example is None:
            raise DataError(
                f"{data_path(cfg)}:{line_no}: prompt fills data.max_length={cfg.max_length}; nothing to learn"
            )
        examples.append(example)
    return examples


def _read_record(path: Path, line_no: int, line: str, cfg: DataConfig) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    for field in (cfg.prompt_field, cfg.completion_field):
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataError(f"{path}:{line_no}: field '{field}' missing or not a string")
    return record[cfg.prompt_field], record[cfg.completion_field]


def tokenize(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> Example | None:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + completion_ids)[: cfg.max_length]
    # Position 0 has no previous token to predict it from, so targets start at 1 at the earliest.
    first_target = 1 if cfg.supervise == "all" else max(len(prompt_ids), 1)
    if first_target >= len(input_ids):
        return None
    return Example(input_ids=input_ids, first_target=first_target)


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
        predict_mask[row, example.first_target - 1 : n - 1] = True
    # The output at position p predicts the token at p + 1.
    shifted = torch.roll(input_ids, shifts=-1, dims=1)
    return Batch(input_ids, attention_mask, predict_mask, shifted[predict_mask], list(indices))
