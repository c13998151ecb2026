"""The prompts of the decode benchmark: held-out validation prompts of a trained run (or of any
text or code directory), the calibration prompts ``lookahead="auto"`` measures on, and the draft
vocabulary of the most frequent training tokens."""

from __future__ import annotations

from pathlib import Path

import torch

from mtp_megatron.config import ConfigError, DataConfig, from_dict
from mtp_megatron.decoding.draft_vocab import frequent_token_ids
from mtp_megatron.decoding.load import LoadedRun

FREQUENCY_TOKENS = 50_000_000
"""Training tokens counted for the draft vocabulary (bounded: a pretraining corpus is large)."""

CALIBRATION_PROMPTS = 2
"""Prompts lookahead="auto" calibrates on (per batch size: whole batches of them, cycled)."""


def benchmark_inputs(
    run: LoadedRun, n: int, prompt_len: int, draft_vocab_size: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """n prompts of prompt_len tokens, evenly spaced over the run's validation documents (back
    to back); ``CALIBRATION_PROMPTS`` others between them; and the draft_vocab_size most
    frequent tokens of the first ``FREQUENCY_TOKENS`` training tokens (None when 0: drafts
    use every token)."""
    from mtp_megatron.data.loader import prefix_tokens, resolve_data

    data_cfg = from_dict(DataConfig, run.recipe.get("data") or {}, "data")
    blends = resolve_data(data_cfg, log=lambda *a: None)  # prepared already: a no-op
    stream = torch.from_numpy(prefix_tokens(blends.validation).astype("int64"))
    span = len(stream) - prompt_len - 1
    if span <= 0:
        raise ConfigError(f"validation split too short for {prompt_len}-token prompts")
    starts = [int(i * span / max(n, 1)) for i in range(n)]
    prompts = [stream[s : s + prompt_len][None] for s in starts]
    # calibration prompts (lookahead="auto"): between the benchmark's, half a spacing on
    between = [int((i + 0.5) * span / max(n, 1)) for i in range(min(n, CALIBRATION_PROMPTS))]
    calibration = [stream[s : s + prompt_len][None] for s in between]
    vocab = None
    if draft_vocab_size:
        train = prefix_tokens(blends.train, limit=FREQUENCY_TOKENS)
        vocab = frequent_token_ids(train, draft_vocab_size, run.model_config.known_vocab_size)
    return prompts, calibration, vocab


def directory_prompts(
    directory: str | Path, tokenizer_file: Path, n: int, prompt_len: int
) -> list[torch.Tensor]:
    """n prompts of prompt_len tokens evenly spaced over the documents of any text or code
    directory (the suffixes ``prepare`` reads), tokenised with the run's tokenizer."""
    from collections import Counter

    from mtp_megatron.data.documents import iter_documents
    from mtp_megatron.data.prepare_indexed import SUFFIXES, walk_inputs
    from mtp_megatron.data.tokenizer import load_tokenizer

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"--prompts-from {root}: not a directory")
    files = walk_inputs(root, SUFFIXES, ())
    tok = load_tokenizer(tokenizer_file)
    stream: list[int] = []
    skipped: Counter = Counter()
    for f in files:
        for _, text in iter_documents(f, str(f), "text", skipped):
            stream.extend(tok.encode(text).ids)
    span = len(stream) - prompt_len
    if span <= 0:
        raise ConfigError(
            f"--prompts-from {root}: {len(files)} readable files hold {len(stream)} tokens, too "
            f"few for {prompt_len}-token prompts (suffixes read: {', '.join(SUFFIXES)})"
        )
    starts = [int(i * span / max(n, 1)) for i in range(n)]
    return [torch.tensor(stream[s : s + prompt_len])[None] for s in starts]
