"""Targets and the masked vocab-parallel cross-entropy.

Notation: b batch, s sequence, V padded vocabulary, p tensor-parallel size.
``labels[b, i]`` is the main head's target at position i (t_{i+1}); IGNORE_INDEX marks no target.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import (
    reduce_from_tensor_model_parallel_region,
    vocab_parallel_cross_entropy,
)

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


def _all_reduce_max(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def soft_cross_entropy(
    logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, tp_group=None
) -> torch.Tensor:
    """Mean over ``mask`` of -sum_v p_v log q_v: q = softmax(logits), p = softmax(teacher) (no
    gradient reaches the teacher). Both [b, s, V/p] vocab shards of this TP rank; mask [b, s].

    Vocab-parallel like megatron's hard-target CE: the maxima are all-reduced (no gradient),
    the sum of exponentials and the teacher-weighted sum are all-reduced forward and passed
    through unchanged backward (every rank then holds the whole, replicated loss).
    """
    with torch.no_grad():
        t = teacher_logits.float()
        t = t - _all_reduce_max(t.amax(-1, keepdim=True), tp_group)
        p = t.exp_()
        z = p.sum(-1, keepdim=True)
        if tp_group is not None and tp_group.size() > 1:
            dist.all_reduce(z, group=tp_group)
        p = p / z  # [b, s, V/p]: the teacher's distribution, this rank's shard
    x = logits.float()
    x = x - _all_reduce_max(x.detach().amax(-1, keepdim=True), tp_group)
    sum_exp = x.exp().sum(-1)  # [b, s]
    weighted = (p * x).sum(-1)
    if tp_group is not None and tp_group.size() > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=tp_group)
        weighted = reduce_from_tensor_model_parallel_region(weighted, group=tp_group)
    per_token = sum_exp.log() - weighted  # log sum exp x - sum_v p_v x_v  (sum_v p_v = 1)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)
