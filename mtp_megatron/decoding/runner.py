"""What every decoding method needs of the model: the trunk forward over a KV cache, full-vocabulary
logits, and the request's checks, placement and cut.

Notation: b batch, s tokens in a forward, T prompt length, h hidden, V vocabulary (unpadded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.decoding.host import host_read
from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.sampling import SamplingConfig, sample, target_probs
from mtp_megatron.parallel import gather_last_dim


@dataclass
class Forward:
    """A trunk (or head) forward's outputs over a block of positions."""

    z: torch.Tensor
    """Pre-norm trunk output [b, s, h] (independent heads read it)."""
    h: torch.Tensor
    """Normalised state [b, s, h] (h^0: what the main head and chained heads read)."""
    logits: torch.Tensor
    """Full-vocabulary logits [b, s, V] ([b, 1, V] with ``last_only``)."""


class TrunkRunner:
    """The model pieces decoding needs, with TP gathers and padded-vocab trimming."""

    def __init__(self, model):
        self.model = model
        self.trunk = model.trunk
        self.vocab = model.cfg.vocab_size
        self.tp_group = self.trunk.ctx.tp_group

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Normalised states [b, s, h] -> fp32 logits [b, s, V] on every TP rank."""
        full = gather_last_dim(self.trunk.logits(h), self.tp_group)  # [b, s, V_padded]
        return full[..., : self.vocab].float()

    def forward(self, tokens: torch.Tensor, caches: KVCacheSet, last_only: bool = False) -> Forward:
        """The trunk over ``tokens`` [b, s] at the caches' next positions (which advance).
        ``last_only``: logits of the last position only (a prompt's other positions need none:
        at a 2k prompt and 128k vocabulary that is 1 GB of fp32 saved)."""
        positions = caches.positions(tokens.shape[1])  # [b, s]
        z = self.trunk.run_layers(self.trunk.embed(tokens), positions, kv_caches=caches.layers)
        caches.advance(tokens.shape[1])
        h = self.trunk.final_norm(z)
        return Forward(z=z, h=h, logits=self.logits(h[:, -1:] if last_only else h))

    def new_caches(self, batch: int, capacity: int, num: int, ref: torch.Tensor) -> KVCacheSet:
        """``num`` layers' KV caches of ``capacity`` slots, like the trunk's attention (device and
        dtype of ``ref``)."""
        attn = self.trunk.layers[0].attention.inner
        return KVCacheSet(
            num, batch, attn.local_kv_heads, attn.head_dim, capacity, ref.device, ref.dtype
        )

    def trunk_caches(self, batch: int, capacity: int) -> KVCacheSet:
        """The trunk's caches: one per layer application (an ETD trunk: per think iteration)."""
        trunk = self.trunk
        return self.new_caches(batch, capacity, trunk.num_kv_caches, trunk.embedding.weight)


def validate_request(model, input_ids: torch.Tensor, max_new_tokens: int, extra: int) -> int:
    """The slots a request needs (prompt + new tokens + ``extra``); refuses what cannot fit."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len>=1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    needed = input_ids.shape[1] + max_new_tokens + extra
    if needed > model.cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + lookahead "
            f"slack ({extra}) = {needed} exceeds model.max_seq_len ({model.cfg.max_seq_len})"
        )
    return needed


def finish(seq: torch.Tensor, start: int, max_new: int, eos: int | None):
    """(tokens [b, start + max_new], new tokens per row [b] on the host): each row cut to
    ``max_new`` new tokens and its first EOS, padded with EOS."""
    b = seq.shape[0]
    out = seq[:, : start + max_new].clone()
    lengths = torch.full((b,), max_new, dtype=torch.long)
    if eos is not None:
        for r in range(b):
            hits = (out[r, start:] == eos).nonzero()
            if len(hits):
                cut = int(hits[0]) + 1
                out[r, start + cut :] = eos
                lengths[r] = cut
    return out, lengths


def on_model_device(model, input_ids: torch.Tensor, generator: torch.Generator | None):
    """The prompt and the sampling generator moved to the model's device (a CPU prompt or
    generator with a CUDA model is the common case: ids from a tokenizer, a seeded Generator()).
    A generator on another device is replaced by one there, seeded from it: reproducible."""
    device = model.trunk.embedding.weight.device
    input_ids = input_ids.to(device)
    if generator is not None and generator.device != device:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        generator = torch.Generator(device=device).manual_seed(seed)
    return input_ids, generator


def sync(device: torch.device) -> None:
    """Wait until the device has finished what it was given (before reading a wall time)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteLogitsError(ValueError):
    """Decoding refused: the model produced NaN / inf logits."""


def require_finite(logits: torch.Tensor) -> None:
    """Refuse to decode from NaN / inf logits (argmax of NaN would 'accept' every draft)."""
    if not host_read(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError(
            "the model's logits for the prompt are not finite (NaN or inf): its weights are "
            "broken (a diverged run?); decode from an earlier checkpoint"
        )


def pick(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None):
    """Next token [b] from logits [b, V] under the target distribution."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(target_probs(logits, sampling), gen)
