"""The state of a speculative request between rounds, and what a round hands from drafting to
verification.

Notation: b batch, T prompt length, L lookahead (drafts per round), V vocabulary, S capacity.

Row r between rounds: tokens x_0 .. x_{p+1} are committed; the trunk has processed positions
0 .. p (its KV cache holds p + 1 slots); x_{p+1} (the "bonus") came from the main head at p and
has not been fed yet. Slots past p + 1 are scratch: a round's drafts sit at p + 2 .. p + 1 + L,
and committing d_1 .. d_m is moving p and writing the next token over the first rejected draft.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mtp_megatron.decoding.host import host_read


@dataclass
class Draft:
    """One round's proposals."""

    tokens: torch.Tensor
    """[b, L] the drafts d_1 .. d_L of each row (x_{p+2} .. x_{p+1+L})."""
    q: torch.Tensor | None = None
    """[b, L, V] the distributions they were sampled from (None: greedy drafts, q one-hot)."""


@dataclass
class RoundState:
    """Committed tokens, the trunk's position per row and its host mirror (one device read per
    round: the host's copy lets drafting size its blocks without reading the device)."""

    seq: torch.Tensor
    """[b, S] committed tokens, then scratch (this round's drafts)."""
    p: torch.Tensor
    """[b] the last position the trunk has processed."""
    prompt_len: int
    """T."""
    max_new: int
    """New tokens per row to commit."""
    eos: int | None = None
    """A row is done once it has committed this token."""
    p_host: list[int] = field(default_factory=list)
    """p on the host, read once per round by :meth:`next_round`."""
    rounds: int = 0
    """Rounds run so far."""
    rows: torch.Tensor = field(init=False)
    """[b] 0 .. b-1 (made once: indexing each row's slot)."""
    slots: torch.Tensor = field(init=False)
    """[S] 0 .. S-1."""

    def __post_init__(self) -> None:
        self.rows = torch.arange(self.seq.shape[0], device=self.seq.device)
        self.slots = torch.arange(self.seq.shape[1], device=self.seq.device)

    @classmethod
    def start(cls, input_ids: torch.Tensor, capacity: int, max_new: int, eos: int | None):
        """The state before the prefill: the prompt [b, T] committed, p = T - 1."""
        b, T = input_ids.shape
        seq = torch.zeros(b, capacity, dtype=torch.long, device=input_ids.device)
        seq[:, :T] = input_ids
        p = torch.full((b,), T - 1, dtype=torch.long, device=input_ids.device)
        return cls(seq=seq, p=p, prompt_len=T, max_new=max_new, eos=eos)

    def bonus(self) -> torch.Tensor:
        """[b] x_{p+1}: committed, not yet fed to the trunk."""
        return self.seq[self.rows, self.p + 1]

    def next_round(self) -> bool:
        """Read p (and, with an EOS, whether every row has committed one) from the device, once;
        False when every row is done."""
        T, p = self.prompt_len, self.p
        if self.eos is None:
            self.p_host = host_read(p)
        else:
            slots = self.slots
            committed = (slots[None] >= T) & (slots[None] <= (p + 1)[:, None])
            hit = ((self.seq == self.eos) & committed).any(-1)
            *self.p_host, all_hit = host_read(torch.cat([p, hit.all()[None].long()]))
            if self.rounds and all_hit:
                return False
        return min(self.p_host) + 2 - T < self.max_new  # tokens committed beyond the prompt

    def commit(
        self, accepted: torch.Tensor, nxt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Commit ``accepted`` [b] drafts and ``nxt`` [b] after them; rows that are done ride
        along without advancing. Returns (accepted, active) [b], zero / False for those rows."""
        p = self.p
        active = (p + 2 - self.prompt_len) < self.max_new
        accepted = torch.where(active, accepted, torch.zeros_like(accepted))
        nxt = torch.where(active, nxt, self.seq[self.rows, p + 1])
        self.p = torch.where(active, p + 1 + accepted, p)
        self.seq[self.rows, self.p + 1] = nxt
        self.rounds += 1
        return accepted, active

    def committed_new(self) -> int:
        """New tokens every row has committed (the minimum over rows; one device read)."""
        return min(host_read(self.p)) + 2 - self.prompt_len
