"""Inference: KV caches, plain decoding and self-speculative decoding with the MTP heads."""

from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.sampling import SamplingConfig
from mtp_megatron.decoding.speculative import SpeculativeDecoder, generate_plain

__all__ = ["KVCacheSet", "SamplingConfig", "SpeculativeDecoder", "generate_plain"]
