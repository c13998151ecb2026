"""Our chained transformer heads against megatron-core's own MultiTokenPredictionBlock.

megatron's GPTModel with ``mtp_num_layers`` runs on CPU once ``torch.cuda.current_device`` returns
the CPU and the CUDA RNG tracker's fork is a no-op (dropout is 0, so that is exact). Both patches
live only in a spawned process. We copy megatron's weights into our model (pre-norm layers, as
megatron's local spec) and compare the main loss, each MTP depth's loss, and every gradient of the
objective megatron optimises: main + (scale / D) * sum_k CE_k, which is ours with beta = 1
(alpha_k = 1/K) and w = scale.
"""

import contextlib

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import randomize_norm_weights

pytestmark = pytest.mark.distributed

VOCAB, HIDDEN, FFN, LAYERS, HEADS, GROUPS, SEQ, BATCH = 64, 32, 64, 2, 4, 2, 16, 2
EPS, MTP_SCALE = 1e-5, 0.1


def _megatron_gpt(depth: int):
    import torch.nn.functional as F
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=HIDDEN,
        ffn_hidden_size=FFN,
        num_attention_heads=HEADS,
        num_query_groups=GROUPS,
        use_cpu_initialization=True,
        normalization="RMSNorm",
        layernorm_epsilon=EPS,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        qk_layernorm=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mtp_num_layers=depth,
        mtp_loss_scaling_factor=MTP_SCALE,
    )
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        rotary_base=10000,
        share_embeddings_and_output_weights=False,
        mtp_block_spec=get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False),
    )


def _layer_map(src: str, dst: str) -> dict[str, str]:
    """megatron local-spec layer -> our pre-norm TransformerLayer (qkv handled separately)."""
    return {
        src + "input_layernorm.weight": dst + "attention.norm.weight",
        src + "self_attention.q_layernorm.weight": dst + "attention.inner.q_norm.weight",
        src + "self_attention.k_layernorm.weight": dst + "attention.inner.k_norm.weight",
        src + "self_attention.linear_proj.weight": dst + "attention.inner.o_proj.weight",
        src + "pre_mlp_layernorm.weight": dst + "mlp.norm.weight",
        src + "mlp.linear_fc1.weight": dst + "mlp.inner.gate_up.weight",  # [gate; up] both
        src + "mlp.linear_fc2.weight": dst + "mlp.inner.down.weight",
    }


def _split_qkv(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused qkv rows are grouped per kv group: [q heads of the group | k | v]."""
    d, per = HIDDEN // HEADS, HEADS // GROUPS
    w = w.view(GROUPS, (per + 2) * d, HIDDEN)
    q = w[:, : per * d].reshape(HEADS * d, HIDDEN)
    k = w[:, per * d : (per + 1) * d].reshape(GROUPS * d, HIDDEN)
    v = w[:, (per + 1) * d :].reshape(GROUPS * d, HIDDEN)
    return q, k, v


def _compare_with_megatron(rank: int, world: int, depth: int):
    from megatron.core import tensor_parallel
    from megatron.core.transformer.multi_token_prediction import (
        MTPLossAutoScaler,
        MTPLossLoggingHelper,
    )

    from mtp_megatron import ModelConfig, MTPConfig, build_model
    from mtp_megatron.parallel import initialize_parallel

    initialize_parallel()
    torch.cuda.current_device = lambda: torch.device("cpu")  # this spawned process only
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()

    torch.manual_seed(1234)
    meg = _megatron_gpt(depth)
    randomize_norm_weights(meg)  # megatron norm weights start at 1; make them matter
    meg.train()  # megatron logs MTP losses in training mode only

    cfg = ModelConfig(
        vocab_size=VOCAB,
        vocab_pad_multiple=VOCAB,
        hidden_size=HIDDEN,
        num_layers=LAYERS,
        num_attention_heads=HEADS,
        num_kv_heads=GROUPS,
        ffn_hidden_size=FFN,
        max_seq_len=SEQ,
        norm_eps=EPS,
        norm_placement="pre",
        mtp=MTPConfig(
            num_predict_tokens=depth,
            mtp_head_type="transformer",
            share_weights_across_steps=False,
            head_arrangement="chained",
            loss_weight_decay=1.0,
            mtp_loss_weight=MTP_SCALE,
            speculation_lookahead=depth,
        ),
    )
    ours = build_model(cfg)

    names = {
        "embedding.word_embeddings.weight": "trunk.embedding.weight",
        "decoder.final_layernorm.weight": "trunk.final_norm.weight",
        "output_layer.weight": "trunk.output_layer.weight",
    }
    qkv = {}
    for i in range(LAYERS):
        names.update(_layer_map(f"decoder.layers.{i}.", f"trunk.layers.{i}."))
        qkv[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = f"trunk.layers.{i}."
    for k in range(depth):
        src, dst = f"mtp.layers.{k}.", f"mtp.heads.{k}."
        for part, mine in [
            ("enorm", "enorm"),
            ("hnorm", "hnorm"),
            ("eh_proj", "eh_proj"),
            ("final_layernorm", "final_norm"),
        ]:
            names[f"{src}{part}.weight"] = f"{dst}{mine}.weight"
        names.update(_layer_map(src + "transformer_layer.", dst + "block."))
        qkv[src + "transformer_layer.self_attention.linear_qkv.weight"] = dst + "block."
    meg_params = dict(meg.named_parameters())
    our_params = dict(ours.named_parameters())
    with torch.no_grad():
        for src, dst in names.items():
            our_params[dst].copy_(meg_params[src])
        for src, dst in qkv.items():
            for part, w in zip("qkv", _split_qkv(meg_params[src])):
                our_params[f"{dst}attention.inner.{part}_proj.weight"].copy_(w)
    copied = set(names.values()) | {
        f"{d}attention.inner.{p}_proj.weight" for d in qkv.values() for p in "qkv"
    }
    assert copied == set(our_params), set(our_params) ^ copied  # every weight mapped, once

    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)  # True: masked

    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    meg_main = meg(input_ids, positions, causal, labels=labels).mean()  # [b, s] -> mean
    meg_main.backward()  # megatron adds (scale / D) * sum_k CE_k to this gradient by itself
    meg_steps = MTPLossLoggingHelper.tracker["values"].clone()

    out = ours(input_ids, labels=labels)
    out.loss.backward()
    grads = {dst: (our_params[dst].grad, meg_params[src].grad) for src, dst in names.items()}
    for src, dst in qkv.items():
        mine = torch.cat(
            [
                our_params[f"{dst}attention.inner.{p}_proj.weight"].grad.view(GROUPS, -1, HIDDEN)
                for p in ("q", "k", "v")
            ],
            dim=1,
        ).view(-1, HIDDEN)
        grads[dst + "qkv"] = (mine, meg_params[src].grad)
    return {
        "main": (out.main_loss.detach(), meg_main.detach()),
        "steps": [(out.mtp_step_losses[f"mtp_step_{k + 1}"], meg_steps[k]) for k in range(depth)],
        "grads": grads,
    }


@pytest.mark.parametrize("depth", [1, 2])
def test_chained_transformer_heads_match_megatron_mtp(depth):
    result = run_distributed(_compare_with_megatron, 1, depth)[0]
    # Same fp32 math in a different operation order (fused vs separate qkv, our RoPE table in
    # float64 then rounded): agreement to ~1e-6, far below the gap any wiring mistake leaves.
    ours, theirs = result["main"]
    assert_close_to_scale(ours, theirs, VALUE_RTOL)
    assert len(result["steps"]) == depth
    for ours, theirs in result["steps"]:
        assert_close_to_scale(ours, theirs, VALUE_RTOL)
    for name, (ours, theirs) in result["grads"].items():
        assert_close_to_scale(ours, theirs, msg=name)
