"""Inference: KV caches, plain decoding and self-speculative decoding with the MTP heads.

runner.py       the trunk forward over a KV cache, full-vocabulary logits, request checks
plain.py        plain decoding (one forward per token)
rounds.py       a speculative request's state between rounds, and a round's Draft
drafters.py     the Drafter protocol; HeadDrafter (the MTP heads, recursion past K)
verify.py       the Verifier: greedy, lossy threshold, exact speculative sampling
speculative.py  SpeculativeDecoder (model.mtp_decoder): the round loop
calibrate.py    lookahead="auto": the fastest L per batch size, measured
"""

from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.plain import generate_plain
from mtp_megatron.decoding.sampling import SamplingConfig
from mtp_megatron.decoding.speculative import SpeculativeDecoder
from mtp_megatron.model.mtp_model import MTPModel

MTPModel.decoder_class = SpeculativeDecoder  # model.mtp_decoder (the guide's API)

__all__ = ["KVCacheSet", "SamplingConfig", "SpeculativeDecoder", "generate_plain"]
