"""The process layout, validated once: world = PP x TP x DP (torch-free: recipe checks use it).

Every check of how a job's processes split into pipeline, tensor and data parallel lives here:
the recipe check (no process count yet), the launchers (``check --nproc``, ``demo``, ``sweep``),
``initialize_parallel`` and the trainer all build a :class:`ParallelDims` instead of re-deriving
sizes, so the messages and the arithmetic are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mtp_megatron.config.base import ConfigError, check_choice, check_int, is_int
from mtp_megatron.config.model import ModelConfig

PipelinePartition = Literal["uniform", "parameters"]
"""How decoder layers are split over pipeline stages (``train/pipeline_layout.py``)."""


@dataclass(kw_only=True)
class ParallelConfig:
    """How the world is split: world = pipeline x tensor x data parallel (a recipe's
    ``parallel`` section; the data-parallel size is what the process count leaves)."""

    tensor_parallel_size: int = 1
    """Megatron TP: processes that shard each layer."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (the MTP heads sit on the last one)."""
    pipeline_partition: PipelinePartition = "uniform"
    """How decoder layers are split over stages: 'uniform' (equal layer counts) or 'parameters'
    (balance parameters, counting the embedding on the first stage and the output layer + MTP
    heads on the last); every stage keeps at least one decoder layer."""

    def validate(self, path: str = "parallel") -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            check_int(f"{path}.{name}", getattr(self, name), 1, "must be a positive integer")
        check_choice(f"{path}.pipeline_partition", self.pipeline_partition, PipelinePartition)


@dataclass(frozen=True)
class ParallelDims:
    """How ``world`` processes split: ``pp`` stages x ``tp`` shards x ``dp`` replicas."""

    world: int
    """Processes in the job (NPROC x NNODES)."""
    tp: int
    """Tensor-parallel size: processes sharding each layer."""
    pp: int
    """Pipeline stages."""

    def __post_init__(self) -> None:
        for name, value in (("tensor_parallel_size", self.tp), ("pipeline_parallel_size", self.pp)):
            check_int(f"parallel.{name}", value, 1, "must be >= 1")
        model_parallel = self.tp * self.pp
        if not is_int(self.world) or self.world < 1:
            raise ConfigError(
                f"{self.world!r} processes is invalid: launch at least one process "
                f"(a multiple of PP {self.pp} x TP {self.tp} = {model_parallel}: NPROC x NNODES)"
            )
        if self.world % model_parallel:
            lower = self.world // model_parallel * model_parallel
            options = [n for n in (lower, lower + model_parallel) if n > 0]
            raise ConfigError(
                f"{self.world} processes cannot be split into tensor_parallel_size "
                f"({self.tp}) x pipeline_parallel_size ({self.pp}) x data parallel: world = "
                f"PP x TP x DP needs a multiple of {self.pp} x {self.tp} = {model_parallel} "
                f"({self.world} / {model_parallel} = {self.world / model_parallel:g}); launch "
                f"{' or '.join(map(str, options))} processes (NPROC x NNODES), or change the "
                "parallel sizes"
            )

    @property
    def dp(self) -> int:
        """Data-parallel replicas (ZeRO shards over these)."""
        return self.world // (self.tp * self.pp)

    @classmethod
    def from_config(cls, parallel: ParallelConfig, world: int) -> ParallelDims:
        return cls(
            world=world, tp=parallel.tensor_parallel_size, pp=parallel.pipeline_parallel_size
        )

    def describe(self) -> str:
        return f"world={self.world} = PP {self.pp} x TP {self.tp} x DP {self.dp}"


def check_model_layout(model: ModelConfig, parallel: ParallelConfig) -> None:
    """What the model needs of TP and PP, whatever the world: TP divides heads, kv heads, ffn,
    hidden and the padded vocabulary; PP <= layers; no ETD at PP > 1."""
    ParallelDims(
        world=parallel.tensor_parallel_size * parallel.pipeline_parallel_size,
        tp=parallel.tensor_parallel_size,
        pp=parallel.pipeline_parallel_size,
    )
    model.validate(tensor_parallel_size=parallel.tensor_parallel_size)
    pp = parallel.pipeline_parallel_size
    if pp > model.num_layers:
        raise ConfigError(
            f"parallel.pipeline_parallel_size={pp} is invalid with model.num_layers="
            f"{model.num_layers}: every pipeline stage needs at least one decoder layer; "
            f"use at most {model.num_layers} stages or more layers"
        )
    if model.etd is not None and pp > 1:
        raise ConfigError(
            f"model.etd with parallel.pipeline_parallel_size={pp} is not supported yet: the "
            "pipeline stages run decoder layers one by one, not the iterated think block "
            "(and its depth cost would be lost off the last stage); use "
            "pipeline_parallel_size=1 with ETD"
        )
