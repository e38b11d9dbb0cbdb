"""The tiny world's tokenizer: byte-level, built in code, saved next to every tiny model.

Every byte is one token (GPT-2's byte-to-unicode alphabet, no merges), plus two special tokens.
It is a real `PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(model_dir)` loads it exactly
as it loads a Hugging Face model's tokenizer: the tiny world goes through the same code as real models.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Return the byte-level tokenizer: ids 0-255 are bytes, then <|eos|> and <|pad|>."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=_byte_of)
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would change nothing but the cost.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    tokenizer.padding_side = "right"
    return tokenizer


def _byte_of(symbol: str) -> int:
    """Order the byte-level alphabet by the byte each symbol stands for, so token id == byte value."""
    return _UNICODE_TO_BYTE[symbol]


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's table: printable bytes map to themselves, the rest to code points from 256 upwards.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {symbol: byte for byte, symbol in _bytes_to_unicode().items()}
