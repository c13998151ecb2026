"""Inference: KV caches, plain decoding and self-speculative decoding with the MTP heads."""

from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.sampling import SamplingConfig
from mtp_megatron.decoding.speculative import SpeculativeDecoder, generate_plain
from mtp_megatron.model.mtp_model import MTPModel

MTPModel.decoder_class = SpeculativeDecoder  # model.mtp_decoder (the guide's API)

__all__ = ["KVCacheSet", "SamplingConfig", "SpeculativeDecoder", "generate_plain"]
