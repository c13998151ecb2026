"""The model section of a recipe: the decoder trunk (``ModelConfig``), Llama-3's RoPE scaling
and Encode-Think-Decode (``ETDConfig``); the MTP heads' config is ``config/mtp.py``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from mtp_megatron.config.base import (
    ConfigError,
    check_choice,
    check_flags,
    check_int,
    fail,
    is_int,
    is_number,
)
from mtp_megatron.config.mtp import MTPConfig

NormPlacement = Literal["post", "pre"]
"""'post': OLMo-2's reordered norm x + norm(f(x)); 'pre': GPT/Megatron's x + f(norm(x))."""
QKNormScope = Literal["head", "full"]
"""'head': one RMSNorm per head over d; 'full': one over the whole q and k projections."""


@dataclass(kw_only=True)
class ETDConfig:
    """Encode-Think-Decode (arXiv:2510.07358): the trunk's layers split into an encoder run once,
    a think block run ``max_think_iterations`` times with the same weights, and a decoder run once
    (the user's guide ``ETDConfig``, plus MoDr LoRA experts and an adaptive-depth router)."""

    n_encoder_layers: int = 7
    """Layers run once before the think block (the guide's OLMo-2 1B split is 7/4/5)."""
    n_think_layers: int = 4
    """Layers of the think block, iterated with tied weights."""
    n_decoder_layers: int = 5
    """Layers run once after the think block; the three counts sum to model.num_layers."""
    max_think_iterations: int = 5
    """k: applications of the think block (1 with router and experts off = the plain trunk)."""
    use_layer_router: bool = True
    """Adaptive depth: a per-token router may halt a token before each iteration past
    ``min_think_iterations``; a halted token's state is carried forward unchanged."""
    use_lora_experts: bool = True
    """MoDr: LoRA branches on the think block's linear layers, one per token per iteration."""
    min_think_iterations: int = 1
    """Iterations every token runs before the depth router may halt it."""
    halt_threshold: float = 0.5
    """A token halts when its halting probability reaches this (the same rule in training,
    evaluation and decoding)."""
    halting_cost: float = 0.01
    """Weight of the compute cost added to the loss: halting_cost x expected think iterations."""
    num_lora_experts: int = 4
    """LoRA branches per think-block linear layer; the router picks one (top-1)."""
    lora_rank: int = 8
    """r of every LoRA branch."""
    lora_alpha: float = 16.0
    """LoRA scale alpha / r."""
    expert_bias_update_rate: float = 1e-3
    """gamma of the auxiliary-loss-free balancing (DeepSeek-V3): after each training forward,
    each expert's routing bias moves by gamma towards equal load."""

    def suggested_split(self, num_layers: int) -> tuple[int, int, int]:
        """The guide's 7/4/5 proportions scaled to ``num_layers`` (at least one think layer)."""
        enc = max(1, round(num_layers * 7 / 16)) if num_layers >= 3 else 0
        dec = max(1, round(num_layers * 5 / 16)) if num_layers >= 3 else 0
        return enc, num_layers - enc - dec, dec

    def validate(self, num_layers: int | None = None, path: str = "model.etd") -> None:
        counts = ("n_encoder_layers", "n_think_layers", "n_decoder_layers")
        for name in counts:
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                fail(f"{path}.{name}", value, "must be an integer >= 0")
        if self.n_think_layers < 1:
            fail(f"{path}.n_think_layers", self.n_think_layers, "the think block needs a layer")
        total = sum(getattr(self, name) for name in counts)
        if num_layers is not None and total != num_layers:
            enc, think, dec = self.suggested_split(num_layers)
            raise ConfigError(
                f"{path}: n_encoder_layers + n_think_layers + n_decoder_layers = "
                f"{self.n_encoder_layers} + {self.n_think_layers} + {self.n_decoder_layers} = "
                f"{total} is invalid: must equal model.num_layers ({num_layers}); e.g. "
                f"{enc}/{think}/{dec}, or measure one with `python -m mtp_megatron etd-split`"
            )
        k, k_min = self.max_think_iterations, self.min_think_iterations
        if not is_int(k) or k < 1:
            fail(f"{path}.max_think_iterations", k, "must be an integer >= 1")
        if not is_int(k_min) or not 1 <= k_min <= k:
            fail(f"{path}.min_think_iterations", k_min, f"must be between 1 and {k}")
        check_flags(self, path, ("use_layer_router", "use_lora_experts"))
        if self.use_layer_router and k_min >= k:
            fail(
                f"{path}.use_layer_router",
                True,
                f"the router has no iteration to skip (min_think_iterations={k_min}, "
                f"max_think_iterations={k}); raise max_think_iterations or turn the router off",
            )

        def number(name: str) -> float:
            value = getattr(self, name)
            if not is_number(value):
                fail(f"{path}.{name}", value, "must be a number")
            return value

        if not 0 < number("halt_threshold") < 1:
            fail(f"{path}.halt_threshold", self.halt_threshold, "must be in (0, 1)")
        if number("halting_cost") < 0:
            fail(f"{path}.halting_cost", self.halting_cost, "must be >= 0")
        for name in ("num_lora_experts", "lora_rank"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                fail(f"{path}.{name}", value, "must be an integer >= 1")
        if number("lora_alpha") <= 0:
            fail(f"{path}.lora_alpha", self.lora_alpha, "must be > 0")
        if number("expert_bias_update_rate") < 0:
            fail(f"{path}.expert_bias_update_rate", self.expert_bias_update_rate, "must be >= 0")


@dataclass(kw_only=True)
class RopeScalingConfig:
    """Llama-3's RoPE frequency scaling (``rope_type: llama3``): wavelengths longer than the
    original context / low_freq_factor are divided by ``factor``, shorter than original /
    high_freq_factor kept, those between interpolated."""

    factor: float = 8.0
    """How much longer the context is than ``original_max_position_embeddings``."""
    low_freq_factor: float = 1.0
    """original / low_freq_factor: wavelengths above it are scaled by 1 / factor."""
    high_freq_factor: float = 4.0
    """original / high_freq_factor: wavelengths below it are left alone."""
    original_max_position_embeddings: int = 8192
    """The context the model was first trained at."""

    def validate(self, path: str = "model.rope_scaling") -> None:
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                fail(f"{path}.{name}", value, "must be a number > 0")
        if self.high_freq_factor <= self.low_freq_factor:
            fail(f"{path}.high_freq_factor", self.high_freq_factor, "must exceed low_freq_factor")
        n = self.original_max_position_embeddings
        if not is_int(n) or n < 1:
            fail(f"{path}.original_max_position_embeddings", n, "must be an integer >= 1")


@dataclass(kw_only=True)
class ModelConfig:
    """An OLMo-2-style decoder (RMSNorm, RoPE, SwiGLU, QK-norm, optional GQA) and its MTP heads."""

    vocab_size: int | None = 4096
    """Token ids the model embeds; None (the recipes' default): the data's tokenizer's, filled
    in by the trainer (the run directory's recipe records the number). A set value must hold
    every id of the data."""
    vocab_pad_multiple: int = 128
    """The embedding / output rows are padded to a multiple of this (must divide by TP)."""
    hidden_size: int = 256
    """h: model width."""
    num_layers: int = 4
    """Decoder layers in the trunk."""
    num_attention_heads: int = 4
    """Query heads."""
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None means one per query head."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width; None means 8/3 h rounded up to a multiple of 64."""
    max_seq_len: int = 256
    """Longest sequence (RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    rope_scaling: RopeScalingConfig | None = None
    """Llama-3's frequency scaling (None: plain RoPE)."""
    kv_channels: int | None = None
    """d, the width of one attention head; None: hidden_size / num_attention_heads (set for
    checkpoints whose heads are wider, e.g. Qwen3-0.6B: h 1024, 16 heads, d 128)."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (its width: ``qk_norm_scope``)."""
    qk_norm_scope: QKNormScope = "head"
    """'head': one RMSNorm per head over d (Qwen3, Exaone4); 'full': one over the whole q and
    k projections, [n d] and [g d] (OLMo-2), exact under TP (each rank's sum of squares is
    all-reduced)."""
    qkv_bias: bool = False
    """Biases on the query, key and value projections (Qwen2's attention)."""
    norm_placement: NormPlacement = "post"
    """'post': OLMo-2's reordered norm x + norm(f(x)); 'pre': GPT/Megatron's x + f(norm(x))."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 num_layers)."""
    embedding_init_std: float | None = None
    """Std of the input embedding's init (None: init_std). With pre-norm, 1.0 keeps the token's
    own embedding above the sum of the randomly initialised layers' outputs in the residual
    stream, so a deep trunk learns from the first steps what a one-layer head sees at once.
    With tie_embeddings it is the output layer's init too (large initial logits)."""
    mtp: MTPConfig | None = field(default_factory=MTPConfig)
    """MTP heads; None trains a plain next-token (NTP) model."""
    etd: ETDConfig | None = None
    """Encode-Think-Decode split of the layers (None: the plain trunk)."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def known_vocab_size(self) -> int:
        """``vocab_size``, which must be known by now (the trainer fills a None in from the
        tokenizer)."""
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is None: the trainer sets it from the tokenizer")
        return self.vocab_size

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return m * math.ceil(self.known_vocab_size / m)

    def validate(self, tensor_parallel_size: int = 1, path: str = "model") -> None:
        if self.vocab_size is not None:
            check_int(
                f"{path}.vocab_size", self.vocab_size, 1, "must be a positive integer or null"
            )
        std = self.embedding_init_std
        if std is not None and (not is_number(std) or std <= 0):
            fail(f"{path}.embedding_init_std", std, "must be a positive number or null")
        positive = (
            "vocab_pad_multiple",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "max_seq_len",
        )
        for name in positive:
            check_int(f"{path}.{name}", getattr(self, name), 1, "must be a positive integer")
        kv = self.kv_channels
        if kv is not None:
            check_int(f"{path}.kv_channels", kv, 1, "must be a positive integer or null")
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{path}.rope_scaling")
        check_choice(f"{path}.qk_norm_scope", self.qk_norm_scope, QKNormScope)
        check_choice(f"{path}.norm_placement", self.norm_placement, NormPlacement)
        self._validate_heads(path)
        self._validate_tensor_parallel(tensor_parallel_size, path)
        if self.mtp is not None:
            self.mtp.validate(f"{path}.mtp")
        if self.etd is not None:
            self.etd.validate(num_layers=self.num_layers, path=f"{path}.etd")

    def _validate_heads(self, path: str) -> None:
        """The attention heads' widths: whole, even (RoPE) and grouped evenly."""
        kv = self.kv_channels
        if kv is None and self.hidden_size % self.num_attention_heads:
            fail(
                f"{path}.hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads ({self.num_attention_heads})",
            )
        if self.head_dim % 2:
            name = "kv_channels" if kv is not None else "hidden_size"
            fail(
                f"{path}.{name}",
                getattr(self, name),
                f"the head width {self.head_dim} must be even for RoPE",
            )
        if self.num_attention_heads % self.kv_heads:
            fail(
                f"{path}.num_kv_heads",
                self.num_kv_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})",
            )

    def _validate_tensor_parallel(self, tp: int, path: str) -> None:
        """What TP shards must divide: heads, kv heads, the SwiGLU and hidden widths and the
        padded vocabulary."""
        checks = [
            ("num_attention_heads", self.num_attention_heads),
            ("num_kv_heads", self.kv_heads),
            ("ffn_hidden_size", self.ffn_size),
            ("hidden_size", self.hidden_size),
        ]
        for name, value in checks:
            if value % tp:
                fail(f"{path}.{name}", value, f"must be divisible by tensor_parallel_size ({tp})")
        if self.vocab_pad_multiple % tp and (
            self.vocab_size is None or self.padded_vocab_size % tp
        ):
            padded = "unknown until the tokenizer is read" if self.vocab_size is None else None
            fail(
                f"{path}.vocab_pad_multiple",
                self.vocab_pad_multiple,
                f"the padded vocabulary ({padded or self.padded_vocab_size}) must be divisible by "
                f"tensor_parallel_size ({tp}); use a multiple of {tp}",
            )
