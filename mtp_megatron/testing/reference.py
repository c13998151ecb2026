"""An independent plain-PyTorch forward of the trunk and MTP heads, from a TP=1 state dict.

Written from the equations (not by calling the package's modules): full-vocabulary
``F.cross_entropy`` with ``ignore_index``, explicit loops over steps, explicit RoPE and attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtp_megatron.config import ModelConfig


def rms(x, w, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def rope(x, theta):
    """x: [b, n, s, d], rotate-half RoPE at positions 0..s-1."""
    s, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(x, sd, p, cfg: ModelConfig):
    b, s, _ = x.shape
    n, g, d = cfg.num_attention_heads, cfg.kv_heads, cfg.head_dim
    q = (x @ sd[p + "q_proj.weight"].T).view(b, s, n, d)
    k = (x @ sd[p + "k_proj.weight"].T).view(b, s, g, d)
    v = (x @ sd[p + "v_proj.weight"].T).view(b, s, g, d)
    if cfg.qk_norm:
        q = rms(q, sd[p + "q_norm.weight"], cfg.norm_eps)
        k = rms(k, sd[p + "k_norm.weight"], cfg.norm_eps)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
    k = k.repeat_interleave(n // g, dim=1)
    v = v.repeat_interleave(n // g, dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, n * d)
    return out @ sd[p + "o_proj.weight"].T


def swiglu(x, sd, p):
    gate, up = (x @ sd[p + "gate_up.weight"].T).chunk(2, -1)
    return (F.silu(gate) * up) @ sd[p + "down.weight"].T


def residual(x, f, norm_w, cfg: ModelConfig):
    if cfg.norm_placement == "pre":
        return x + f(rms(x, norm_w, cfg.norm_eps))
    return x + rms(f(x), norm_w, cfg.norm_eps)


def layer(x, sd, p, cfg: ModelConfig, with_attention=True):
    if with_attention:
        a = p + "attention."
        x = residual(x, lambda y: attention(y, sd, a + "inner.", cfg), sd[a + "norm.weight"], cfg)
    m = p + "mlp."
    return residual(x, lambda y: swiglu(y, sd, m + "inner."), sd[m + "norm.weight"], cfg)


def linear_block(x, sd, p):
    """The 'linear' head: x + W2 SiLU(W1 x)."""
    return x + F.silu(x @ sd[p + "up.weight"].T) @ sd[p + "down.weight"].T


def head_block(x, sd, p, cfg: ModelConfig, head_type: str):
    if head_type == "linear":
        return linear_block(x, sd, p)
    return layer(x, sd, p, cfg, with_attention=head_type == "transformer")


def ce(logits, targets):
    v = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, v), targets.reshape(-1), ignore_index=-100)


def reference_losses(sd: dict, cfg: ModelConfig, input_ids: torch.Tensor, labels: torch.Tensor):
    """(main CE, [CE_1..CE_K]) computed from the state dict of an ``MTPModel`` at TP=1."""
    mtp = cfg.mtp
    emb = sd["trunk.embedding.weight"]
    out_w = emb if cfg.tie_embeddings else sd["trunk.output_layer.weight"]
    h0 = emb[input_ids]
    for i in range(cfg.num_layers):
        h0 = layer(h0, sd, f"trunk.layers.{i}.", cfg)
    z = h0  # trunk output before the final norm
    h0 = rms(z, sd["trunk.final_norm.weight"], cfg.norm_eps)
    main = ce(h0 @ out_w.T, labels)
    steps = []
    b, s = input_ids.shape
    prev = h0
    assert mtp is not None, "the reference computes MTP steps"
    for k in range(1, mtp.num_predict_tokens + 1):
        p = "mtp.heads.0." if mtp.share_weights_across_steps else f"mtp.heads.{k - 1}."
        # token t_{i+k} at position i (0 past the end; those positions have no target)
        future = torch.zeros_like(input_ids)
        future[:, : s - k] = input_ids[:, k:]
        e = emb[future]
        if mtp.head_arrangement == "chained":
            if mtp.mtp_head_type == "shared_lm_head":
                x = rms(prev, None, cfg.norm_eps) + rms(e, None, cfg.norm_eps)
            else:
                cat = torch.cat(
                    [
                        rms(e, sd[p + "enorm.weight"], cfg.norm_eps),
                        rms(prev, sd[p + "hnorm.weight"], cfg.norm_eps),
                    ],
                    -1,
                )
                x = cat @ sd[p + "eh_proj.weight"].T
        else:
            x = z  # Meta: every head reads the trunk output
        if mtp.mtp_head_type != "shared_lm_head":
            x = head_block(x, sd, p + "block.", cfg, mtp.mtp_head_type)
            norm_w = sd[p + "final_norm.weight"]
        else:
            norm_w = sd["trunk.final_norm.weight"]
        targets = torch.full_like(labels, -100)
        targets[:, : s - k] = labels[:, k:]
        hk = rms(x, norm_w, cfg.norm_eps)
        steps.append(ce(hk @ out_w.T, targets))
        prev = hk
    return main, steps
