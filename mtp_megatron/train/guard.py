"""The non-finite guard: no NaN / inf step goes unnoticed, and no non-finite state is saved.

After every optimizer step the trainer hands the guard the step's logged values (loss, main,
MTP and per-step losses: DP means, so a NaN on any rank shows on all), DeepSpeed's global
gradient norm and whether DeepSpeed applied the update (ZeRO 1-3 drop an update whose gradient
norm is NaN / inf: its "OVERFLOW! Skipping step"). ``train.on_nonfinite``:

- ``stop``: raise :class:`NonFiniteError` naming the step and the non-finite terms; the trainer
  saves nothing of that state, so ``latest`` stays on the last good checkpoint.
- ``skip``: accept a step DeepSpeed dropped (the weights are unchanged), up to
  ``train.max_skipped_steps`` in a row; one more, or a non-finite update that was applied
  anyway, stops as above.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """Training or evaluation produced NaN / inf; the message names the step and the terms."""


# logged values the guard watches, by their TensorBoard names -> the names users know
_WATCHED = {"train/loss": "loss", "train/main_loss": "main", "train/mtp_loss": "mtp"}


def nonfinite_terms(metrics: dict[str, float], grad_norm: float | None) -> list[str]:
    """Names of the non-finite terms of one step: 'loss', 'main', 'mtp', 'mtp_step_k',
    'grad_norm'."""
    bad = []
    for name, value in metrics.items():
        short = _WATCHED.get(name) or (name[6:] if name.startswith("train/mtp_step_") else None)
        if short is not None and not math.isfinite(value):
            bad.append(short)
    if grad_norm is not None and not math.isfinite(grad_norm):
        bad.append("grad_norm")
    return bad


class NonFiniteGuard:
    """Counts skipped steps and decides, per step, between 'ok', 'skipped' and stopping."""

    def __init__(self, mode: str, max_skipped_steps: int, log=print):
        self.mode = mode
        self.max_skipped = max_skipped_steps
        self.consecutive = 0
        self.total_skipped = 0
        self.log = log

    def check(self, step: int, bad_terms: list[str], step_applied: bool, latest: str) -> bool:
        """``step`` (1-based) just ran. True if it was good; False if it was skipped; raises
        NonFiniteError to stop. ``bad_terms`` and ``step_applied`` must agree on all ranks."""
        if not bad_terms:
            self.consecutive = 0
            return True
        where = f"step {step}: non-finite {', '.join(bad_terms)}"
        keep = f"{latest} is kept as the latest checkpoint" if latest else "nothing was saved"
        hint = "lower train.lr, keep train.grad_clip > 0, or resume from an earlier checkpoint"
        if self.mode == "stop":
            raise NonFiniteError(f"{where} (train.on_nonfinite=stop); {keep}; {hint}")
        if step_applied:
            raise NonFiniteError(
                f"{where}, and DeepSpeed applied the update anyway (so it cannot be skipped); "
                f"{keep}; {hint}"
            )
        self.consecutive += 1
        self.total_skipped += 1
        if self.consecutive > self.max_skipped:
            raise NonFiniteError(
                f"{where}: {self.consecutive} non-finite steps in a row, more than "
                f"train.max_skipped_steps={self.max_skipped}; {keep}; {hint}"
            )
        self.log(
            f"[nonfinite] {where}: update skipped ({self.consecutive} in a row of at most "
            f"{self.max_skipped}; {self.total_skipped} in this run)"
        )
        return False


def local_state_finite(module: torch.nn.Module) -> bool:
    """Whether this rank's parameters are all finite (ZeRO-3: its partitions)."""
    for p in module.parameters():
        data = getattr(p, "ds_tensor", None)
        data = p.data if data is None or p.numel() > 0 else data
        if data.numel() and not bool(torch.isfinite(data).all()):
            return False
    return True


def agree_any(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of ``flags`` over every rank (one small all-reduce)."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
