"""Probe: how megatron-core 0.16.1 computes its Multi-Token-Prediction (MTP) loss.

Builds a tiny megatron ``GPTModel`` with an MTP block on CPU (single process,
gloo world size 1), runs forward/backward, pulls out the main LM per-token loss
and the raw per-step MTP cross entropy, and re-derives both -- plus every
parameter gradient -- in plain PyTorch from the model's own ``state_dict``.

Run from the repository root:  python tests/_megatron_mtp_probe.py
Exit code 0 means every check matched (fp32, tolerance ~1e-5).

Cases run (each builds a fresh model with its own random weights):
  * mtp_num_layers=1, megatron's own DotProductAttention   (the main probe)
  * mtp_num_layers=1, core attention swapped for an SDPA module
  * mtp_num_layers=2, DotProductAttention                  (checks the chaining)

Layout notes: megatron activations are [s, b, h] (sequence first); input_ids,
position_ids, labels, loss_mask and the per-token loss megatron returns are
[b, s]. The plain re-implementation below works in [b, s, h].
"""

import contextlib
import math
import socket
import sys
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")  # megatron warns loudly about missing TE / apex

# ----------------------------------------------------------------------------
# CPU monkeypatches -- these must run before any megatron module is built.
# ----------------------------------------------------------------------------
# (1) megatron allocates buffers on ``torch.cuda.current_device()`` in many places
#     (global memory buffer used by DotProductAttention, MTP loss tracker,
#     RotaryEmbedding.get_emb moves inv_freq there, ...). Returning a CPU device
#     makes all of those allocate on CPU.
torch.cuda.current_device = lambda: torch.device("cpu")

import torch.distributed as dist  # noqa: E402

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import (  # noqa: E402
    get_gpt_layer_local_spec,
    get_gpt_mtp_block_spec,
)
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.multi_token_prediction import (  # noqa: E402
    MTPLossAutoScaler,
    MTPLossLoggingHelper,
)
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

# Tiny model hyper-parameters.
VOCAB, HIDDEN, FFN, LAYERS, HEADS, GROUPS, SEQ, BATCH = 64, 32, 64, 2, 4, 2, 16, 2
HEAD_DIM = HIDDEN // HEADS
EPS = 1e-5  # TransformerConfig.layernorm_epsilon default; used by every RMSNorm
ROPE_BASE = 10000.0
MTP_SCALE = 0.1  # TransformerConfig.mtp_loss_scaling_factor default


def init_single_process_distributed():
    """(2) gloo process group of world size 1 + megatron's model-parallel state."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    parallel_state.initialize_model_parallel(1, 1)
    # (3) Do NOT call model_parallel_cuda_manual_seed (it needs CUDA RNG).
    #     DotProductAttention (and sequence-parallel paths) enter
    #     ``get_cuda_rng_tracker().fork()``, which raises "cuda rng state
    #     model-parallel-rng is not added" without it. Dropout is 0 here, so a
    #     no-op fork is exact.
    tensor_parallel.get_cuda_rng_tracker().fork = (
        lambda *args, **kwargs: contextlib.nullcontext()
    )


class SDPACoreAttention(MegatronModule):
    """Optional drop-in for megatron's DotProductAttention (same call signature).

    Megatron hands core attention query [sq, b, np, hn], key/value
    [sk, b, ng, hn] (after qk-norm and RoPE) and a bool mask where True means
    "masked out"; it expects [sq, b, np*hn] back.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__(config=config)
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        rep = query.size(2) // key.size(2)
        key = key.repeat_interleave(rep, dim=2)  # GQA: head j uses kv group j // rep
        value = value.repeat_interleave(rep, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=~attention_mask, scale=self.softmax_scale
        )
        sq, b, np_, hn = query.shape
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)


def build_model(mtp_num_layers, use_sdpa):
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
        mtp_num_layers=mtp_num_layers,
        mtp_loss_scaling_factor=MTP_SCALE,
    )
    # The local spec supports qk_layernorm (per-head RMSNorm on q and k).
    layer_spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
    if use_sdpa:
        layer_spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    # The MTP layer's inner transformer layer re-uses the (last) decoder layer spec.
    mtp_spec = get_gpt_mtp_block_spec(config, layer_spec, use_transformer_engine=False)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        rotary_base=int(ROPE_BASE),
        share_embeddings_and_output_weights=False,
        mtp_block_spec=mtp_spec,
    )
    # Re-initialise with larger, non-trivial values (norm weights default to 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif "word_embeddings" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    return model


# ----------------------------------------------------------------------------
# Plain-PyTorch re-implementation ([b, s, h] layout), from state_dict tensors.
# ----------------------------------------------------------------------------
def rms_norm(x, w):
    """torch.nn.RMSNorm: x / sqrt(mean(x^2, -1) + eps) * w (no bias)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rope_cos_sin(seq_len):
    """Megatron RotaryEmbedding, rotary_percent=1, non-interleaved (NeoX/HF-Llama style).

    inv_freq[i] = base^(-2i/hd); angle[t, i] = t * inv_freq[i];
    emb = cat(angle, angle) over the last dim -> all hd dims rotate.
    Positions are 0..s-1 (position_ids are NOT used for RoPE).
    """
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)  # [s, hd]
    return emb.cos()[None, :, None, :], emb.sin()[None, :, None, :]  # [1, s, 1, hd]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def attention(x, P, pre):
    """Megatron SelfAttention (no biases), x: [b, s, h] (already input_layernorm'ed)."""
    b, s, _ = x.shape
    q_per_g = HEADS // GROUPS
    # linear_qkv.weight: [ng * (q_per_g + 2) * hd, h]; rows grouped per kv group as
    # [q heads of the group (q_per_g*hd) | k (hd) | v (hd)], group after group.
    qkv = (x @ P[pre + "linear_qkv.weight"].T).view(b, s, GROUPS, (q_per_g + 2) * HEAD_DIM)
    q = qkv[..., : q_per_g * HEAD_DIM].reshape(b, s, HEADS, HEAD_DIM)  # head = g*q_per_g + j
    k = qkv[..., q_per_g * HEAD_DIM : (q_per_g + 1) * HEAD_DIM]  # [b, s, ng, hd]
    v = qkv[..., (q_per_g + 1) * HEAD_DIM :]
    # qk-norm: RMSNorm over head_dim, one weight [hd] shared by all heads; BEFORE RoPE.
    q = rms_norm(q, P[pre + "q_layernorm.weight"])
    k = rms_norm(k, P[pre + "k_layernorm.weight"])
    cos, sin = rope_cos_sin(s)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k = k.repeat_interleave(q_per_g, dim=2)
    v = v.repeat_interleave(q_per_g, dim=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, nh, s, hd]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
    ctx = (probs @ v).transpose(1, 2).reshape(b, s, HEADS * HEAD_DIM)  # heads concatenated
    return ctx @ P[pre + "linear_proj.weight"].T


def transformer_layer(x, P, pre):
    """Pre-norm block: x + attn(norm(x)); then h + mlp(norm(h)). No final norm inside."""
    h = x + attention(rms_norm(x, P[pre + "input_layernorm.weight"]), P, pre + "self_attention.")
    y = rms_norm(h, P[pre + "pre_mlp_layernorm.weight"])
    # linear_fc1.weight: [2*ffn, h] = [gate ; up]; SwiGLU = silu(gate) * up.
    gate, up = (y @ P[pre + "mlp.linear_fc1.weight"].T).chunk(2, dim=-1)
    return h + (F.silu(gate) * up) @ P[pre + "mlp.linear_fc2.weight"].T


def shift_left(t, n=1):
    """megatron roll_tensor (CP=1, unpacked): torch.roll(t, -1, -1) and zero the
    wrapped-around last column; applied n times for MTP depth n."""
    for _ in range(n):
        t = torch.roll(t, shifts=-1, dims=-1)
        t[..., -1] = 0
    return t


def plain_forward(P, input_ids, labels, loss_mask, mtp_num_layers):
    """Returns main per-token CE [b, s] and a list of MTP per-token CE [b, s] (unmasked)."""
    emb_w, out_w = P["embedding.word_embeddings.weight"], P["output_layer.weight"]

    def ce(h, lbl):  # output layer (no bias) + plain cross entropy, per token
        logits = h @ out_w.T
        return F.cross_entropy(logits.flatten(0, 1), lbl.flatten(), reduction="none").view(lbl.shape)

    x = emb_w[input_ids]  # no embedding scaling; no absolute position embedding with RoPE
    for i in range(LAYERS):
        x = transformer_layer(x, P, f"decoder.layers.{i}.")
    hidden = rms_norm(x, P["decoder.final_layernorm.weight"])  # this is also what MTP gets
    main_ce = ce(hidden, labels)

    mtp_ce = []
    for k in range(mtp_num_layers):
        pre = f"mtp.layers.{k}."
        ids_k = shift_left(input_ids.clone(), k + 1)  # token t+k+1 at position t (0-padded)
        e = rms_norm(emb_w[ids_k], P[pre + "enorm.weight"])
        h = rms_norm(hidden, P[pre + "hnorm.weight"])
        x = torch.cat((e, h), dim=-1) @ P[pre + "eh_proj.weight"].T  # order: [embedding, hidden]
        x = transformer_layer(x, P, pre + "transformer_layer.")
        hidden = rms_norm(x, P[pre + "final_layernorm.weight"])  # fed to next MTP depth as-is
        mtp_ce.append(ce(hidden, shift_left(labels.clone(), k + 1)))
    return main_ce, mtp_ce


# ----------------------------------------------------------------------------
# One probe case.
# ----------------------------------------------------------------------------
def run_case(mtp_num_layers, use_sdpa, seed):
    torch.manual_seed(seed)
    model = build_model(mtp_num_layers, use_sdpa)
    model.train()  # the MTP logging helper only records in training mode

    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    input_ids, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    # bool [1, 1, s, s], True = masked out. Must be passed: with None the local
    # softmax builds its default causal mask with device="cuda".
    attention_mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    loss_mask = torch.ones(BATCH, SEQ)
    loss_mask[1, -4:] = 0.0  # pretend sample 1 ends with padding

    # Capture every cross-entropy call: MTP depths 1..D are computed first (with
    # already-rolled labels), the main LM loss last.
    ce_calls = []
    orig_ce = model.compute_language_model_loss

    def recording_ce(lbl, logits):
        loss = orig_ce(lbl, logits)
        ce_calls.append((lbl.detach().clone(), loss.detach().clone()))
        return loss

    model.compute_language_model_loss = recording_ce
    MTPLossLoggingHelper.tracker.clear()
    MTPLossAutoScaler.set_loss_scale(torch.tensor(1.0))

    main_loss = model(
        input_ids, position_ids, attention_mask, labels=labels, loss_mask=loss_mask
    )  # [b, s] per-token main CE, NOT masked; MTP loss rides along via autograd only
    total = (main_loss * loss_mask).sum() / loss_mask.sum()
    total.backward()

    assert len(ce_calls) == mtp_num_layers + 1
    mtp_tracked = MTPLossLoggingHelper.tracker["values"].clone()  # per-depth masked mean

    # --- plain recomputation on identical weights ---
    P = {k: v.detach().clone().requires_grad_(True)
         for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    plain_main, plain_mtp = plain_forward(P, input_ids, labels, loss_mask, mtp_num_layers)
    plain_total = (plain_main * loss_mask).sum() / loss_mask.sum()
    for k in range(mtp_num_layers):
        mask_k = shift_left(loss_mask.clone(), k + 1)  # rolled mask, last k+1 cols zero
        mtp_mean = (plain_mtp[k] * mask_k).sum() / mask_k.sum()
        meg_lbl, meg_ce = ce_calls[k]
        # labels megatron used at depth k+1 == labels shifted left k+1, zero-filled
        assert torch.equal(meg_lbl, shift_left(labels.clone(), k + 1)), "label roll differs"
        # per-token MTP CE [b, s], unmasked (the padded last column holds CE vs label 0)
        torch.testing.assert_close(meg_ce, plain_mtp[k].detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mtp_tracked[k], mtp_mean.detach(), atol=1e-5, rtol=1e-5)
        # MTPLossAutoScaler injects grad == main_loss_backward_scale (1.0) into
        # (mtp_loss_scaling_factor / D) * masked_mean, whatever the main loss reduction.
        plain_total = plain_total + (MTP_SCALE / mtp_num_layers) * mtp_mean
        print(f"    MTP depth {k + 1}: megatron masked-mean CE {mtp_tracked[k].item():.6f}"
              f" | plain {mtp_mean.item():.6f} | (masked tokens: {int((mask_k == 0).sum())})")
    torch.testing.assert_close(ce_calls[-1][1], plain_main.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(main_loss.detach(), plain_main.detach(), atol=1e-5, rtol=1e-5)
    print(f"    main LM   : megatron masked-mean CE {total.item():.6f} | plain "
          f"{((plain_main * loss_mask).sum() / loss_mask.sum()).item():.6f}")

    # --- gradients of  main_mean + 0.1/D * sum_k mtp_k_mean  for every parameter ---
    plain_total.backward()
    named = dict(model.named_parameters())
    worst = 0.0
    for name, p in P.items():
        torch.testing.assert_close(named[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
        worst = max(worst, (named[name].grad - p.grad).abs().max().item())
    print(f"    grads of all {len(P)} params match (max abs diff {worst:.2e})")
    return model


def main():
    torch.set_num_threads(2)
    init_single_process_distributed()
    cases = [(1, False), (1, True), (2, False)]
    for i, (depth, sdpa) in enumerate(cases):
        attn = "SDPA swap" if sdpa else "DotProductAttention"
        print(f"case mtp_num_layers={depth}, core attention={attn}")
        model = run_case(depth, sdpa, seed=1234 + i)
        if i == 0:
            print("  MTP layer state_dict:")
            for k, v in model.state_dict().items():
                if k.startswith("mtp.") and not k.endswith("_extra_state"):
                    print(f"    {k:60s} {tuple(v.shape)}")
    dist.destroy_process_group()
    print("OK: megatron MTP loss reproduced in plain PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
