"""Validation: loss and top-1 accuracy per head, and the greedy acceptance proxy per draft position.

Acceptance proxy of draft position k: how often head k's argmax at position i equals the main
head's argmax at position i + k (both predict t_{i+k+1}); with greedy verification that is the
chance the draft would survive, given the earlier drafts did.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mtp_megatron.model.etd import etd_metrics
from mtp_megatron.model.loss import IGNORE_INDEX, step_targets
from mtp_megatron.parallel import tensor_parallel_group, vocab_parallel_argmax
from mtp_megatron.train.guard import NonFiniteError


@torch.no_grad()
def evaluate(model, batches) -> dict[str, float]:
    """Average over ``batches`` (pairs of [b, s] input_ids, labels) and the data-parallel group.

    Returns 'val/loss_main', 'val/loss_mtp_step_k', 'val/acc_main', 'val/acc_mtp_step_k',
    'val/acceptance_pos_k' (k = 1..K).
    """
    was_training = model.training
    model.eval()
    tp_group = tensor_parallel_group()
    sums: dict[str, tuple[float, float]] = {}
    for input_ids, labels in batches:
        out = model(input_ids, labels=labels, return_mtp_logits=True)
        add_batch_stats(sums, out, labels, tp_group)
        for name, value in etd_metrics(model).items():  # ETD depth and routing (none otherwise)
            num, den = sums.get(name, (0.0, 0.0))
            sums[name] = (num + value, den + 1.0)
    model.train(was_training)
    return reduce_stats(sums, parallel_state.get_data_parallel_group())


def add_batch_stats(
    sums: dict[str, tuple[float, float]], out, labels: torch.Tensor, tp_group
) -> None:
    """Add one batch's (numerator, denominator) per metric to ``sums``; ``out`` is the MTPOutput
    of a forward with ``return_mtp_logits=True`` (the pipeline's last stage calls this too)."""
    main_pred = vocab_parallel_argmax(out.logits, tp_group)  # [b, s]
    stats = {"loss_main": (out.main_loss.item(), 1.0)}
    stats["acc_main"] = _accuracy(main_pred, labels)
    for k, logits_k in enumerate(out.mtp_logits or [], start=1):
        stats[f"loss_mtp_step_{k}"] = (out.mtp_step_losses[f"mtp_step_{k}"].item(), 1.0)
        pred_k = vocab_parallel_argmax(logits_k, tp_group)
        stats[f"acc_mtp_step_{k}"] = _accuracy(pred_k, step_targets(labels, k))
        # head k at i vs main head at i + k, over positions where i + k is in the sequence
        agree = (pred_k[:, :-k] == main_pred[:, k:]).float()
        stats[f"acceptance_pos_{k}"] = (agree.sum().item(), float(agree.numel()))
    for name, (num, den) in stats.items():
        n, d = sums.get(name, (0.0, 0.0))
        sums[name] = (n + num, d + den)


def reduce_stats(sums: dict[str, tuple[float, float]], dp_group) -> dict[str, float]:
    """Sum (numerator, denominator) pairs over ``dp_group`` -> {'val/<name>': ratio}."""
    names = sorted(sums)
    totals = torch.tensor([[sums[n][0], sums[n][1]] for n in names], dtype=torch.float64)
    dist.all_reduce(totals, group=dp_group)
    metrics = {
        f"val/{n}": (totals[i, 0] / totals[i, 1].clamp_min(1)).item() for i, n in enumerate(names)
    }
    # NaN logits would still give accuracies (argmax of NaN is an index): refuse on the losses
    bad = [n[4:] for n, v in metrics.items() if n.startswith("val/loss_") and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"validation: non-finite {', '.join(bad)} (NaN / inf logits: the weights diverged)"
        )
    return metrics


@dataclass(frozen=True)
class HeadMetrics:
    """One head's row of a validation pass (read from :func:`evaluate`'s metrics)."""

    name: str
    """'main' or 'mtp k'."""
    k: int
    """0 for the main head; MTP step k predicts t+k+1."""
    loss: float
    accuracy: float
    acceptance: float | None
    """The greedy acceptance proxy of draft position k (None for the main head)."""


def head_metrics(ev: dict[str, float]) -> list[HeadMetrics]:
    """The main head's and every MTP head's validation metrics, in order."""
    rows = [HeadMetrics("main", 0, ev["val/loss_main"], ev["val/acc_main"], None)]
    k = 1
    while f"val/loss_mtp_step_{k}" in ev:
        rows.append(
            HeadMetrics(
                f"mtp {k}",
                k,
                ev[f"val/loss_mtp_step_{k}"],
                ev[f"val/acc_mtp_step_{k}"],
                ev[f"val/acceptance_pos_{k}"],
            )
        )
        k += 1
    return rows


def validation_table(ev: dict[str, float]) -> str:
    """Markdown table of validation loss, top-1 accuracy and acceptance per head."""
    rows = [
        "| head | predicts | val loss | top-1 acc | acceptance (greedy proxy) |",
        "|---|---|---|---|---|",
    ]
    for h in head_metrics(ev):
        acceptance = "-" if h.acceptance is None else f"{h.acceptance:.3f}"
        rows.append(f"| {h.name} | t+{h.k + 1} | {h.loss:.4f} | {h.accuracy:.3f} | {acceptance} |")
    return "\n".join(rows)


def validation_line(step: int, ev: dict[str, float]) -> str:
    """One log line: the main head's loss and accuracy, each head's accuracy and acceptance."""
    main, *heads = head_metrics(ev)
    parts = [f"val loss {main.loss:.4f}", f"acc {main.accuracy:.3f}"]
    parts += [f"head{h.k} acc {h.accuracy:.3f} accept {h.acceptance:.3f}" for h in heads]
    return f"[eval] step {step}: " + " | ".join(parts)


def _accuracy(pred: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    mask = targets != IGNORE_INDEX
    return ((pred == targets) & mask).sum().item(), mask.sum().item()
