"""The MTP objective: what a model with MTP heads minimises, and the metrics a step logs.

Notation: b batch, s sequence, h hidden, V padded vocabulary, p tensor-parallel size, K MTP
steps, A <= K the steps a curriculum trains at this optimizer step.

    loss = CE_0 + w(step) * sum_{k=1..A} alpha_k L_k        (+ an ETD trunk's depth cost)
    alpha_k = beta^(k-1) / sum_{j=1..A} beta^(j-1)          (beta: ``loss_weight_decay``)
    L_k = CE_k, or in training with self-distillation (d: ``distill_weight``)
          (1 - d) CE_k + d SoftCE(head k at i, the main head's distribution at i + k)

- w(step): :class:`WeightSchedule` (linear warm-up, then constant / DeepSeek-V3's step / linear
  decay), its switch given in steps or resolved from tokens;
- A(step): :class:`Curriculum` (forward adds steps, reverse drops them); steps it leaves out
  are not computed, the weights are renormalised over those that train;
- what the MTP loss trains (``train.mtp.trunk``): 'joint' (everything), 'detach_heads' (the
  heads read the trunk's tensors and weights detached, so only they learn from it),
  'freeze_trunk' (the trunk takes no gradient: ``train/apply.py`` turns it off);
- two schedules of the same loss and gradients: the plain one keeps every step's logits until
  backward; the sequential one (``sequential_forward``: Meta's, ``model/sequential.py``) scores
  and differentiates one step at a time, before the main head's logits exist;
- :class:`StepMetrics`: the one layout of what a training step logs.

The model (``model/mtp_model.py``) holds the trunk and the heads and iterates the steps; this
module decides what they are scored against. Megatron keeps the same split (its MTP layers in
the model, ``process_mtp_loss`` and ``MTPLossLoggingHelper`` apart), as torchtitan keeps its loss
in ``components/loss.py``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mtp_megatron.config import ConfigError, MTPConfig, MTPTrainingConfig
from mtp_megatron.config.mtp import CurriculumName, WeightScheduleName
from mtp_megatron.model.loss import (
    distilled_cross_entropy,
    log_normalizer,
    masked_cross_entropy,
    step_targets,
)
from mtp_megatron.model.sequential import sequential_mtp_loss
from mtp_megatron.model.trunk import DecoderTrunk


@dataclass
class MTPOutput:
    """What one forward pass returns (the guide's ``outputs``)."""

    loss: torch.Tensor
    """main_loss + mtp_weight * mtp_loss (+ ETD's depth cost): the quantity to backpropagate."""
    main_loss: torch.Tensor
    """Next-token CE of the main head."""
    logits: torch.Tensor | None
    """Main-head logits [b, s, V/p]: this rank's vocabulary shard (all of V at TP=1); None with
    ``return_logits=False``."""
    mtp_loss: torch.Tensor | None = None
    """sum_k alpha_k CE_k, before the MTP weight (None for an NTP model)."""
    mtp_step_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    """CE_k per step, keyed 'mtp_step_1'..'mtp_step_K' (detached, for logging); a step that a
    curriculum leaves out at this step holds 0."""
    mtp_weight: float = 0.0
    """w used for this step (its schedule's value)."""
    mtp_active_steps: int = 0
    """MTP steps in the loss (K, fewer under a curriculum; 0 for an NTP model)."""
    mtp_logits: list[torch.Tensor] | None = None
    """Per-step logits [b, s, V/p] (only with ``return_mtp_logits=True``, for evaluation)."""
    depth_cost: torch.Tensor | None = None
    """ETD's halting cost of a training forward (part of ``loss``); None otherwise."""


def step_weights(decay: float, steps: int) -> list[float]:
    """alpha_1..alpha_steps = decay^(k-1), normalised to sum to one ([] for no steps)."""
    raw = [decay ** (k - 1) for k in range(1, steps + 1)]
    total = sum(raw)
    return [r / total for r in raw]


@dataclass(frozen=True, kw_only=True)
class WeightSchedule:
    """w(step): the MTP weight at an optimizer step (steps count from 0, the updates already
    applied; ``None``: no step, e.g. evaluation, the full weight)."""

    kind: WeightScheduleName = "constant"
    """'constant', 'step' or 'linear_decay' (``MTPConfig.weight_schedule``)."""
    weight: float = 0.5
    """``mtp_loss_weight``: w after the warm-up (and before the switch)."""
    final_weight: float | None = None
    """``final_loss_weight``: w after the switch ('step') or the decay ('linear_decay')."""
    warmup_steps: int = 0
    """Linear warm-up of w from 0 over this many steps."""
    switch_step: int | None = None
    """The first step at the final weight; None while a switch in tokens is unresolved."""

    @classmethod
    def from_config(cls, mtp: MTPConfig, tokens_per_step: int | None = None) -> WeightSchedule:
        """``mtp``'s schedule; a switch in tokens becomes the first step at or past them
        (``tokens_per_step``: global batch x sequence length)."""
        switch = mtp.weight_switch_step
        if mtp.weight_switch_tokens is not None and tokens_per_step is not None:
            switch = math.ceil(mtp.weight_switch_tokens / tokens_per_step)
            if switch <= mtp.warmup_steps:
                raise ConfigError(
                    f"mtp.weight_switch_tokens={mtp.weight_switch_tokens} is step {switch} at "
                    f"{tokens_per_step} tokens per step, within the MTP warm-up "
                    f"(warmup_steps={mtp.warmup_steps}): move the switch later or shorten the "
                    "warm-up"
                )
        return cls(
            kind=mtp.weight_schedule,
            weight=mtp.mtp_loss_weight,
            final_weight=mtp.final_loss_weight,
            warmup_steps=mtp.warmup_steps,
            switch_step=switch,
        )

    def __call__(self, step: int | None) -> float:
        """w at ``step``: the guide's ``get_mtp_weight``, warm-up then the schedule."""
        w0 = self.weight
        if step is None:
            return w0
        step = max(step, 0)
        if self.kind != "constant":
            switch, w1 = self.switch_step, self.final_weight
            if switch is None or w1 is None:
                raise ConfigError(
                    "mtp.weight_switch_tokens is not turned into steps yet: build the "
                    "MTPObjective with tokens_per_step (the trainer does) or give "
                    "weight_switch_step"
                )
            if self.kind == "step":
                w0 = w0 if step < switch else w1
            else:  # linear_decay, from the end of the warm-up to the switch
                start = min(self.warmup_steps, switch)
                frac = 1.0 if switch <= start else min(max(step - start, 0) / (switch - start), 1)
                w0 = w0 + (w1 - w0) * frac
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return w0 * step / self.warmup_steps
        return w0


@dataclass(frozen=True, kw_only=True)
class Curriculum:
    """A(step): how many MTP steps train at an optimizer step (Aynetdinov & Akbik,
    arXiv:2505.22757): K + 1 equal stages over ``span`` steps."""

    kind: CurriculumName = "none"
    """'none' (all K), 'forward' (0, 1, ..., K) or 'reverse' (K, ..., 1, 0)."""
    num_steps: int = 0
    """K."""
    span: int | None = None
    """Optimizer steps the stages span (``curriculum_steps``, else the run's steps)."""

    def active_steps(self, step: int | None) -> int:
        """MTP steps that train at ``step`` (``None``: all, e.g. evaluation)."""
        K = self.num_steps
        if self.kind == "none" or step is None:
            return K
        if self.span is None:
            raise ConfigError(
                f"train.mtp.curriculum={self.kind!r} needs its span: set "
                "train.mtp.curriculum_steps (the trainer uses train.steps)"
            )
        stage = min(K, max(step, 0) * (K + 1) // self.span)  # 0..K
        return stage if self.kind == "forward" else K - stage


class StepSource(Protocol):
    """What the objective reads of a model (``MTPModel``): its trunk and its MTP steps."""

    trunk: DecoderTrunk

    def mtp_steps(
        self,
        hidden: torch.Tensor,
        normed: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        detach: bool,
        checkpoint: bool,
    ) -> Iterator[tuple[int, torch.Tensor]]: ...


@dataclass
class _StepLosses:
    """The MTP part of one forward: sum_k alpha_k L_k, and what is logged of each step."""

    loss: torch.Tensor
    """sum_k alpha_k L_k [] (the training loss of each step: with distillation, L_k)."""
    ce: dict[str, torch.Tensor] = field(default_factory=dict)
    """'mtp_step_k' -> CE_k [] (the data CE, detached)."""
    logits: list[torch.Tensor] = field(default_factory=list)
    """logits_k [b, s, V/p] (only when asked for: evaluation)."""


class MTPObjective:
    """The loss of a model with K >= 0 MTP heads (module doc), built once per model from its
    ``MTPConfig`` (None: a plain next-token model) and how it trains."""

    def __init__(
        self,
        mtp: MTPConfig | None,
        training: MTPTrainingConfig | None = None,
        *,
        tokens_per_step: int | None = None,
        total_steps: int | None = None,
    ):
        """``tokens_per_step``: resolves a weight switch given in tokens; ``total_steps``: the
        curriculum's span when ``curriculum_steps`` is None (the trainer passes train.steps)."""
        training = training or MTPTrainingConfig()
        training.validate()
        self.num_steps = mtp.num_predict_tokens if mtp is not None else 0
        """K."""
        self.decay = mtp.loss_weight_decay if mtp is not None else 1.0
        """beta of the step weights."""
        self.chained = mtp is not None and mtp.head_arrangement == "chained"
        self.schedule = (
            WeightSchedule.from_config(mtp, tokens_per_step)
            if mtp is not None
            else WeightSchedule(weight=0.0)
        )
        self.curriculum = Curriculum(
            kind=training.curriculum,
            num_steps=self.num_steps,
            span=training.curriculum_span(total_steps),
        )
        self.trunk_training = training.trunk
        """'joint', 'freeze_trunk' or 'detach_heads' (``MTPTrainingConfig.trunk``)."""
        self.distill_weight = training.distill_weight
        self.sequential = training.sequential_forward

    def step_weights(self, active: int | None = None) -> list[float]:
        """alpha_1..alpha_active, normalised over those (default: all K)."""
        return step_weights(self.decay, self.num_steps if active is None else active)

    def weight(self, step: int | None) -> float:
        """w(step) (``None``: the full weight)."""
        return self.schedule(step)

    def active_steps(self, step: int | None) -> int:
        """A(step) (``None``: every step)."""
        return self.curriculum.active_steps(step)

    def __call__(
        self,
        model: StepSource,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        step: int | None = None,
        *,
        return_logits: bool = True,
        return_mtp_logits: bool = False,
        extra_loss: torch.Tensor | None = None,
    ) -> MTPOutput:
        """The loss of one forward from the trunk's output z (``hidden`` [b, s, h]); the
        arguments as ``MTPModel.forward``'s; ``extra_loss``: the trunk's (ETD's depth cost)."""
        trunk = model.trunk
        normed = trunk.final_norm(hidden)  # h^0
        training = torch.is_grad_enabled()
        detach = self.trunk_training == "detach_heads" and training
        # the sequential schedule prepares a backward; evaluation takes the plain path
        sequential = self.sequential and training and not return_mtp_logits
        active = self.active_steps(step) if self.num_steps else 0
        weights = self.step_weights(active)
        steps: Iterable[tuple[int, torch.Tensor]] = ()
        if self.num_steps:
            steps = model.mtp_steps(hidden, normed, input_ids, detach=detach, checkpoint=sequential)
            steps = itertools.islice(steps, active)
        mtp = None
        if sequential and self.num_steps:  # the steps first: no main logits alive meanwhile
            loss, ce = sequential_mtp_loss(trunk, steps, labels, weights, output_grad=not detach)
            mtp = _StepLosses(loss, ce)
        logits = trunk.logits(normed)  # [b, s, V/p]
        distill = self.distill_weight if self.num_steps and training else 0.0
        # self-distillation reads the main logits after the main CE: that one may not reuse them
        main_loss = masked_cross_entropy(logits, labels, inplace=not (return_logits or distill))
        teacher = None
        if distill:  # the main head's distribution, normalised once for every head
            teacher = (logits.detach(), log_normalizer(logits.detach(), trunk.ctx.tp_group))
        out = MTPOutput(
            loss=main_loss,
            main_loss=main_loss,
            logits=logits if return_logits else None,
            depth_cost=extra_loss,
        )
        del logits  # (not kept through the steps unless returned or distilled from)
        if self.num_steps:
            if mtp is None:
                mtp = self._plain(trunk, steps, labels, weights, teacher, detach, return_mtp_logits)
            self._add_mtp(out, mtp, model, input_ids, step, active, detach, return_mtp_logits)
        if extra_loss is not None:
            out.loss = out.loss + extra_loss
        return out

    def _plain(
        self,
        trunk: DecoderTrunk,
        steps: Iterable[tuple[int, torch.Tensor]],
        labels: torch.Tensor,
        weights: list[float],
        teacher: tuple[torch.Tensor, torch.Tensor] | None,
        detach: bool,
        keep_logits: bool,
    ) -> _StepLosses:
        """Every step's logits at once (their softmax alive until backward); ``teacher``: the
        main logits [b, s, V/p] and their log-normalizer [b, s] for self-distillation (None: the
        data only)."""
        distill = self.distill_weight
        mtp = _StepLosses(torch.zeros((), device=labels.device))
        for k, hidden_k in steps:
            logits_k = trunk.logits(hidden_k, detach_weight=detach)  # [b, s, V/p]
            targets_k = step_targets(labels, k)
            if teacher is None:
                ce_k = masked_cross_entropy(logits_k, targets_k, inplace=not keep_logits)
                train_k = ce_k
            else:  # head k at i and the main head at i + k predict the same token t_{i+k+1}
                main, main_lse = teacher
                ce_k, soft_k = distilled_cross_entropy(
                    logits_k[:, :-k],
                    main[:, k:],
                    main_lse[:, k:],
                    targets_k[:, :-k],  # (the last k positions have no target)
                    trunk.ctx.tp_group,
                    inplace=not keep_logits,
                )
                train_k = (1 - distill) * ce_k + distill * soft_k
            mtp.loss = mtp.loss + weights[k - 1] * train_k
            mtp.ce[f"mtp_step_{k}"] = ce_k.detach()
            if keep_logits:
                mtp.logits.append(logits_k)
        return mtp

    def _add_mtp(
        self,
        out: MTPOutput,
        mtp: _StepLosses,
        model: StepSource,
        input_ids: torch.Tensor,
        step: int | None,
        active: int,
        detach: bool,
        keep_logits: bool,
    ) -> None:
        """``out.loss`` = main + w(step) * the MTP loss; the MTP fields of ``out``."""
        if active == 0:
            mtp.loss = torch.zeros((), device=out.main_loss.device)
            if self.chained and torch.is_grad_enabled():
                # the embedding the chained steps read still gets its (zero) gradient: a
                # pipeline's last stage all-reduces it with the first stage's tied copy
                e = model.trunk.embed(input_ids[:, :1])
                mtp.loss = 0.0 * (e.detach() if detach else e).sum()
        for k in range(active + 1, self.num_steps + 1):  # fixed-size logs (stages send them)
            mtp.ce[f"mtp_step_{k}"] = torch.zeros((), device=out.main_loss.device)
        out.mtp_weight = self.weight(step)
        out.loss = out.main_loss + out.mtp_weight * mtp.loss
        out.mtp_loss, out.mtp_step_losses, out.mtp_active_steps = mtp.loss, mtp.ce, active
        out.mtp_logits = mtp.logits if keep_logits else None


class StepMetrics:
    """The one layout of what a training step logs: ``pack`` turns a micro-batch's output into
    a float vector [loss, main, mtp, w, A, CE_1..CE_K] on its device (summed over micro-batches
    and data-parallel ranks in one all-reduce, or sent from the last pipeline stage), ``names``
    reads a reduced vector back once on the host as TensorBoard scalars."""

    FIELDS = ("loss", "main_loss", "mtp_loss", "mtp_weight", "mtp_active_steps")
    """The scalars before the K step CEs."""

    @classmethod
    def size(cls, num_steps: int) -> int:
        """Length of a packed vector for K = ``num_steps``."""
        return len(cls.FIELDS) + num_steps

    @classmethod
    def pack(cls, out: MTPOutput) -> torch.Tensor:
        """[size(K)] float32 of one micro-batch's output, detached, on the loss's device."""
        device = out.loss.device
        zero = torch.zeros((), device=device)
        mtp = out.mtp_loss.detach() if out.mtp_loss is not None else zero
        parts = [out.loss.detach(), out.main_loss.detach(), mtp]
        # host numbers filled in on the device (torch.tensor(x, device) would copy and wait)
        parts += [torch.full((), float(out.mtp_weight), device=device)]
        parts += [torch.full((), float(out.mtp_active_steps), device=device)]
        parts += [v.detach() for v in out.mtp_step_losses.values()]
        return torch.stack([p.float().reshape(()) for p in parts])

    @classmethod
    def names(cls, values: torch.Tensor, prefix: str = "train/") -> dict[str, float]:
        """A packed (reduced) vector -> {prefix + name: value}; an NTP model logs no MTP
        fields, and the CE of a step a curriculum left out of this step is not logged."""
        host = values.tolist()
        num_steps = len(host) - len(cls.FIELDS)
        named = dict(zip(cls.FIELDS, host))
        named |= {f"mtp_step_{k}": host[len(cls.FIELDS) + k - 1] for k in range(1, num_steps + 1)}
        if num_steps == 0:
            del named["mtp_loss"], named["mtp_weight"], named["mtp_active_steps"]
        else:
            active = round(named["mtp_active_steps"])  # the same on every rank and micro-batch
            for k in range(active + 1, num_steps + 1):
                del named[f"mtp_step_{k}"]
        return {prefix + name: value for name, value in named.items()}
