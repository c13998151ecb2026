"""The language model with MTP heads: ``wrap_model_with_mtp`` and its output.

Notation: b batch, s sequence, h hidden, V padded vocabulary, p tensor-parallel size.

loss = main + w(step) * sum_k alpha_k CE_k   (w: the MTP weight's schedule, alpha: step weights,
                                             over the steps a curriculum trains at ``step``)

``MTPTrainingConfig`` picks how a training forward runs (same losses and gradients either way):
the plain path, Meta's sequential schedule (``model/sequential.py``: one step's logits alive at a
time) and/or activation checkpointing of the trunk layers and the steps' heads.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mtp_megatron.config import ModelConfig, MTPConfig, MTPTrainingConfig
from mtp_megatron.model.etd import wrap_transformer_with_etd
from mtp_megatron.model.loss import (
    IGNORE_INDEX,
    labels_from_input_ids,
    masked_cross_entropy,
    soft_cross_entropy,
    step_targets,
)
from mtp_megatron.model.mtp import MTPBlock
from mtp_megatron.model.recompute import set_activation_checkpointing
from mtp_megatron.model.sequential import sequential_mtp_loss
from mtp_megatron.model.specs import Backend
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


class MTPModel(nn.Module):
    """A decoder trunk with K MTP heads on its final stage (none: plain next-token model)."""

    def __init__(
        self,
        trunk: DecoderTrunk,
        mtp: MTPConfig | None,
        training: MTPTrainingConfig | None = None,
    ):
        super().__init__()
        self.trunk = trunk
        self.mtp_cfg = mtp
        self.mtp = MTPBlock(trunk.ctx, mtp) if mtp is not None else None
        self._step_weights = mtp.step_weights() if mtp is not None else []
        self.training_config = training or MTPTrainingConfig()

    @property
    def cfg(self) -> ModelConfig:
        return self.trunk.cfg

    @property
    def training_config(self) -> MTPTrainingConfig:
        """Sequential forward / activation checkpointing of training forwards (assignable)."""
        return self._training_config

    @training_config.setter
    def training_config(self, value: MTPTrainingConfig) -> None:
        value.validate()
        self._training_config = value
        # gradient checkpointing: every trunk layer, and every head unless the sequential
        # schedule recomputes the heads itself
        set_activation_checkpointing(self.trunk.layers, value.gradient_checkpointing)
        if self.mtp is not None:
            heads = value.gradient_checkpointing and not value.sequential_forward
            set_activation_checkpointing(self.mtp.heads, heads)

    decoder_class: ClassVar[Callable[[MTPModel], Any] | None] = None
    """What ``mtp_decoder`` builds: set by ``mtp_megatron.decoding`` when it is imported
    (inference sits above the model; ``mtp_megatron.build_model`` imports it)."""

    @property
    def mtp_decoder(self):
        """Self-speculative decoder drafting with this model's MTP heads (the guide's API);
        one per model, so that what it measured (``lookahead="auto"``) stays with it."""
        if MTPModel.decoder_class is None:
            raise RuntimeError(
                "model.mtp_decoder needs the decoding package: `import mtp_megatron.decoding` "
                "(or build the model with mtp_megatron.build_model, which does)"
            )
        decoder = self.__dict__.get("_mtp_decoder")
        if decoder is None:
            decoder = self._mtp_decoder = MTPModel.decoder_class(self)
        return decoder

    @property
    def _heads_detached(self) -> bool:
        """'detach_heads' while training: the MTP steps see no trunk tensor with a gradient."""
        return self.training_config.trunk == "detach_heads" and torch.is_grad_enabled()

    def _steps_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding as the chained steps read it (detached under 'detach_heads')."""
        e = self.trunk.embed(ids)
        return e.detach() if self._heads_detached else e

    def _steps(self, hidden, normed, input_ids, positions, checkpoint: bool):
        """(k, normalised h^k [b, s, h]) for k = 1..K from z (``hidden``) and h^0 (``normed``)."""
        trunk = self.trunk
        embed, final_norm = trunk.embed, trunk.final_norm
        if self._heads_detached:  # the trunk's tensors and weights, without their gradients
            hidden, normed = hidden.detach(), normed.detach()
            norm = trunk.final_norm

            def embed(ids: torch.Tensor) -> torch.Tensor:
                return trunk.embed(ids).detach()

            def final_norm(x: torch.Tensor) -> torch.Tensor:
                # what parameter-free heads normalise with (recipes refuse them with
                # detach_heads, a library caller may not): the trunk's norm, detached too
                return F.rms_norm(x, (x.shape[-1],), norm.weight.detach(), norm.eps)

        return self.mtp.iter_steps(
            hidden,
            normed,
            input_ids,
            embed,
            final_norm,
            trunk.rope,
            positions,
            checkpoint=checkpoint,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        step: int | None = None,
        return_mtp_logits: bool = False,
        return_logits: bool = True,
    ) -> MTPOutput:
        """input_ids, labels: [b, s]; labels[:, i] = t_{i+1} (derived from input_ids if None).

        ``step`` is the optimizer step, for the MTP weight's schedule and the curriculum
        (None: the full weight and every step).
        ``return_logits=False`` (training): the main logits are not returned, so they are not
        kept alive through backward (at 8 x 4k tokens and a 128k vocabulary that is 8.6 GB in
        bf16), and the loss may overwrite them.
        """
        trunk = self.trunk
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden, depth_cost = trunk.run_layers_with_cost(trunk.embed(input_ids), positions)  # z
        return self.final_stage(
            hidden, input_ids, labels, step, return_mtp_logits, return_logits, depth_cost
        )

    def after_optimizer_step(self) -> None:
        """Run once after every optimizer step (the trainer does; so must a custom loop): the
        ETD experts' routing bias moves by the load of the step's forwards."""
        self.trunk.after_optimizer_step()

    def final_stage(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        step: int | None = None,
        return_mtp_logits: bool = False,
        return_logits: bool = True,
        depth_cost: torch.Tensor | None = None,
    ) -> MTPOutput:
        """Everything after the trunk's layers (the last pipeline stage's work): final norm,
        main head, the MTP steps and the loss. hidden: z [b, s, h]; ``depth_cost``: the layers'
        extra loss (ETD), added to ``loss``; the rest as in forward.

        Reads the trunk's final norm, output layer and rope, and its embedding only for chained
        steps or a tied output layer.
        """
        if labels is None:
            labels = labels_from_input_ids(input_ids)
        trunk = self.trunk
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        normed = trunk.final_norm(hidden)  # h^0
        tcfg = self.training_config
        num_steps = self.mtp.num_steps if self.mtp is not None else 0
        active = tcfg.active_steps(step, num_steps, None) if self.mtp is not None else 0
        if active == num_steps:
            step_weights = self._step_weights
        else:  # a curriculum's stage: the later steps are not computed at all
            step_weights = self.mtp_cfg.step_weights_of(active)
        # the sequential schedule prepares a backward; evaluation takes the plain path
        sequential = (
            self.mtp is not None
            and tcfg.sequential_forward
            and torch.is_grad_enabled()
            and not return_mtp_logits
        )
        if sequential:
            # the steps first, their logits alive one at a time, then the main head; the heads
            # are checkpointed so that one step's activations are alive at a time too
            steps = self._steps(hidden, normed, input_ids, positions, checkpoint=True)
            mtp_loss, step_losses = sequential_mtp_loss(
                trunk,
                itertools.islice(steps, active),
                labels,
                step_weights,
                output_grad=not self._heads_detached,
            )
        logits = trunk.logits(normed)  # [b, s, V/p]
        # self-distillation reads the main logits after the main CE: that one may not reuse them
        distill = tcfg.distill_weight if self.mtp is not None and torch.is_grad_enabled() else 0.0
        main_loss = masked_cross_entropy(logits, labels, inplace=not (return_logits or distill))
        teacher = logits.detach() if distill else None
        if not return_logits:
            logits = None
        aux = depth_cost
        if self.mtp is None:
            loss = main_loss if aux is None else main_loss + aux
            return MTPOutput(loss=loss, main_loss=main_loss, logits=logits, depth_cost=aux)

        step_logits: list[torch.Tensor] = []
        if not sequential:
            mtp_loss = torch.zeros((), device=main_loss.device)
            step_losses: dict[str, torch.Tensor] = {}
            steps = self._steps(hidden, normed, input_ids, positions, checkpoint=False)
            for k, hidden_k in itertools.islice(steps, active):
                logits_k = trunk.logits(hidden_k, detach_weight=self._heads_detached)
                targets_k = step_targets(labels, k)
                if teacher is not None:  # before the CE, which may overwrite logits_k
                    # head k at i and the main head at i + k predict the same token t_{i+k+1}
                    soft_k = soft_cross_entropy(
                        logits_k[:, :-k],
                        teacher[:, k:],
                        (targets_k[:, :-k] != IGNORE_INDEX).float(),
                        trunk.ctx.tp_group,
                    )
                ce_k = masked_cross_entropy(logits_k, targets_k, inplace=not return_mtp_logits)
                train_k = ce_k if teacher is None else (1 - distill) * ce_k + distill * soft_k
                mtp_loss = mtp_loss + step_weights[k - 1] * train_k
                step_losses[f"mtp_step_{k}"] = ce_k.detach()
                if return_mtp_logits:
                    step_logits.append(logits_k)
        if active == 0:
            mtp_loss = torch.zeros((), device=main_loss.device)
            if self.mtp.chained and torch.is_grad_enabled():
                # the embedding the chained steps read still gets its (zero) gradient: a
                # pipeline's last stage all-reduces it with the first stage's tied copy
                mtp_loss = 0.0 * self._steps_embedding(input_ids[:, :1]).sum()
        for k in range(active + 1, num_steps + 1):  # fixed-size logs (pipeline stages send them)
            step_losses[f"mtp_step_{k}"] = torch.zeros((), device=main_loss.device)
        weight = self.mtp_cfg.mtp_weight(step)
        loss = main_loss + weight * mtp_loss
        return MTPOutput(
            loss=loss if aux is None else loss + aux,
            main_loss=main_loss,
            logits=logits,
            mtp_loss=mtp_loss,
            mtp_step_losses=step_losses,
            mtp_weight=weight,
            mtp_active_steps=active,
            mtp_logits=step_logits if return_mtp_logits else None,
            depth_cost=aux,
        )


def wrap_model_with_mtp(
    model: DecoderTrunk, cfg: MTPConfig, training: MTPTrainingConfig | None = None
) -> MTPModel:
    """Add MTP heads (on the model's final stage) to a trunk: the guide's entry point.

    ``training``: sequential forward / activation checkpointing (default: neither).
    """
    if isinstance(model, MTPModel):
        raise TypeError("the model already has MTP heads; wrap the trunk (model.trunk) instead")
    return MTPModel(model, cfg, training)


def build_model(
    cfg: ModelConfig, training: MTPTrainingConfig | None = None, backend: Backend = "megatron"
) -> MTPModel:
    """Trunk (ETD-wrapped when ``cfg.etd`` is set) plus the heads of ``cfg.mtp`` (none when it
    is None), on the current TP group, from ``backend``'s layers (``model/specs.py``: megatron's
    for training, 'local' plain torch ones for TP=1 inference; same parameters either way)."""
    trunk = DecoderTrunk(cfg, backend)
    if cfg.etd is not None:
        trunk = wrap_transformer_with_etd(trunk, cfg.etd)
    return MTPModel(trunk, cfg.mtp, training)
