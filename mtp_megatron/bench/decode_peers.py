"""The peers of our decoding: transformers' ``generate`` on the same trained weights.

The run is exported in-process by the Hugging Face exporter (``hf/export.py``) into a temporary
directory and loaded with transformers' own class (Exaone4, Qwen3, Llama, Qwen2 or OLMo-2). Three
ways to generate from it, each greedy and without an end token, so that it produces exactly
``max_new_tokens`` tokens as ours does:

- ``plain``: ``model.generate()``, one forward per token, transformers' dynamic KV cache (the
  peer at every batch size);
- ``use_mtp``: ``generate(use_mtp=True)``, transformers' MTP drafting with our exported chained
  heads (batch 1: assisted generation takes one row);
- ``prompt_lookup``: ``generate(prompt_lookup_num_tokens=N)``, drafts copied from n-gram matches
  in the prompt and the output so far (batch 1).

A forward hook on the decoder counts trunk forwards, so the table's "tokens per forward" holds
for transformers' rows too.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PROMPT_LOOKUP_TOKENS = 3
"""Drafts per round of transformers' prompt lookup (its documented range is 2-10; on this
benchmark's short code prompts fewer, cheaper drafts win)."""


@dataclass
class PeerMethod:
    """One of transformers' ways to generate, as a bench-decode row."""

    name: str
    """Row name."""
    batch_one_only: bool
    """Assisted generation (MTP drafts, prompt lookup) takes one row at a time."""
    kwargs: dict
    """Extra arguments of ``generate``."""


def peer_methods(mtp_exported: bool) -> list[PeerMethod]:
    methods = [PeerMethod("transformers generate", False, {})]
    if mtp_exported:
        methods.append(PeerMethod("transformers use_mtp (our heads)", True, {"use_mtp": True}))
    lookup = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS}
    methods.append(PeerMethod(f"transformers prompt lookup ({PROMPT_LOOKUP_TOKENS})", True, lookup))
    return methods


class TransformersPeer:
    """The run's weights in transformers' own model class, ready to ``generate``."""

    def __init__(
        self,
        consolidated_folder: Path,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        import transformers

        from mtp_megatron.hf.export import export_hf, mtp_key_patterns

        self._dir = tempfile.TemporaryDirectory(prefix="mtp_megatron_peer_")
        out = export_hf(consolidated_folder, Path(self._dir.name) / "hf", log=lambda _: None)
        config = transformers.AutoConfig.from_pretrained(out)
        base = getattr(transformers, config.architectures[0])
        self.mtp_exported = bool(getattr(config, "num_mtp_layers", None))
        # transformers' MtpModel finds the MTP layers through this class attribute, which the
        # stock classes leave empty: a subclass lists them instead of patching transformers
        keys = {"_keys_to_ignore_on_load_unexpected": mtp_key_patterns(out)}
        cls: Any = type(base.__name__, (base,), keys)
        self.model = cls.from_pretrained(out, dtype=dtype).to(device).eval()
        gen = self.model.generation_config
        gen.eos_token_id = None  # exactly max_new_tokens, as our rows
        gen.pad_token_id = 0
        self.family = base.__name__
        self.forwards = 0
        self.model.get_decoder().register_forward_hook(self._count)
        self.methods = peer_methods(self.mtp_exported)

    def _count(self, *_) -> None:
        self.forwards += 1

    @torch.no_grad()
    def generate(self, method: PeerMethod, input_ids: torch.Tensor, max_new_tokens: int):
        """(tokens [b, T + max_new_tokens], stats) as our decoders report them."""
        device = next(self.model.parameters()).device
        input_ids = input_ids.to(device)
        self.forwards = 0
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            **method.kwargs,
        )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        new = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
        return out, {"wall_time_s": wall, "new_tokens": new, "forward_calls": self.forwards}
