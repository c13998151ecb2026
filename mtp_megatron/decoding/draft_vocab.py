"""A reduced draft vocabulary: the MTP heads propose only the most frequent tokens.

Notation: b batch, s positions, h hidden, V vocabulary, D draft vocabulary size.

A draft step ends in an output projection over the whole vocabulary, which at batch 1 is the
largest read of the step (V x h weights; a head layer is about 12 h^2). Restricting the drafts to
the D most frequent training tokens (FR-Spec, Zhao et al. 2025, arXiv:2502.14856) cuts that read
by V / D. Verification still uses the full vocabulary, so greedy output stays identical and
speculative sampling stays exact (a draft distribution that is zero outside D is still a valid q);
only drafts of rarer tokens are lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtp_megatron.config import ConfigError


def frequent_token_ids(
    tokens: np.ndarray | torch.Tensor, size: int, vocab_size: int
) -> torch.Tensor:
    """The ``size`` most frequent ids of a token stream (ties: lower id first), as a [D] tensor."""
    if not 1 <= size <= vocab_size:
        raise ConfigError(f"draft vocabulary size {size} is invalid: must be in 1..{vocab_size}")
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    order = np.argsort(-counts, kind="stable")[:size]
    return torch.from_numpy(np.sort(order))


@dataclass
class DraftVocab:
    """The ids the heads may propose and, on one TP rank, their output-layer rows."""

    ids: torch.Tensor
    """[D] token ids, sorted, unique."""
    weight_t: torch.Tensor | None
    """[h, D]: the output layer's rows of ``ids``, transposed (row-major [in, out] is the fast
    layout for a batch-1 CPU matmul); None under TP, where the gathered full logits are indexed
    instead (same drafts, no saving)."""
    vocab_size: int
    """V: the size of the full draft distribution q (zero outside ``ids``)."""

    @classmethod
    def build(cls, ids, output_weight: torch.Tensor, vocab_size: int, tp_size: int) -> DraftVocab:
        ids = torch.as_tensor(ids, dtype=torch.long, device=output_weight.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(
                f"draft_vocab must be a non-empty 1-D list of token ids, got {ids.shape}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
            raise ValueError(f"draft_vocab holds ids outside 0..{vocab_size - 1}")
        ids = ids.unique()  # sorted
        weight_t = output_weight.detach()[ids].t().contiguous() if tp_size == 1 else None
        return cls(ids=ids, weight_t=weight_t, vocab_size=vocab_size)

    def logits(self, h: torch.Tensor, full_logits) -> torch.Tensor:
        """h [b, s, h] -> draft logits over ``ids`` [b, s, D] (``full_logits``: h -> [b, s, V])."""
        if self.weight_t is not None:
            return (h @ self.weight_t).float()
        return full_logits(h)[..., self.ids]

    def scatter(self, q: torch.Tensor) -> torch.Tensor:
        """q over ``ids`` [b, D] -> q over the vocabulary [b, V] (zero elsewhere)."""
        full = q.new_zeros(q.shape[0], self.vocab_size)
        return full.scatter_(-1, self.ids.expand(q.shape[0], -1), q)
