"""Training applied to a built model from outside, in one ordered function.

The model code (``model/``) builds the architecture only; everything that makes it trainable at
scale is applied here, in this order, each step needing what the one before left:

1. **ETD and its LoRA experts**: architecture, built by ``build_model`` from ``model.etd`` (the
   LoRA branches replace the think layers' linear modules, so they exist before anything
   wraps those layers).
2. **Activation checkpointing** (``train.mtp.gradient_checkpointing``): the trunk layers' and
   heads' classes are swapped for checkpointed ones (``model/recompute.py``); before the
   pipeline split, so every stage's layers carry it. A frozen trunk (``train.mtp.trunk:
   freeze_trunk``) stops requiring gradients here too, before DeepSpeed builds the optimizer
   from the parameters that do (so it keeps no state for the trunk).
3. **Pipeline split** (PP > 1): this rank's stage, DeepSpeed's PipelineModule over the model.
4. **DeepSpeed engine**: ZeRO partitions what it is given (the stage at PP > 1, the whole
   model otherwise), so it comes last; under ZeRO-3 the trunk learns that its weights are
   gathered per call (the sequential loss reaches W through a call then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mtp_megatron.config.train import TrainConfig
from mtp_megatron.model import MTPModel
from mtp_megatron.parallel.dims import ParallelConfig
from mtp_megatron.train.engine import build_engine
from mtp_megatron.train.pipeline_engine import PipelineSteps, build_pipeline_engine
from mtp_megatron.train.steps import SingleStageSteps, StepRunner


@dataclass
class TrainingSetup:
    """What :func:`apply_training` made."""

    engine: object
    """The DeepSpeed engine (a PipelineEngine at PP > 1)."""
    runner: StepRunner
    """Runs one optimizer step on it (``train/steps.py``)."""
    module: nn.Module
    """This rank's modules: the whole model, or its pipeline stage."""


def apply_training(
    model: MTPModel, train: TrainConfig, parallel: ParallelConfig, device: torch.device
) -> TrainingSetup:
    """Make ``model`` (built from the run's seed on every rank, ETD included) trainable on this
    rank: checkpointing, pipeline split, DeepSpeed engine, in the module doc's order."""
    # 2. sequential schedule, activation checkpointing; a curriculum spans the run by default
    model.training_config = train.mtp.with_total_steps(train.steps)
    if train.mtp.trunk == "freeze_trunk":
        model.trunk.requires_grad_(False)  # its embedding and output layer included
    k = model.mtp_cfg.num_predict_tokens if model.mtp_cfg is not None else 0
    if parallel.pipeline_parallel_size > 1:  # 3. + 4.
        engine = build_pipeline_engine(model, train, parallel.pipeline_partition, device)
        return TrainingSetup(engine, PipelineSteps(engine, k), engine.module)
    if train.zero_stage == 3:
        model.trunk.weights_gathered_per_call = True  # ZeRO-3 partitions every parameter
    engine = build_engine(model.to(device), train, device)  # 4.
    return TrainingSetup(engine, SingleStageSteps(engine, device, k), model)
