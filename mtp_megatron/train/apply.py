"""Training applied to a built model from outside, in one ordered function.

The model code (``model/``) builds the architecture only; everything that makes it trainable at
scale is applied here, in this order, each step needing what the one before left:

1. **ETD and its LoRA experts**: architecture, built by ``build_model`` from ``model.etd`` (the
   LoRA branches replace the think layers' linear modules, so they exist before anything
   wraps those layers).
2. **The MTP training settings** (``train.mtp``, :func:`apply_mtp_training`): the model's
   objective (weight schedule with its switch in steps, curriculum span, distillation, detached
   heads, sequential schedule); activation checkpointing, whose trunk layers' and heads'
   classes are swapped for checkpointed ones (``model/recompute.py``) before the pipeline
   split, so every stage's layers carry it; and a frozen trunk (``freeze_trunk``), which stops
   requiring gradients before DeepSpeed builds the optimizer from the parameters that do (so
   it keeps no state for the trunk).
3. **Pipeline split** (PP > 1): this rank's stage, DeepSpeed's PipelineModule over the model.
4. **DeepSpeed engine**: ZeRO partitions what it is given (the stage at PP > 1, the whole
   model otherwise), so it comes last; under ZeRO-3 the trunk learns that its weights are
   gathered per call (the sequential loss reaches W through a call then).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from mtp_megatron.config import MTPTrainingConfig, TrainConfig
from mtp_megatron.model import MTPModel
from mtp_megatron.model.objective import MTPObjective
from mtp_megatron.model.recompute import set_activation_checkpointing
from mtp_megatron.parallel.dims import ParallelConfig

if TYPE_CHECKING:
    from mtp_megatron.train.steps import StepRunner


@dataclass
class TrainingSetup:
    """What :func:`apply_training` made."""

    engine: Any
    """The DeepSpeed engine (a PipelineEngine at PP > 1)."""
    runner: StepRunner
    """Runs one optimizer step on it (``train/steps.py``)."""
    module: Any
    """This rank's modules: the whole model, or its pipeline stage (an MTPPipelineModule)."""


def apply_mtp_training(
    model: MTPModel,
    training: MTPTrainingConfig,
    *,
    total_steps: int | None = None,
    tokens_per_step: int | None = None,
) -> MTPObjective:
    """How ``model`` trains with its MTP heads (the recipe's ``train.mtp``): its objective,
    activation checkpointing of every trunk layer and head (of none when off), and the trunk
    frozen for 'freeze_trunk'. ``total_steps``: the curriculum's default span (train.steps);
    ``tokens_per_step``: turns a weight switch given in tokens into a step. Returns the
    objective (also ``model.objective``)."""
    model.objective = MTPObjective(
        model.cfg.mtp, training, total_steps=total_steps, tokens_per_step=tokens_per_step
    )
    set_activation_checkpointing(model.trunk.layers, training.gradient_checkpointing)
    if model.mtp is not None:  # the sequential schedule recomputes the heads itself
        heads = training.gradient_checkpointing and not training.sequential_forward
        set_activation_checkpointing(model.mtp.heads, heads)
    if training.trunk == "freeze_trunk":
        model.trunk.requires_grad_(False)  # its embedding and output layer included
    return model.objective


def apply_training(
    model: MTPModel,
    train: TrainConfig,
    parallel: ParallelConfig,
    device: torch.device,
    tokens_per_step: int | None = None,
) -> TrainingSetup:
    """Make ``model`` (built from the run's seed on every rank, ETD included) trainable on this
    rank: MTP settings, checkpointing, pipeline split, DeepSpeed engine, in the module doc's
    order. ``tokens_per_step``: global batch x sequence length (a weight switch in tokens)."""
    # DeepSpeed is imported here, not with the module: apply_mtp_training needs none of it (a
    # GPU node without DeepSpeed still builds and checks models)
    from mtp_megatron.train.engine import build_engine
    from mtp_megatron.train.pipeline_engine import PipelineSteps, build_pipeline_engine
    from mtp_megatron.train.steps import SingleStageSteps

    pp = parallel.pipeline_parallel_size
    train = replace(train, zero_stage=train.resolved_zero_stage(device.type == "cuda", pp))
    # 2. the objective, checkpointing, a frozen trunk; a curriculum spans the run by default
    apply_mtp_training(model, train.mtp, total_steps=train.steps, tokens_per_step=tokens_per_step)
    if parallel.pipeline_parallel_size > 1:  # 3. + 4.
        engine = build_pipeline_engine(model, train, parallel.pipeline_partition, device)
        steps = PipelineSteps(engine, model.objective.num_steps)
        return TrainingSetup(engine, steps, engine.module)
    if train.zero_stage == 3:
        model.trunk.weights_gathered_per_call = True  # ZeRO-3 partitions every parameter
    engine = build_engine(model.to(device), train, device)  # 4.
    return TrainingSetup(engine, SingleStageSteps(engine, device), model)
