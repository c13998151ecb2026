"""Sampling settings and the speculative acceptance rule.

Notation: b batch, V vocabulary (unpadded), L draft tokens.

The target distribution p is the model's next-token distribution after temperature, top-k and
top-p; plain sampling draws from it, and speculative sampling (Leviathan et al. 2023, Chen et al.
2023) provably draws from the same p: accept draft x ~ q with probability min(1, p(x) / q(x)),
otherwise sample from normalise(max(0, p - q)); when every draft passes, a bonus token from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtp_megatron.config import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen (0 temperature: greedy)."""

    temperature: float = 0.0
    """Target temperature; 0 is greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of tokens with probability >= top_p (in (0, 1])."""
    top_k: int | None = None
    """Keep the k most likely tokens (None: all)."""
    speculation_temperature: float = 0.0
    """Temperature of the drafts' own distribution q; 0 drafts greedily (q one-hot)."""
    acceptance_threshold: float = 1.0
    """1.0: exact speculative sampling. Below 1 (the guide suggests 0.9): also accept a draft
    whose target probability is >= threshold x the top target probability. LOSSY: the output
    no longer follows the model's distribution."""

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature={self.temperature!r} is invalid: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p!r} is invalid: must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k!r} is invalid: must be >= 1 or None")
        if not self.speculation_temperature >= 0:
            raise ConfigError(
                f"speculation_temperature={self.speculation_temperature!r} is invalid: must be >= 0"
            )
        if not 0 < self.acceptance_threshold <= 1:
            raise ConfigError(
                f"acceptance_threshold={self.acceptance_threshold!r} is invalid: must be in "
                "(0, 1]; 1.0 is exact"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """[..., V] logits -> the target distribution p after temperature / top-k / top-p."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = logits.topk(cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        sorted_p = sorted_p.masked_fill(before >= cfg.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draft_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor | None:
    """q for sampled drafts, or None for greedy drafts (q one-hot at the argmax)."""
    if cfg.speculation_temperature == 0:
        return None
    return (logits.float() / cfg.speculation_temperature).softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[b, V] -> [b] token ids."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def accept_drafts(
    p: torch.Tensor,
    drafts: torch.Tensor,
    q: torch.Tensor | None,
    cfg: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling for a batch.

    p: [b, L+1, V] target distributions at the L draft positions and the bonus position;
    drafts: [b, L]; q: [b, L, V] draft distributions (None: greedy drafts).
    Returns (accepted count m [b], next token [b]: the correction at m, or the bonus when m = L).
    """
    b, lp1, _ = p.shape
    L = lp1 - 1
    p_draft = p[:, :L].gather(-1, drafts[..., None]).squeeze(-1)  # p(x_t) [b, L]
    if q is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(b, L, generator=generator, device=p.device)
    ok = u * q_draft <= p_draft  # u < p/q without dividing by a zero q
    if cfg.acceptance_threshold < 1.0:  # lossy relaxed acceptance
        ok |= p_draft >= cfg.acceptance_threshold * p[:, :L].amax(-1)
    accepted = ok.long().cumprod(-1).sum(-1)  # [b] leading run of accepted drafts
    rows = torch.arange(b, device=p.device)
    residual = p[rows, accepted].clone()  # [b, V] p at the first rejected position (or bonus)
    rejected = accepted < L
    # computed for every row (no host read of "any rejected?"); accepted rows keep p
    at = accepted.clamp(max=L - 1)
    if q is None:
        q_at = torch.zeros_like(residual).scatter(-1, drafts[rows, at][:, None], 1.0)
    else:
        q_at = q[rows, at]
    fixed = (residual - q_at).clamp_min(0)
    mass = fixed.sum(-1, keepdim=True)
    # mass 0 only when p <= q everywhere, i.e. p == q: then the draft is always accepted
    fixed = torch.where(mass > 0, fixed / mass.clamp_min(1e-30), residual)
    residual = torch.where(rejected[:, None], fixed, residual)
    return accepted, sample(residual, generator)


def greedy_accept(target: torch.Tensor, drafts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification: target [b, L+1] argmax ids, drafts [b, L] -> (m [b], next [b])."""
    L = drafts.shape[1]
    ok = drafts == target[:, :L]
    accepted = ok.long().cumprod(-1).sum(-1)
    return accepted, target.gather(1, accepted[:, None]).squeeze(1)
