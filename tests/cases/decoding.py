"""Tiny models and prompts shared by the decoding tests of both tiers."""

import torch

from mtp_megatron import build_model
from mtp_megatron.testing.variants import mtp_config, tiny_model_config


def tiny_mtp_model(variant, seed=0, **overrides):
    cfg = tiny_model_config(mtp_config(*variant, k=3), max_seq_len=96, **overrides)
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def random_prompts(cfg, b, t, seed):
    return torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))
