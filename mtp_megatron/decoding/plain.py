"""Plain KV-cached decoding: one trunk forward per token (the baseline every speculative method is
measured against, and what ``lookahead="auto"`` falls back to when drafting does not pay).

Notation: b batch, T prompt length, V vocabulary.
"""

from __future__ import annotations

import time

import torch

from mtp_megatron.decoding.host import host_read
from mtp_megatron.decoding.runner import (
    TrunkRunner,
    finish,
    on_model_device,
    pick,
    require_finite,
    sync,
    validate_request,
)
from mtp_megatron.decoding.sampling import SamplingConfig


@torch.no_grad()
def generate_plain(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Plain decoding of ``input_ids`` [b, T]: (tokens [b, T + max_new_tokens], stats), one trunk
    forward per token (``use_cache=False`` recomputes every position each time)."""
    sampling = sampling or SamplingConfig()
    sampling.validate()
    input_ids, generator = on_model_device(model, input_ids, generator)
    capacity = validate_request(model, input_ids, max_new_tokens, 1)
    runner = TrunkRunner(model)
    b, T = input_ids.shape
    seq = torch.zeros(b, capacity, dtype=torch.long, device=input_ids.device)
    seq[:, :T] = input_ids
    t0 = time.perf_counter()
    caches = runner.trunk_caches(b, capacity)
    calls = 0
    for i in range(max_new_tokens):
        n = T + i
        if use_cache:
            block = seq[:, :n] if i == 0 else seq[:, n - 1 : n]
            fwd = runner.forward(block, caches, last_only=True)
        else:
            caches.set_lengths(torch.zeros_like(caches.lengths), max_length=0)
            fwd = runner.forward(seq[:, :n], caches, last_only=True)
        calls += 1
        if i == 0:
            require_finite(fwd.logits[:, -1])
        seq[:, n] = pick(fwd.logits[:, -1], sampling, generator)
        if eos_token_id is not None and host_read(
            (seq[:, T : n + 1] == eos_token_id).any(-1).all()
        ):
            max_new_tokens = i + 1
            break
    sync(seq.device)  # the device has finished what it was given
    wall = time.perf_counter() - t0
    out, lengths = finish(seq, T, max_new_tokens, eos_token_id)
    new = int(lengths.sum())
    return out, {
        "new_tokens": new,
        "forward_calls": calls,
        "tokens_per_forward": new / (calls * b),
        "wall_time_s": wall,
        "tokens_per_s": new / wall,
    }
