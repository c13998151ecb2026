"""Model code: the decoder trunk, MTP heads and loss (architecture only, no training code)."""

from mtp_megatron.model.mtp import MTPBlock, MTPHead
from mtp_megatron.model.mtp_model import MTPModel, MTPOutput, build_model, wrap_model_with_mtp
from mtp_megatron.model.trunk import DecoderTrunk

__all__ = [
    "DecoderTrunk",
    "MTPBlock",
    "MTPHead",
    "MTPModel",
    "MTPOutput",
    "build_model",
    "wrap_model_with_mtp",
]
