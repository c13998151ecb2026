"""Model code: the decoder trunk, MTP heads and loss, the ETD wrapper (architecture only, no
training code)."""

from mtp_megatron.model.etd import ETDTrunk, wrap_transformer_with_etd
from mtp_megatron.model.mtp import MTPBlock, MTPHead
from mtp_megatron.model.mtp_model import MTPModel, MTPOutput, build_model, wrap_model_with_mtp
from mtp_megatron.model.trunk import DecoderTrunk

__all__ = [
    "DecoderTrunk",
    "ETDTrunk",
    "MTPBlock",
    "MTPHead",
    "MTPModel",
    "MTPOutput",
    "build_model",
    "wrap_model_with_mtp",
    "wrap_transformer_with_etd",
]
