"""Targets and the masked vocab-parallel cross-entropy.

Notation: b batch, s sequence, V padded vocabulary, p tensor-parallel size.
``labels[b, i]`` is the main head's target at position i (t_{i+1}); IGNORE_INDEX marks no target.
"""

from __future__ import annotations

import torch
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

IGNORE_INDEX = -100


def shift_left(t: torch.Tensor, k: int, fill: int) -> torch.Tensor:
    """[b, s] -> [b, s] with out[:, i] = t[:, i + k] and ``fill`` past the end."""
    if k == 0:
        return t
    pad = torch.full_like(t[:, :k], fill)
    return torch.cat([t[:, k:], pad], dim=1)


def labels_from_input_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels of a [b, s] batch; the last position has no target."""
    return shift_left(input_ids, 1, IGNORE_INDEX)


def step_targets(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Targets of MTP step k: t_{i+k+1} = labels[:, i + k]; the last k positions have none."""
    return shift_left(labels, k, IGNORE_INDEX)


def future_token_ids(input_ids: torch.Tensor, k: int) -> torch.Tensor:
    """The token a chained step k embeds at position i: t_{i+k} (0 past the end, never scored)."""
    return shift_left(input_ids, k, 0)


def masked_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, inplace: bool = False
) -> torch.Tensor:
    """Mean CE over positions whose target is not IGNORE_INDEX.

    logits: [b, s, V/p] (this rank's vocab shard); targets: [b, s] global token ids. Megatron's
    vocab-parallel CE has no ignore index, so ignored targets are replaced by 0 and masked out.
    It also overwrites its input with exp(logits - max) to save memory: ``inplace=True`` allows
    that (the caller no longer needs the logits); otherwise fp32 logits are copied first.
    """
    mask = targets != IGNORE_INDEX  # [b, s]
    safe = torch.where(mask, targets, torch.zeros_like(targets))
    work = logits.float()  # a copy already when the logits are bf16
    if work is logits and not inplace:
        work = logits.clone()
    per_token = vocab_parallel_cross_entropy(work, safe)  # [b, s]
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
