"""DeepSpeed engine set-up: ZeRO over the data-parallel group, AdamW, warm-up + cosine LR.

DeepSpeed learns the tensor-parallel layout through ``mpu``: a small adapter over megatron's
``parallel_state`` (ZeRO then shards and averages over the data-parallel group only, and the
gradient-norm clip counts TP-sharded parameters once).
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
from megatron.core import parallel_state
from torch import nn

from mtp_megatron.config import ConfigError
from mtp_megatron.config.train import TrainConfig


class MegatronMPU:
    """The ``mpu`` interface DeepSpeed asks for, answered by megatron's parallel_state."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return parallel_state.get_tensor_model_parallel_group()

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return parallel_state.get_data_parallel_group()


def deepspeed_config(
    cfg: TrainConfig,
    data_parallel_size: int,
    device: torch.device,
    pipeline_parallel_size: int = 1,
) -> dict:
    """The DeepSpeed JSON config of a run.

    Under bf16, micro-batch gradients accumulate in fp32 and the data-parallel reduction runs in
    fp32, as megatron does (DeepSpeed's default would do both in bf16): ZeRO-1 then runs
    DeepSpeed's BF16_Optimizer, ZeRO-2/3 keep fp32 gradient partitions. DeepSpeed has no fp32
    accumulation without ZeRO, so bf16 needs ZeRO >= 1."""
    bf16 = cfg.resolved_precision(device.type == "cuda") == "bf16"
    stage = cfg.resolved_zero_stage(device.type == "cuda", pipeline_parallel_size)
    if bf16 and stage == 0:
        raise ConfigError(
            "train.zero_stage=0 is invalid in bf16 (train.precision="
            f"{cfg.precision!r} on {device.type}): without ZeRO, DeepSpeed accumulates and "
            "reduces gradients in bf16; use train.zero_stage=1 (fp32 accumulation, the same "
            "memory as ZeRO-0 plus sharded optimizer states) or train.precision=fp32"
        )
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * data_parallel_size,
        "gradient_clipping": cfg.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.lr,
                "betas": list(cfg.betas),
                "eps": 1e-8,
                "weight_decay": cfg.weight_decay,
                "torch_adam": True,  # the fused CUDA / CPU-extension Adams need a compiler
            },
        },
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # we print our own progress line
        "wall_clock_breakdown": False,
    }
    if device.type == "cuda" and data_parallel_size > 1 and stage == 2:
        # reduce-scatter gradient buckets on a side stream while backward runs (ZeRO-3 does by
        # default). Not ZeRO-1: in bf16 its BF16_Optimizer all-reduces the full fp32 gradients
        # after backward whatever this says, and in fp32 the flag would double its buckets
        config["zero_optimization"]["overlap_comm"] = True
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
        config["communication_data_type"] = "fp32"
    return config


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up to 1, then cosine to min_lr_ratio at the last step."""

    def factor(step: int) -> float:
        if step < cfg.lr_warmup_steps:
            return (step + 1) / cfg.lr_warmup_steps
        span = max(1, cfg.steps - cfg.lr_warmup_steps)
        progress = min(1.0, (step - cfg.lr_warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norm weights and other vectors do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: nn.Module, cfg: TrainConfig, device: torch.device):
    """Wrap ``model`` in a DeepSpeed engine; returns the engine."""
    dp = parallel_state.get_data_parallel_world_size()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.weight_decay),
        config=deepspeed_config(cfg, dp, device),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        mpu=MegatronMPU(),
        dist_init_required=False,
    )
    return engine
