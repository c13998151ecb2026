"""The language model with MTP heads: ``wrap_model_with_mtp`` and ``build_model``.

Notation: b batch, s sequence, h hidden, V padded vocabulary, p tensor-parallel size.

An ``MTPModel`` is a trunk, its K MTP heads (``model/mtp.py``) and the objective they are trained
with (``model/objective.py``: loss = main + w(step) * sum_k alpha_k CE_k, the weight schedule,
curricula, distillation, detached heads, the plain and the sequential schedule). The model runs
the trunk and iterates the steps; the objective scores them. Training settings reach it from
outside (``train/apply.py``: ``apply_mtp_training``), never through the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from mtp_megatron.config import ModelConfig, MTPConfig
from mtp_megatron.model.etd import wrap_transformer_with_etd
from mtp_megatron.model.loss import labels_from_input_ids
from mtp_megatron.model.mtp import MTPBlock
from mtp_megatron.model.objective import MTPObjective, MTPOutput
from mtp_megatron.model.specs import Backend
from mtp_megatron.model.trunk import DecoderTrunk

__all__ = ["MTPModel", "MTPOutput", "build_model", "wrap_model_with_mtp"]


class MTPModel(nn.Module):
    """A decoder trunk with K MTP heads on its final stage (none: plain next-token model)."""

    def __init__(self, trunk: DecoderTrunk, mtp: MTPConfig | None):
        super().__init__()
        if trunk.cfg.mtp is not mtp:  # one MTP config per model: the model config's
            trunk.cfg = replace(trunk.cfg, mtp=mtp)
        self.trunk = trunk
        self.mtp = MTPBlock(trunk.ctx, mtp) if mtp is not None else None
        self.objective = MTPObjective(mtp)
        """What a forward's loss is (``train/apply.py`` sets the run's: schedule, curriculum,
        distillation, detached heads, sequential schedule)."""

    @property
    def cfg(self) -> ModelConfig:
        """The model's config; ``cfg.mtp`` is its heads' (None: no heads)."""
        return self.trunk.cfg

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

    def mtp_steps(
        self,
        hidden: torch.Tensor,
        normed: torch.Tensor,
        input_ids: torch.Tensor,
        *,
        detach: bool = False,
        checkpoint: bool = False,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(k, normalised h^k [b, s, h]) for k = 1..K over a training sequence, from z
        (``hidden``) and h^0 (``normed``). ``detach``: the steps read the trunk's tensors and
        weights without their gradients (so only the heads learn from what follows);
        ``checkpoint``: each step's head is recomputed in backward."""
        trunk, mtp = self.trunk, self.mtp
        assert mtp is not None, "a model without MTP heads has no MTP steps"
        embed: Callable[[torch.Tensor], torch.Tensor] = trunk.embed
        final_norm: Callable[[torch.Tensor], torch.Tensor] = trunk.final_norm
        if detach:
            hidden, normed = hidden.detach(), normed.detach()
            norm = trunk.final_norm
            norm_weight = cast(torch.Tensor, norm.weight).detach()

            def embed(ids: torch.Tensor) -> torch.Tensor:
                return trunk.embed(ids).detach()

            def final_norm(x: torch.Tensor) -> torch.Tensor:
                # what parameter-free heads normalise with (recipes refuse them with
                # detach_heads, a library caller may not): the trunk's norm, detached too
                return F.rms_norm(x, (x.shape[-1],), norm_weight, norm.eps)

        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return mtp.iter_steps(
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
        main head, the MTP steps and the objective. hidden: z [b, s, h]; ``depth_cost``: the
        layers' extra loss (ETD), added to ``loss``; the rest as in forward.

        Reads the trunk's final norm, output layer and rope, and its embedding only for chained
        steps or a tied output layer.
        """
        if labels is None:
            labels = labels_from_input_ids(input_ids)
        return self.objective(
            self,
            hidden,
            input_ids,
            labels,
            step,
            return_logits=return_logits,
            return_mtp_logits=return_mtp_logits,
            extra_loss=depth_cost,
        )


def wrap_model_with_mtp(model: DecoderTrunk, cfg: MTPConfig) -> MTPModel:
    """Add MTP heads (on the model's final stage) to a trunk: the guide's entry point.

    Trained as it is, the loss is the config's (full weight without a step, w(step) with one);
    ``mtp_megatron.train.apply.apply_mtp_training`` sets how it trains (sequential forward,
    activation checkpointing, curricula, distillation, a frozen trunk or detached heads). The
    trunk becomes the model's: its ``cfg.mtp`` is set to ``cfg`` (the model's one MTP config).
    """
    if isinstance(model, MTPModel):
        raise TypeError("the model already has MTP heads; wrap the trunk (model.trunk) instead")
    return MTPModel(model, cfg)


def build_model(cfg: ModelConfig, backend: Backend = "megatron") -> MTPModel:
    """Trunk (ETD-wrapped when ``cfg.etd`` is set) plus the heads of ``cfg.mtp`` (none when it
    is None), on the current TP group, from ``backend``'s layers (``model/specs.py``: megatron's
    for training, 'local' plain torch ones for TP=1 inference; same parameters either way)."""
    trunk = DecoderTrunk(cfg, backend)
    if cfg.etd is not None:
        trunk = wrap_transformer_with_etd(trunk, cfg.etd)
    return MTPModel(trunk, cfg.mtp)
