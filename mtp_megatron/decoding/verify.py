"""The verifier: which of a round's drafts the target (the trunk's main head) accepts.

Notation: b batch, L lookahead, V vocabulary.

- greedy (temperature 0): the longest prefix of drafts equal to the target's argmax, then the
  argmax after it, so the output is token for token plain greedy decoding; with
  ``acceptance_threshold`` < 1 a draft whose target probability is within that factor of the top
  one passes too (lossy);
- sampling: the speculative rule of ``sampling.py`` (Leviathan et al., Chen et al. 2023), which
  draws every token from the target distribution exactly.
"""

from __future__ import annotations

import torch

from mtp_megatron.decoding.rounds import Draft
from mtp_megatron.decoding.runner import pick
from mtp_megatron.decoding.sampling import (
    SamplingConfig,
    accept_drafts,
    greedy_accept,
    target_probs,
)


class Verifier:
    """Acceptance under one request's sampling settings and generator."""

    def __init__(self, sampling: SamplingConfig, generator: torch.Generator | None):
        self.sampling, self.generator = sampling, generator

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        """The token after the prompt [b] from the prefill's last logits [b, V]."""
        return pick(logits, self.sampling, self.generator)

    def __call__(self, logits: torch.Tensor, draft: Draft) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [b, L+1, V] of the verification forward -> (accepted m [b], next token [b]:
        the correction at m, or the bonus when every draft passed)."""
        sampling, drafts = self.sampling, draft.tokens
        if not sampling.greedy:
            probs = target_probs(logits, sampling)
            return accept_drafts(probs, drafts, draft.q, sampling, self.generator)
        m, nxt = greedy_accept(logits.argmax(-1), drafts)
        if sampling.acceptance_threshold < 1.0:  # lossy: near-top drafts pass too
            probs = logits.softmax(-1)
            L = drafts.shape[1]
            p_d = probs[:, :L].gather(-1, drafts[..., None]).squeeze(-1)
            ok = p_d >= sampling.acceptance_threshold * probs[:, :L].amax(-1)
            m = ok.long().cumprod(-1).sum(-1)
            nxt = logits.argmax(-1).gather(1, m[:, None]).squeeze(1)
        return m, nxt
