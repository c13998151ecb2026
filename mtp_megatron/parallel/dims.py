"""The process layout, validated once: world = PP x TP x DP (torch-free: recipe checks use it).

Every check of how a job's processes split into pipeline, tensor and data parallel lives here:
the recipe check (no process count yet), the launchers (``check --nproc``, ``demo``, ``sweep``),
``initialize_parallel`` and the trainer all build a :class:`ParallelDims` instead of re-deriving
sizes, so the messages and the arithmetic are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from mtp_megatron.config import ConfigError, ModelConfig, ParallelConfig


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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} is invalid: must be >= 1")
        model_parallel = self.tp * self.pp
        if isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
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
    hidden and the padded vocabulary; PP <= layers; ETD's think block inside one stage."""
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
    if model.etd is not None and pp > 1:  # the think block must not cross a stage
        model.etd.validate_pipeline(model.num_layers, pp, parallel.pipeline_partition)
        raise ConfigError(
            f"model.etd with parallel.pipeline_parallel_size={pp} is not supported yet: the "
            "pipeline stages run decoder layers one by one, not the iterated think block "
            "(and its depth cost would be lost off the last stage); use "
            "pipeline_parallel_size=1 with ETD"
        )
