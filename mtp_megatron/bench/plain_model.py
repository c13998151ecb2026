"""A plain-PyTorch twin of ``DecoderTrunk``: the baseline our megatron layers are timed against.

Only ``torch.nn`` (nn.Embedding, nn.Linear, nn.RMSNorm, F.scaled_dot_product_attention,
F.cross_entropy) and the same architecture, shapes and parameter count as the trunk of a
``ModelConfig`` (its ``mtp`` section is ignored: this is a next-token model). With the trunk's
weights loaded (:func:`load_trunk_weights`) it computes the same loss, so a throughput gap between
the two is the cost of our implementation, not of a different model.

Notation: b batch, s sequence, h hidden, n query heads, g key/value heads, d head dim, V padded
vocabulary.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from mtp_megatron.config import ModelConfig

IGNORE_INDEX = -100


def rope_tables(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, d] for rotate-half RoPE (float64 angles, as the trunk)."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [b, heads, s, d]; cos, sin: [s, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class PlainAttention(nn.Module):
    """Causal GQA self-attention with per-head QK-norm and RoPE; separate bias-free q/k/v/o."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.kv_heads, d
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim)  # [b, s, n, d]
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim)  # [b, s, g, d]
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [b, n, s, d]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [b, g, s, d]
        out = F.scaled_dot_product_attention(
            q, k, v.transpose(1, 2), is_causal=True, enable_gqa=self.n_heads != self.n_kv
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class PlainSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused in one [2f, h] weight ([gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_size, bias=False)
        self.down = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class PlainBlock(nn.Module):
    """Attention then SwiGLU, each residual: post x + norm(f(x)) (OLMo-2) or pre x + f(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = PlainAttention(cfg)
        self.attn_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = PlainSwiGLU(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.pre = cfg.norm_placement == "pre"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.pre:
            x = x + self.attn(self.attn_norm(x), cos, sin)
            return x + self.mlp(self.mlp_norm(x))
        x = x + self.attn_norm(self.attn(x, cos, sin))
        return x + self.mlp_norm(self.mlp(x))


class PlainDecoder(nn.Module):
    """Embedding -> blocks -> final norm -> output layer; ``forward`` returns the mean CE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dataclasses.replace(cfg, mtp=None).validate()
        self.cfg = cfg
        h, v = cfg.hidden_size, cfg.padded_vocab_size
        self.embed = nn.Embedding(v, h)
        self.layers = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(h, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(h, v, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        # The trunk's init: N(0, std), output projections scaled by 1/sqrt(2 num_layers).
        std = self.cfg.init_std
        scaled = std / math.sqrt(2.0 * self.cfg.num_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # norm weights stay at one
            out_proj = name.endswith(("o_proj.weight", "down.weight"))
            nn.init.normal_(p, std=scaled if out_proj else std)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[b, s] token ids -> [b, s, V] logits over the padded vocabulary."""
        s = input_ids.shape[1]
        cos, sin = self.cos[:s], self.sin[:s]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean next-token CE; labels[:, i] = t_{i+1} (input_ids shifted left if None)."""
        if labels is None:
            labels = F.pad(input_ids[:, 1:], (0, 1), value=IGNORE_INDEX)
        logits = self.logits(input_ids)
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )


# Our trunk's parameter names -> PlainDecoder's (per-layer suffixes after "layers.{i}.").
_LAYER_NAMES = {
    "attention.inner.q_proj.weight": "attn.q_proj.weight",
    "attention.inner.k_proj.weight": "attn.k_proj.weight",
    "attention.inner.v_proj.weight": "attn.v_proj.weight",
    "attention.inner.o_proj.weight": "attn.o_proj.weight",
    "attention.inner.q_norm.weight": "attn.q_norm.weight",
    "attention.inner.k_norm.weight": "attn.k_norm.weight",
    "attention.norm.weight": "attn_norm.weight",
    "mlp.inner.gate_up.weight": "mlp.gate_up.weight",
    "mlp.inner.down.weight": "mlp.down.weight",
    "mlp.norm.weight": "mlp_norm.weight",
}
_TOP_NAMES = {
    "embedding.weight": "embed.weight",
    "final_norm.weight": "norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def plain_name(ours: str, prefix: str = "trunk.") -> str:
    """The PlainDecoder parameter name of one of our trunk's (KeyError if it has none)."""
    if not ours.startswith(prefix):
        raise KeyError(f"'{ours}' is not a trunk parameter (no '{prefix}' prefix)")
    rest = ours[len(prefix) :]
    if rest in _TOP_NAMES:
        return _TOP_NAMES[rest]
    head, _, tail = rest.partition(".")
    index, _, suffix = tail.partition(".")
    if head == "layers" and index.isdigit() and suffix in _LAYER_NAMES:
        return f"layers.{index}.{_LAYER_NAMES[suffix]}"
    raise KeyError(f"no PlainDecoder parameter corresponds to '{ours}'")


def load_trunk_weights(
    plain: PlainDecoder, state_dict: dict[str, object], prefix: str = "trunk."
) -> None:
    """Copy a TP=1 state dict of our NTP model (``prefix`` "trunk.") or trunk ("") into ``plain``.

    Megatron's non-tensor ``_extra_state`` entries are skipped; any other unmapped entry, or a
    plain parameter left without a value, raises.
    """
    mapped = {}
    for name, value in state_dict.items():
        if name.endswith("_extra_state"):
            continue
        mapped[plain_name(name, prefix)] = value
    if plain.cfg.tie_embeddings:
        mapped["lm_head.weight"] = mapped["embed.weight"]
    plain.load_state_dict(mapped, strict=True)
