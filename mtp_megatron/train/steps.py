"""Step runners: one optimizer step and one evaluation, behind one interface for PP=1 and PP>1.

The training loop (``train/trainer.py``) calls ``train_step`` and ``evaluate`` and never looks at
how the stages are laid out: :class:`SingleStageSteps` (PP=1, a DeepSpeed engine over the whole
model) lives here, ``PipelineSteps`` (PP>1, DeepSpeed's pipeline engine) in
``train/pipeline_engine.py``. Both return the same metrics: the DP mean of the step's
micro-batches, read by the host once per step, identical on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mtp_megatron.data.loader import Batches
from mtp_megatron.model.etd import etd_metrics
from mtp_megatron.model.objective import StepMetrics
from mtp_megatron.parallel import to_device
from mtp_megatron.train.evaluate import evaluate


class StepRunner(Protocol):
    """What the training loop needs of a parallel layout; every method is collective."""

    engine: object
    """The DeepSpeed engine (checkpoints, LR, grad norm, skipped steps)."""

    def train_step(self, batches: Batches, step: int, grad_accum: int) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; its logged values."""

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Validation metrics (``train/evaluate.py``) over this DP rank's ``batches``."""


class SingleStageSteps:
    """PP=1: every rank runs the whole model; DeepSpeed accumulates and steps."""

    def __init__(self, engine, device: torch.device):
        self.engine = engine
        self.device = device
        self._dp_group = parallel_state.get_data_parallel_group()

    def train_step(self, batches: Batches, step: int, grad_accum: int) -> dict[str, float]:
        engine, sums = self.engine, None
        for micro in range(grad_accum):
            input_ids, labels = batches.batch(step, micro, grad_accum)
            out = engine(
                to_device(input_ids, self.device),
                labels=to_device(labels, self.device),
                step=step,
                return_logits=False,
            )
            engine.backward(out.loss)
            engine.step()  # DeepSpeed applies the update at the accumulation boundary
            values = StepMetrics.pack(out)
            sums = values if sums is None else sums + values
        engine.module.after_optimizer_step()  # once per step: ETD's routing bias
        # mean over micro-batches and data-parallel ranks, in one all-reduce
        assert sums is not None  # (grad_accum >= 1)
        sums = sums / (grad_accum * dist.get_world_size(self._dp_group))
        dist.all_reduce(sums, group=self._dp_group)
        metrics = StepMetrics.names(sums)
        metrics.update(etd_metrics(engine.module, "train/"))  # last micro-batch, this rank
        return metrics

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        on_device = ((to_device(i, self.device), to_device(y, self.device)) for i, y in batches)
        return evaluate(self.engine.module, on_device)
