"""mtp-megatron: Multi-Token Prediction and Encode-Think-Decode recipes on megatron-core."""

import warnings

# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
# DeepSpeed's ZeRO calls a torch.distributed collective that torch 2.13 marks deprecated.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated.*")

from mtp_megatron.config import (  # noqa: E402
    ConfigError,
    ETDConfig,
    ModelConfig,
    MTPConfig,
    MTPTrainingConfig,
)

# The model classes import torch and megatron-core (seconds); recipe checks do not need them, so
# they are imported on first use (PEP 562).
_FROM_MODEL = (
    "DecoderTrunk",
    "MTPModel",
    "MTPOutput",
    "build_model",
    "wrap_model_with_mtp",
    "wrap_transformer_with_etd",
)


def __getattr__(name: str):
    if name in _FROM_MODEL:
        from mtp_megatron import decoding, model  # decoding: model.mtp_decoder

        del decoding
        return getattr(model, name)
    raise AttributeError(f"module 'mtp_megatron' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DecoderTrunk",
    "ETDConfig",
    "MTPConfig",
    "MTPModel",
    "MTPOutput",
    "MTPTrainingConfig",
    "ModelConfig",
    "build_model",
    "wrap_model_with_mtp",
    "wrap_transformer_with_etd",
]
__version__ = "0.1.0"
