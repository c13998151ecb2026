"""Byte-level BPE (GPT-2 style) trained with ``tokenizers``, and documents -> one token stream.

Byte-level means every string encodes (no unknown token) and decode(encode(text)) == text.
The only special token is ``<|endoftext|>``, added first, so its id is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mtp_megatron.config import ConfigError

EOT_TOKEN = "<|endoftext|>"
"""Separates documents in the token stream."""
MIN_VOCAB_SIZE = 257
"""The 256 byte symbols and the end-of-text token."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (half the disk and memory of int32), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def check_vocab_size(vocab_size: int) -> None:
    """Raise ConfigError unless ``vocab_size`` can hold the bytes and the end-of-text token."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size={vocab_size!r} is invalid: must be an integer")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size={vocab_size!r} is invalid: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})"
        )


def train_tokenizer(
    texts: Iterable[str] | Iterable[list[str]], vocab_size: int, length: int | None = None
) -> Tokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (fewer if the corpus runs out of
    merges) on texts or batches of texts; ``length`` only sizes the progress estimate."""
    check_vocab_size(vocab_size)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=length)
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer saved by ``prepare_data`` (its JSON file) and check it has EOT."""
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOT_TOKEN) is None:
        raise ValueError(f"tokenizer {path} has no {EOT_TOKEN} token; it was not made here")
    return tok


def encode_stream(
    tok: Tokenizer, batches: Iterator[list[str]], dtype: np.dtype, eot_id: int
) -> np.ndarray:
    """Encode each document, follow it by ``eot_id``, and concatenate: one 1-D token stream."""
    eot = np.array([eot_id], dtype=dtype)
    # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we never use: ~1.5x.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)
    parts: list[np.ndarray] = []
    for texts in batches:
        for enc in encode(texts, add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=dtype))
            parts.append(eot)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
