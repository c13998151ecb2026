"""Typed configs, one module per recipe section, each with one ``validate()``.

- ``base``: ``ConfigError``, the value checks every section uses, the YAML -> dataclass converter;
- ``mtp``: the MTP heads (``model.mtp``) and how they train (``train.mtp``);
- ``model``: the trunk, Llama-3 RoPE scaling, Encode-Think-Decode;
- ``train``: optimisation, ZeRO, logging, evaluation, checkpoints;
- ``data``: the corpus or blend, its tokenizer, split and cache.

The process layout (``ParallelConfig``) sits beside ``ParallelDims`` in ``parallel/dims.py``.
Torch-free: recipes validate without importing the model (megatron-core takes seconds).
"""

from mtp_megatron.config.base import ConfigError, from_dict, to_dict
from mtp_megatron.config.data import BlendEntry, DataConfig
from mtp_megatron.config.model import ETDConfig, ModelConfig, RopeScalingConfig
from mtp_megatron.config.mtp import HEAD_TYPES, MTPConfig, MTPTrainingConfig
from mtp_megatron.config.train import TrainConfig

__all__ = [
    "HEAD_TYPES",
    "BlendEntry",
    "ConfigError",
    "DataConfig",
    "ETDConfig",
    "MTPConfig",
    "MTPTrainingConfig",
    "ModelConfig",
    "RopeScalingConfig",
    "TrainConfig",
    "from_dict",
    "to_dict",
]
