"""Targets and the masked vocab-parallel cross-entropy.

Notation: b batch, s sequence, V padded vocabulary, p tensor-parallel size.
``labels[b, i]`` is the main head's target at position i (t_{i+1}); IGNORE_INDEX marks no target.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
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


CHUNK_ELEMENTS = 1 << 24
"""Logit elements per chunk (64 MiB of fp32) when a teacher's distribution is expanded: the
full-vocabulary [b, s, V/p] tensor of it never exists at once."""


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None and group.size() > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _chunks(t: torch.Tensor) -> list[slice]:
    """Slices of positions (dim 1 of [b, s, V/p]) holding about CHUNK_ELEMENTS each."""
    b, s, v = t.shape
    size = max(1, CHUNK_ELEMENTS // max(b * v, 1))
    return [slice(i, min(i + size, s)) for i in range(0, s, size)]


def log_normalizer(logits: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log sum_v exp(logits_v) over the whole (vocab-parallel) vocabulary: [b, s] from
    [b, s, V/p] shards, in fp32, chunk by chunk, without gradient."""
    with torch.no_grad():
        out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
        for c in _chunks(logits):
            x = logits[:, c].float()
            top = _all_reduce(x.amax(-1), tp_group, dist.ReduceOp.MAX)  # [b, c]
            total = _all_reduce((x - top[..., None]).exp_().sum(-1), tp_group)
            out[:, c] = total.log_() + top
    return out


class _DistilledCrossEntropy(torch.autograd.Function):
    """Per token, the data CE and the soft CE against a teacher's distribution p, vocab-parallel
    and in one pass (module doc of :func:`distilled_cross_entropy`)."""

    @staticmethod
    def forward(ctx, logits, teacher, teacher_lse, targets, tp_group, inplace):
        x = logits.float()  # [b, s, V/p]; a copy when bf16
        if x is logits and not inplace:
            x = x.clone()  # becomes the softmax kept for backward
        x.sub_(_all_reduce(x.amax(-1), tp_group, dist.ReduceOp.MAX)[..., None])
        v = x.shape[-1]
        start = (tp_group.rank() if tp_group is not None else 0) * v
        in_range = (targets >= start) & (targets < start + v)  # IGNORE_INDEX is out of range
        local = (targets - start).clamp(0, v - 1)
        picked = x.gather(-1, local[..., None]).squeeze(-1) * in_range  # x_t - max, [b, s]
        expected = torch.empty_like(picked)  # sum_v p_v (x_v - max)
        for c in _chunks(x):
            p = (teacher[:, c].float() - teacher_lse[:, c, None]).exp_()
            expected[:, c] = (p * x[:, c]).sum(-1)
        sum_exp = x.exp_().sum(-1)
        picked, expected, sum_exp = _all_reduce(torch.stack([picked, expected, sum_exp]), tp_group)
        x.div_(sum_exp[..., None])  # the softmax q, in place
        ctx.tp_group = tp_group
        ctx.dtype = logits.dtype
        ctx.save_for_backward(x, teacher, teacher_lse, local, in_range)
        log_z = sum_exp.log()
        return log_z - picked, log_z - expected  # CE(data), CE(p, q): Σ_v p_v = 1

    @staticmethod
    def backward(ctx, grad_data, grad_soft):
        q, teacher, teacher_lse, local, in_range = ctx.saved_tensors
        g_data = torch.zeros_like(in_range, dtype=q.dtype) if grad_data is None else grad_data
        g_soft = torch.zeros_like(g_data) if grad_soft is None else grad_soft
        grad = q * (g_data + g_soft)[..., None]  # (not in place: a retained graph reuses q)
        grad.scatter_add_(-1, local[..., None], -(g_data * in_range)[..., None])  # - onehot(t)
        for c in _chunks(grad):
            p = (teacher[:, c].float() - teacher_lse[:, c, None]).exp_()
            grad[:, c] -= g_soft[:, c, None] * p
        return grad.to(ctx.dtype), None, None, None, None, None


def distilled_cross_entropy(
    logits: torch.Tensor,
    teacher: torch.Tensor,
    teacher_lse: torch.Tensor,
    targets: torch.Tensor,
    tp_group=None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(data CE, soft CE) of a head, each the mean over the positions whose target is not
    IGNORE_INDEX: CE(targets, q) and -sum_v p_v log q_v, q = softmax(logits), p =
    softmax(teacher) (no gradient reaches the teacher; ``teacher_lse``: its :func:`log_normalizer`,
    computed once for every head). logits, teacher: [b, s, V/p] vocab shards of this TP rank;
    targets: [b, s] global ids.

    One pass, vocab-parallel like megatron's CE (maxima and sums all-reduced forward, the
    gradient local): what stays alive for backward is q, written over a copy of the logits (over
    the logits themselves with ``inplace``), [b, s] statistics and a reference to the teacher;
    p is expanded chunk by chunk when needed, never at once. The gradient is
    g_data (q - onehot(t)) + g_soft (q - p).
    """
    mask = (targets != IGNORE_INDEX).float()  # [b, s]
    data, soft = _DistilledCrossEntropy.apply(
        logits, teacher.detach(), teacher_lse, targets, tp_group, inplace
    )
    count = mask.sum().clamp_min(1)
    return (data * mask).sum() / count, (soft * mask).sum() / count
