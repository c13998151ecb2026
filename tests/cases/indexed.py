"""Tokenizers and texts for the tests of indexed data (prepare, training on blends)."""

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}  # line {i}\n" for i in range(60)]


def tokenizer_dir(tmp_path: Path, end: str | None = "</s>", config: bool = True) -> Path:
    """A small byte-level BPE whose end token is ``end`` (saved as a HF tokenizer directory)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", end] if end else ["<s>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    folder = tmp_path / ("tok-" + (end or "none").strip("<>/"))
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    if config and end:
        (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": end}))
    return folder
