"""Training and evaluation steps on DeepSpeed's pipeline engine (PP > 1).

One optimizer step is ``engine.train_batch``: DeepSpeed's 1F1B schedule runs ``grad_accum``
micro-batches through the stages, all-reduces the tied embedding's gradient between the first
and last stage, reduces gradients over data parallel (ZeRO 0/1) and steps. Every micro-batch is
(input_ids, (labels, input_ids)) from the same (step, micro-step, DP rank) function as the PP=1
trainer, so PP changes neither the data order nor exact resume; the step itself is set on the
last stage's module (``FinalStagePipe.step``).

The logged values (loss, main, MTP, w, CE_k) and the validation metrics exist on the last stage
only: they are averaged over its data-parallel group and broadcast over each pipeline group, so
every rank, global rank 0 (the TensorBoard writer) included, returns the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from mtp_megatron.config.train import TrainConfig
from mtp_megatron.data.loader import Batches
from mtp_megatron.model import MTPModel
from mtp_megatron.model.objective import StepMetrics
from mtp_megatron.parallel import to_device
from mtp_megatron.train.engine import deepspeed_config, lr_lambda, parameter_groups
from mtp_megatron.train.evaluate import reduce_stats
from mtp_megatron.train.pipeline import MTPPipelineModule, pipeline_topology

Batch = tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def build_pipeline_engine(
    model: MTPModel, cfg: TrainConfig, partition: str, device: torch.device
) -> deepspeed.PipelineEngine:
    """Cut ``model`` (the whole model, built from the run's seed on every rank) into this rank's
    stage and wrap it in DeepSpeed's pipeline engine."""
    # PipelineModule talks through deepspeed.comm: adopt our torch.distributed world first
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    module = MTPPipelineModule(model, pipeline_topology(), partition)
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    config = deepspeed_config(cfg, parallel_state.get_data_parallel_world_size(), device, pp)
    # TP ranks hold the same z: send it whole instead of DeepSpeed's scatter / all-gather split
    config["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
    engine, _, _, _ = deepspeed.initialize(
        model=module,  # the engine takes its mpu from the module's grid (checked = megatron's)
        model_parameters=parameter_groups(module, cfg.weight_decay),
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        dist_init_required=False,
    )
    return engine


def micro_batches(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Iterator[Batch]:
    """(input_ids, labels) pairs -> what the stages load, on ``device`` (copied without a host
    wait; DeepSpeed's own copy is then a no-op): the first stage reads input_ids, the last
    (labels, input_ids) (the heads' future tokens)."""
    for input_ids, labels in batches:
        input_ids = to_device(input_ids, device)
        yield input_ids, (to_device(labels, device), input_ids)


class PipelineSteps:
    """Train and evaluate steps of one rank's stage; every method is collective."""

    def __init__(self, engine, num_mtp_steps: int):
        self.engine = engine
        self.module: MTPPipelineModule = engine.module
        self.num_values = StepMetrics.size(num_mtp_steps)
        self._pp_group = parallel_state.get_pipeline_model_parallel_group()
        self._last_rank = parallel_state.get_pipeline_model_parallel_last_rank()
        self._dp_group = parallel_state.get_data_parallel_group()

    def train_step(self, batches: Batches, step: int, grad_accum: int) -> dict[str, float]:
        """One optimizer step; the logged values (DP mean over the step's micro-batches)."""
        pairs = (batches.batch(step, micro, grad_accum) for micro in range(grad_accum))
        final = self.module.final_stage
        if final is not None:
            final.step = step
        self.engine.train_batch(micro_batches(pairs, self.engine.device))
        values = torch.zeros(self.num_values)
        if final is not None:
            values = torch.stack(final.records).mean(dim=0)
            final.records.clear()
        values = values.to(self.engine.device)
        # sums over DP on every stage (zeros off the last one), then the last stage's to all
        dist.all_reduce(values, group=self._dp_group)
        values /= dist.get_world_size(self._dp_group)
        dist.broadcast(values, src=self._last_rank, group=self._pp_group)
        return StepMetrics.names(values.cpu())

    def evaluate(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """Validation metrics (as ``train/evaluate.py``) over this DP rank's ``batches``."""
        items = list(micro_batches(batches, self.engine.device))
        # the stages agree on activation shapes once and cache them: renegotiate around
        # evaluation, whose batches may be shaped unlike the training ones
        self.engine.reset_activation_shape()
        # bcast_loss=False: DeepSpeed's own broadcast assumes a scalar; ours sends the dict
        self.engine.eval_batch(iter(items), num_micro_batches=len(items), bcast_loss=False)
        self.engine.reset_activation_shape()
        metrics: list[dict[str, float] | None] = [None]
        final = self.module.final_stage
        if final is not None:  # every rank of this DP group is on the last stage too
            metrics[0] = reduce_stats(final.eval_sums, self._dp_group)
            final.eval_sums = {}
        dist.broadcast_object_list(metrics, src=self._last_rank, group=self._pp_group)
        assert metrics[0] is not None  # (the last stage's, broadcast)
        return metrics[0]
