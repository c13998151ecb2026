"""Typed configs for the model and its MTP heads, with one ``validate()`` each.

Every error names the field, the value it got and what would be valid, so that a bad recipe fails
before any process starts. ``from_dict`` builds a config tree from plain dicts (YAML), rejecting
unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

HEAD_TYPES = ("transformer", "mlp", "shared_lm_head")
HEAD_ARRANGEMENTS = ("chained", "independent")
NORM_PLACEMENTS = ("post", "pre")


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to change."""


def _fail(path: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{path}={value!r} is invalid: {allowed}")


@dataclass
class MTPConfig:
    """Multi-token prediction heads (the user's guide ``MTPConfig``, plus the arrangement).

    Step k = 1..K predicts token t_{i+k+1} from position i, beyond the main head's t_{i+1}.
    Meta (arXiv:2404.19737) counts the main head too: their n = K + 1.
    """

    num_predict_tokens: int = 4
    """K: future tokens predicted beyond the next one (4 is the paper optimum)."""
    mtp_head_type: Literal["transformer", "mlp", "shared_lm_head"] = "transformer"
    """'transformer' (projection + one decoder layer), 'mlp' (projection + SwiGLU), or
    'shared_lm_head' (no new parameters: the trunk's final norm and output layer)."""
    share_weights_across_steps: bool = True
    """FastMTP: one head module applied at every step instead of K separate ones."""
    loss_weight_decay: float = 0.5
    """beta: step k weighs alpha_k = beta^(k-1) / sum_j beta^(j-1)."""
    mtp_loss_weight: float = 0.5
    """w: loss = main + w * sum_k alpha_k CE_k."""
    speculation_lookahead: int = 3
    """Draft tokens proposed per step at inference (at most K)."""
    head_arrangement: Literal["chained", "independent"] = "chained"
    """'chained' (DeepSeek-V3: step k reads step k-1's hidden state and the embedding of t_{i+k})
    or 'independent' (Meta: every head reads the trunk output only)."""
    warmup_steps: int = 0
    """Linear warm-up of w from 0 over this many optimizer steps (0: full weight from step 0)."""

    def step_weights(self) -> list[float]:
        """alpha_1..alpha_K, normalised to sum to one."""
        raw = [self.loss_weight_decay ** (k - 1) for k in range(1, self.num_predict_tokens + 1)]
        total = sum(raw)
        return [r / total for r in raw]

    def mtp_weight(self, step: int | None) -> float:
        """w at an optimizer step: the guide's ``get_mtp_weight`` (``None``: no warm-up)."""
        if step is None or self.warmup_steps <= 0 or step >= self.warmup_steps:
            return self.mtp_loss_weight
        return self.mtp_loss_weight * max(step, 0) / self.warmup_steps

    def validate(self, path: str = "mtp") -> None:
        k = self.num_predict_tokens
        if not isinstance(k, int) or k < 1:
            _fail(
                f"{path}.num_predict_tokens", k, "must be an integer >= 1 (use mtp: null for NTP)"
            )
        if self.mtp_head_type not in HEAD_TYPES:
            _fail(f"{path}.mtp_head_type", self.mtp_head_type, f"must be one of {HEAD_TYPES}")
        if self.head_arrangement not in HEAD_ARRANGEMENTS:
            _fail(
                f"{path}.head_arrangement",
                self.head_arrangement,
                f"must be one of {HEAD_ARRANGEMENTS}",
            )
        if not (isinstance(self.loss_weight_decay, (int, float)) and self.loss_weight_decay > 0):
            _fail(f"{path}.loss_weight_decay", self.loss_weight_decay, "beta must be > 0")
        if not (isinstance(self.mtp_loss_weight, (int, float)) and self.mtp_loss_weight >= 0):
            _fail(f"{path}.mtp_loss_weight", self.mtp_loss_weight, "must be >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            _fail(f"{path}.warmup_steps", self.warmup_steps, "must be an integer >= 0")
        la = self.speculation_lookahead
        if not isinstance(la, int) or not 1 <= la <= k:
            _fail(
                f"{path}.speculation_lookahead",
                la,
                f"must be between 1 and num_predict_tokens ({k}): each draft token needs a head",
            )
        if self.head_arrangement == "independent":
            # An independent head sees only the trunk output h_i. Without parameters of its own, or
            # with one module shared by all steps, every step would compute the same logits.
            if self.mtp_head_type == "shared_lm_head":
                _fail(
                    f"{path}.mtp_head_type",
                    self.mtp_head_type,
                    "independent heads read only the trunk output, so a parameter-free head would "
                    "reproduce the main head; use head_arrangement='chained' or a 'transformer' / "
                    "'mlp' head",
                )
            if self.share_weights_across_steps and k > 1:
                _fail(
                    f"{path}.share_weights_across_steps",
                    True,
                    "independent heads that share one module all compute the same logits; set it "
                    "to false or use head_arrangement='chained' (FastMTP shares chained heads)",
                )


@dataclass
class ModelConfig:
    """An OLMo-2-style decoder (RMSNorm, RoPE, SwiGLU, QK-norm, optional GQA) and its MTP heads."""

    vocab_size: int = 4096
    """Tokenizer vocabulary size."""
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
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    qk_norm: bool = True
    """RMSNorm on queries and keys (per head, which keeps it local to a TP rank)."""
    norm_placement: Literal["post", "pre"] = "post"
    """'post': OLMo-2's reordered norm x + norm(f(x)); 'pre': GPT/Megatron's x + f(norm(x))."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_std: float = 0.02
    """Std of the normal init; output projections are scaled by 1/sqrt(2 num_layers)."""
    mtp: MTPConfig | None = field(default_factory=MTPConfig)
    """MTP heads; None trains a plain next-token (NTP) model."""

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size is not None:
            return self.ffn_hidden_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return m * math.ceil(self.vocab_size / m)

    def validate(self, tensor_parallel_size: int = 1, path: str = "model") -> None:
        positive = (
            "vocab_size",
            "vocab_pad_multiple",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "max_seq_len",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"{path}.{name}", value, "must be a positive integer")
        tp = tensor_parallel_size
        if self.hidden_size % self.num_attention_heads:
            _fail(
                f"{path}.hidden_size",
                self.hidden_size,
                f"must be divisible by num_attention_heads ({self.num_attention_heads})",
            )
        if self.head_dim % 2:
            _fail(f"{path}.hidden_size", self.hidden_size, "head_dim must be even for RoPE")
        if self.num_attention_heads % self.kv_heads:
            _fail(
                f"{path}.num_kv_heads",
                self.num_kv_heads,
                f"must divide num_attention_heads ({self.num_attention_heads})",
            )
        if self.norm_placement not in NORM_PLACEMENTS:
            _fail(
                f"{path}.norm_placement", self.norm_placement, f"must be one of {NORM_PLACEMENTS}"
            )
        checks = [
            ("num_attention_heads", self.num_attention_heads),
            ("num_kv_heads", self.kv_heads),
            ("ffn_hidden_size", self.ffn_size),
            ("hidden_size", self.hidden_size),
        ]
        for name, value in checks:
            if value % tp:
                _fail(f"{path}.{name}", value, f"must be divisible by tensor_parallel_size ({tp})")
        if self.padded_vocab_size % tp:
            _fail(
                f"{path}.vocab_pad_multiple",
                self.vocab_pad_multiple,
                f"the padded vocabulary ({self.padded_vocab_size}) must be divisible by "
                f"tensor_parallel_size ({tp}); use a multiple of {tp}",
            )
        if self.mtp is not None:
            self.mtp.validate(f"{path}.mtp")


@dataclass
class ParallelConfig:
    """How the world is split: world = pipeline x tensor x data parallel."""

    tensor_parallel_size: int = 1
    """Megatron TP: processes that shard each layer."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (the MTP heads sit on the last one)."""

    def validate(self, path: str = "parallel") -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                _fail(f"{path}.{name}", value, "must be a positive integer")

    def validate_world(self, world_size: int) -> None:
        model_parallel = self.tensor_parallel_size * self.pipeline_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"{world_size} processes cannot be split into tensor_parallel_size "
                f"({self.tensor_parallel_size}) x pipeline_parallel_size "
                f"({self.pipeline_parallel_size}) x data parallel; launch a multiple of "
                f"{model_parallel} processes"
            )


# ---------------------------------------------------------------------------------------------
# dicts (YAML) -> dataclasses

T = TypeVar("T")


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: cannot be {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            _fail(path, value, f"must be one of {get_args(tp)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            _fail(path, value, f"must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            _fail(path, value, "must be a list")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in names:
            raise ConfigError(f"unknown key '{full}'; known keys here: {', '.join(names)}")
        kwargs[key] = _convert(hints[key], value, full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    """The inverse of :func:`from_dict` (nested plain dicts)."""
    return dataclasses.asdict(config)
