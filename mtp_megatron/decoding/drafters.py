"""Drafters: what proposes a round's tokens. The speculative decoder (``speculative.py``) asks a
``Drafter`` for L drafts per row, verifies them with one trunk forward and tells the drafter what
the trunk computed; a new kind of draft (n-gram lookup, a tree of candidates) is a new Drafter.

Notation: b batch, T prompt length, L lookahead, h hidden, V vocabulary, w block width.

:class:`HeadDrafter`, the MTP heads: head k (k = 1..L) at position p proposes x_{p+k+1}. A chained
head's input at position j is (h^{k-1}_j, e(x_{j+k})), exactly as in training; positions whose
inputs are all committed are computed once and cached (the KV cache of an attention head, and h^k
in a history buffer); the few positions that read this round's drafts are recomputed each round.
Past K, one chained head module shared by every step (or K = 1) applies itself again to its own
state at k - 1 (FastMTP's recursion, vLLM's for one-layer MTP models).
"""

from __future__ import annotations

from typing import Protocol, cast

import torch

from mtp_megatron.decoding.draft_vocab import DraftVocab
from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.rounds import Draft, RoundState
from mtp_megatron.decoding.runner import Forward, TrunkRunner
from mtp_megatron.decoding.sampling import SamplingConfig, draft_probs, sample


class Drafter(Protocol):
    """Proposes ``lookahead`` tokens per row and round."""

    lookahead: int
    """L: drafts per round."""

    def observe(self, state: RoundState, fwd: Forward, positions: torch.Tensor | None) -> None:
        """The trunk's outputs ``fwd`` at ``positions`` [b, s] (None: the prompt's, 0 .. T-1),
        before they are verified: what the next round's drafts may read."""

    def draft(self, state: RoundState) -> Draft:
        """This round's L drafts per row (written into the scratch slots of ``state.seq``)."""


class HeadDrafter:
    """The MTP heads of ``runner.model`` as drafts (module doc), for one request."""

    def __init__(
        self,
        runner: TrunkRunner,
        lookahead: int,
        state: RoundState,
        sampling: SamplingConfig,
        generator: torch.Generator | None,
        vocab: DraftVocab | None = None,
    ):
        """``vocab``: the reduced draft vocabulary (None: all tokens)."""
        self.runner, self.mtp = runner, runner.model.mtp
        self.lookahead = L = lookahead
        self.sampling, self.generator, self.vocab = sampling, generator, vocab
        b, capacity = state.seq.shape
        ref = runner.trunk.embedding.weight
        hidden = runner.trunk.cfg.hidden_size
        # hist[0] = h^0 (normalised trunk output), hist[k] = h^k; hist_z = pre-norm trunk output
        self.hist = [torch.zeros(b, capacity, hidden, dtype=ref.dtype, device=ref.device)]
        self.hist += [torch.zeros_like(self.hist[0]) for _ in range(L)]
        self.hist_z = None if self.mtp.chained else torch.zeros_like(self.hist[0])
        self.caches: list[KVCacheSet | None] = [
            runner.new_caches(b, capacity, 1, ref) if self.mtp.head(k).has_attention else None
            for k in range(1, L + 1)
        ]
        # valid[k - 1]: the prefix of positions whose head-k state is cached (committed inputs), on
        # the device and, for sizing the blocks without a device read, on the host
        self.valid = torch.zeros(L, b, dtype=torch.long, device=ref.device)
        self.valid_host = [[0] * b for _ in range(L)]

    def observe(self, state: RoundState, fwd: Forward, positions: torch.Tensor | None) -> None:
        if positions is None:  # the prompt
            T = fwd.h.shape[1]
            self.hist[0][:, :T] = fwd.h
            if self.hist_z is not None:
                self.hist_z[:, :T] = fwd.z
            return
        rows = state.rows[:, None]
        self.hist[0][rows, positions] = fwd.h
        if self.hist_z is not None:
            self.hist_z[rows, positions] = fwd.z

    def draft(self, state: RoundState) -> Draft:
        drafts, qs = [], []
        for k in range(1, self.lookahead + 1):
            h_p = self._head_state(state, k)  # [b, 1, h] at position p
            d, q = self._propose(h_p)
            state.seq[state.rows, state.p + 1 + k] = d  # scratch slot of draft k (x_{p+1+k})
            drafts.append(d)
            qs.append(q)
            # inputs of positions j <= p + 1 - k are committed: those states stay cached
            p, p_host = state.p, state.p_host
            chained = self.mtp.chained
            self.valid[k - 1] = (p + 2 - k).clamp_min(0) if chained else p + 1
            self.valid_host[k - 1] = [max(pp + 2 - k, 0) if chained else pp + 1 for pp in p_host]
        q = None if qs[0] is None else torch.stack(cast(list[torch.Tensor], qs), dim=1)
        return Draft(torch.stack(drafts, dim=1), q)

    def _head_state(self, state: RoundState, k: int) -> torch.Tensor:
        """Run head k over the positions [start, p] whose state is not cached yet (recorded in
        hist[k]); its normalised state at p [b, 1, h]."""
        trunk, mtp = self.runner.trunk, self.mtp
        p, p_host, seq = state.p, state.p_host, state.seq
        rows = state.rows[:, None]
        start = torch.minimum(self.valid[k - 1], p)  # a finished row (p frozen): p only
        start_host = [min(v, pp) for v, pp in zip(self.valid_host[k - 1], p_host)]
        width = max(pp - st for pp, st in zip(p_host, start_host)) + 1
        pos = start[:, None] + torch.arange(width, device=p.device)  # [b, w]; past p: padding
        pos = pos.clamp(max=seq.shape[1] - 1 - k)
        if mtp.chained:
            prev = self.hist[k - 1][rows, pos]  # h^{k-1} (this round's values past its valid part)
            emb = trunk.embed(seq[rows, pos + k])  # e(x_{j+k}): committed or this round's draft
        else:
            assert self.hist_z is not None  # (independent heads read the trunk's z)
            prev, emb = self.hist_z[rows, pos], None
        cache = self.caches[k - 1]
        kv = None
        if cache is not None:
            cache.set_lengths(start, max_length=max(start_host))
            kv = cache.layers[0]
        h = mtp.step(k, prev, emb, trunk.final_norm, trunk.rope, pos, kv)  # [b, w, h]
        self.hist[k][rows, pos] = h
        last = (p - start)[:, None, None].expand(p.shape[0], 1, h.shape[-1])
        return h.gather(1, last)

    def _propose(self, h_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft [b] from a head's state [b, 1, h], and its distribution q [b, V] (None:
        greedy)."""
        vocab, logits_of = self.vocab, self.runner.logits
        if vocab is None:
            logits = logits_of(h_p)[:, 0]  # [b, V]
        else:
            logits = vocab.logits(h_p, logits_of)[:, 0]  # [b, D]
        q = draft_probs(logits, self.sampling)
        d = logits.argmax(-1) if q is None else sample(q, self.generator)
        if vocab is not None:
            d = vocab.ids[d]
            q = None if q is None else vocab.scatter(q)
        return d, q
