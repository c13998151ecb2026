"""Decoding at TP=2 (two gloo processes) gives the TP=1 tokens."""

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed
from tests.cases.decoding import random_prompts, tiny_mtp_model


def _decode_tp(rank, world, tp):
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel(tensor_parallel_size=tp)
    results = []
    for variant in [("transformer", True, "chained"), ("mlp", False, "independent")]:
        model = tiny_mtp_model(variant, seed=4)
        prompts = random_prompts(model.cfg, 2, 6, 9)
        out, stats = model.mtp_decoder.generate(prompts, max_new_tokens=16, lookahead=3)
        gen = torch.Generator().manual_seed(5)
        sampled, _ = model.mtp_decoder.generate(
            prompts, max_new_tokens=16, temperature=0.8, top_p=0.9, lookahead=2, generator=gen
        )
        results.append((out, sampled))
    return results


@pytest.mark.distributed
def test_tensor_parallel_decoding_equals_tp1():
    tp1 = run_distributed(_decode_tp, 1, 1)[0]
    tp2 = run_distributed(_decode_tp, 2, 2)
    for rank in range(2):
        for (g1, s1), (g2, s2) in zip(tp1, tp2[rank]):
            assert torch.equal(g1, g2)
            assert torch.equal(s1, s2)  # same RNG stream on every rank and gathered logits
