"""Where model modules get their embedding and linear layers: one backend per model.

Notation: b batch, s sequence, p tensor-parallel size, i / o a linear layer's input / output
features, V padded vocabulary, h hidden.

Model code asks its :class:`LayerContext` for layers (``embedding``, ``column_linear``,
``row_linear``) and never names a concrete class, so the same module code builds with either
backend:

- ``megatron`` (training; any TP size): megatron-core's VocabParallelEmbedding and
  Column/RowParallelLinear, with their TP communication, autograd Functions and DeepSpeed
  ZeRO-3 compatibility;
- ``local`` (inference at TP=1): plain ``torch.nn`` parameters and one matmul per call, with
  each linear weight stored transposed in memory (``weight`` is still [o, i], as a view of an
  [i, o] row-major tensor): at batch 1 a CPU matmul streams the [i, o] layout about 2.5x faster
  (160 vs 418 us for a 4096 x 192 output layer, weights out of cache), and megatron's per-call
  wrappers cost more than a batch-1 matmul. Decoding at TP=1 builds its model on it.

Both backends give every parameter the same name, shape, initial value (the same seed draws
the same master weights: megatron initialises them on the CPU, whole, as ``local`` does) and
partition attributes, so a state dict moves between them unchanged. Every linear layer's call
returns one tensor (megatron's (output, bias) pair is unpacked here); a column-parallel layer
may have a bias (zero-initialised, sharded like the output features: Qwen2's q/k/v).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal, cast, get_args

import torch
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.utils import init_method_normal, scaled_init_method_normal
from torch import nn

from mtp_megatron.config import ConfigError, ModelConfig

Backend = Literal["megatron", "local"]
BACKENDS: tuple[str, ...] = get_args(Backend)

ParallelMode = Literal["column", "row"]


def megatron_parallel_config(tensor_parallel_size: int) -> ModelParallelConfig:
    """The ModelParallelConfig every megatron layer of ours is built with."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tensor_parallel_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


# -- megatron backend ----------------------------------------------------------------------------
class MegatronColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear (W [o/p, i], output left sharded) whose call returns the output."""

    parallel_mode: ParallelMode = "column"

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x, weight=weight)[0]  # [..., o/p]


class MegatronRowLinear(RowParallelLinear):
    """RowParallelLinear (W [o, i/p], sharded input, output all-reduced) returning the output."""

    parallel_mode: ParallelMode = "row"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[0]  # [..., o]


# -- local backend -------------------------------------------------------------------------------
class LocalLinear(nn.Module):
    """y = x W^T without megatron, W [o, i] stored as the transpose of a row-major [i, o] tensor.

    ``external_weight``: the layer has no weight of its own and is called with one (a tied
    output layer reads the embedding's [V, h]); outside autograd on a CPU its transpose is
    copied once per weight version, as the layer's own weight is laid out.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_method,
        parallel_mode: ParallelMode,
        partition_stride: int = 1,
        external_weight: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.input_size, self.output_size = in_features, out_features
        self.parallel_mode = parallel_mode
        self.weight: nn.Parameter | None = None
        if not external_weight:
            master = torch.empty(out_features, in_features)  # megatron's CPU init draws [o, i]
            init_method(master)
            self.weight = nn.Parameter(master.t().contiguous().t())  # [o, i], column-major
            dim = 0 if parallel_mode == "column" else 1
            set_tensor_model_parallel_attributes(self.weight, True, dim, partition_stride)
        self.bias: nn.Parameter | None = None
        if bias:  # [o], zero as megatron's; sharded with the output features
            self.bias = nn.Parameter(torch.zeros(out_features))
            set_tensor_model_parallel_attributes(self.bias, True, 0, partition_stride)
        self._external: tuple[weakref.ref, int, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            own = cast(nn.Parameter, self.weight)  # (not external: the layer's own)
            y = x @ own.t()  # [..., i] @ [i, o] (row-major unless re-laid out)
        elif torch.is_grad_enabled() or x.device.type != "cpu":
            y = F.linear(x, weight)
        else:
            y = x @ self._transposed(weight)
        return y if self.bias is None else y + self.bias

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """weight.T [i, o], contiguous, remade when the weight or its version changes."""
        cached = self._external
        if cached is None or cached[0]() is not weight or cached[1] != weight._version:
            cached = (weakref.ref(weight), weight._version, weight.detach().t().contiguous())
            self._external = cached
        return cached[2]

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, {self.parallel_mode}"


class LocalEmbedding(nn.Module):
    """Token embedding W [V, h] (row-major: one contiguous row per looked-up token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method):
        super().__init__()
        master = torch.empty(num_embeddings, embedding_dim)
        init_method(master)
        self.weight = nn.Parameter(master)
        set_tensor_model_parallel_attributes(self.weight, True, 0, 1)  # vocab-parallel's

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # [b, s] -> [b, s, h]


# -- the context model modules build from ---------------------------------------------------------
@dataclass
class LayerContext:
    """What every layer needs besides its sizes: the backend, the TP group, the init methods."""

    cfg: ModelConfig
    """The model's hyperparameters."""
    tp_group: torch.distributed.ProcessGroup
    """The tensor-parallel group, passed explicitly to every megatron layer."""
    backend: Backend = "megatron"
    """Which layers to build (see the module doc); ``local`` needs a one-rank TP group."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend={self.backend!r} is invalid: one of {BACKENDS}")
        if self.backend == "local" and self.tp_group.size() != 1:
            raise ConfigError(
                f"backend='local' builds plain torch layers for one TP rank, but the TP group "
                f"has {self.tp_group.size()} ranks: use backend='megatron' at TP > 1"
            )
        self.megatron = megatron_parallel_config(self.tp_group.size())

    @property
    def tp_size(self) -> int:
        return self.megatron.tensor_model_parallel_size

    @property
    def init(self):
        return init_method_normal(self.cfg.init_std)

    @property
    def output_init(self):
        return scaled_init_method_normal(self.cfg.init_std, self.cfg.num_layers)

    def embedding(self, num_embeddings: int, embedding_dim: int) -> nn.Module:
        """[b, s] ids -> [b, s, h]; W [V/p, h] split over the vocabulary."""
        std = self.cfg.embedding_init_std
        init = self.init if std is None else init_method_normal(std)
        if self.backend == "local":
            return LocalEmbedding(num_embeddings, embedding_dim, init)
        return VocabParallelEmbedding(
            num_embeddings,
            embedding_dim,
            init_method=init,
            config=self.megatron,
            tp_group=self.tp_group,
        )

    def column_linear(
        self,
        in_features: int,
        out_features: int,
        stride: int = 1,
        external_weight: bool = False,
        bias: bool = False,
    ) -> nn.Module:
        """in -> out/p per rank, output left sharded (``stride``: fused outputs, e.g. gate |
        up; ``external_weight``: no weight of its own, passed at call time (tied); ``bias``:
        a zero-initialised bias [out/p])."""
        if self.backend == "local":
            return LocalLinear(
                in_features, out_features, self.init, "column", stride, external_weight, bias
            )
        return MegatronColumnLinear(
            in_features,
            out_features,
            config=self.megatron,
            init_method=self.init,
            bias=bias,
            gather_output=False,
            stride=stride,
            skip_weight_param_allocation=external_weight,
            tp_group=self.tp_group,
        )

    def row_linear(self, in_features: int, out_features: int) -> nn.Module:
        """in/p per rank (a sharded input) -> out, all-reduced; no bias; the scaled output init."""
        if self.backend == "local":
            return LocalLinear(in_features, out_features, self.output_init, "row")
        return MegatronRowLinear(
            in_features,
            out_features,
            config=self.megatron,
            init_method=self.output_init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=self.tp_group,
        )
