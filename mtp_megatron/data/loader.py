"""Batches cut from a 1-D token stream; each batch a pure function of where training stands.

Notation: b micro-batch size, s sequence length. Chunk c is the window
``tokens[c*s : c*s + s + 1]``: its first s tokens are the inputs and its last s the labels
(labels[i] = inputs[i+1]). Windows share one token at their boundary, so every token of the
stream is a label once per epoch; the ``(len - 1) % s`` tokens past the last chunk are dropped.

Training samples are numbered globally,
``g = ((step * grad_accum + micro_step) * dp_size + dp_rank) * b + j``, and sample g is chunk
``perm(g // n)[g % n]`` with ``perm(e)`` a permutation of the n chunks drawn from
``np.random.default_rng([seed, e])``. No state advances between calls, so a run resumed at step
k draws exactly the batches the uninterrupted run would have, and within an epoch the data
parallel ranks read disjoint chunks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mtp_megatron.config import ConfigError


def _positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: must be an integer >= {minimum}")


def _num_chunks(tokens: np.ndarray, seq_len: int, what: str) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"{what} must be a 1-D token stream, got shape {tokens.shape}")
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ConfigError(
            f"the {what} has {len(tokens)} tokens, too few for one sequence of seq_len={seq_len} "
            f"(needs {seq_len + 1}: inputs plus the next token); use a shorter seq_len or more data"
        )
    return n


def _windows(tokens: np.ndarray, chunks: np.ndarray, seq_len: int):
    """(inputs, labels) int64 tensors [b, s] for the given chunk ids."""
    idx = chunks[:, None] * seq_len + np.arange(seq_len + 1)  # [b, s+1]
    w = torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class TokenBatches:
    """Training micro-batches for one data-parallel rank, indexed by (step, micro_step)."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
    ) -> None:
        _positive("seq_len", seq_len)
        _positive("micro_batch_size", micro_batch_size)
        _positive("dp_size", dp_size)
        _positive("seed", seed, minimum=0)
        if not isinstance(dp_rank, (int, np.integer)) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank!r} is invalid: must be in [0, dp_size={dp_size})")
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_chunks = _num_chunks(tokens, seq_len, "training token stream")
        self._perms: dict[int, np.ndarray] = {}
        self._digest: str | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The chunk order of an epoch (the last two are kept: a batch may straddle epochs)."""
        if epoch not in self._perms:
            rng = np.random.default_rng([self.seed, epoch])
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = rng.permutation(self.num_chunks)
        return self._perms[epoch]

    def first_sample(self, step: int, micro_step: int, grad_accum: int) -> int:
        """Global index g of this rank's first sample in (step, micro_step)."""
        _positive("step", step, minimum=0)
        _positive("grad_accum", grad_accum)
        if not isinstance(micro_step, (int, np.integer)) or not 0 <= micro_step < grad_accum:
            raise ValueError(
                f"micro_step={micro_step!r} is invalid: must be in [0, grad_accum={grad_accum})"
            )
        return ((step * grad_accum + micro_step) * self.dp_size + self.dp_rank) * (
            self.micro_batch_size
        )

    def chunk_ids(self, step: int, micro_step: int, grad_accum: int) -> np.ndarray:
        """The b chunk ids of this rank's micro-batch (for tests and logging)."""
        g = self.first_sample(step, micro_step, grad_accum) + np.arange(self.micro_batch_size)
        epochs, within = np.divmod(g, self.num_chunks)
        out = np.empty(len(g), dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def epoch(self, step: int, grad_accum: int) -> float:
        """Epochs completed (fractionally) by all ranks before ``step``."""
        samples = step * grad_accum * self.dp_size * self.micro_batch_size
        return samples / self.num_chunks

    def batch(
        self, step: int, micro_step: int, grad_accum: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both int64 [b, s], with labels[:, i] = input_ids[:, i + 1]."""
        return _windows(self.tokens, self.chunk_ids(step, micro_step, grad_accum), self.seq_len)

    def tokens_digest(self) -> str:
        """blake2b of the token stream (computed once): tells a resumed run it has the same data."""
        if self._digest is None:
            data = np.ascontiguousarray(self.tokens)
            self._digest = hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()
        return self._digest

    def state_dict(self) -> dict[str, Any]:
        """Everything the step -> batch mapping depends on, except dp_rank and grad_accum."""
        return {
            "seed": self.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "num_tokens": int(len(self.tokens)),
            "num_chunks": self.num_chunks,
            "tokens_digest": self.tokens_digest(),
            "dtype": str(self.tokens.dtype),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the seed; refuse a state made with other data or another batch layout.

        Those are fixed by this run's config and data, and with any of them different a step
        would no longer map to the batch the checkpointed run would have drawn.
        """
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise ValueError(f"data loader state lacks {missing}; it was not made by TokenBatches")
        for key in ("seq_len", "micro_batch_size", "dp_size", "num_tokens", "tokens_digest"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"cannot resume: the checkpoint's data loader had {key}={state[key]!r}, this "
                    f"run has {key}={mine[key]!r}. The batch of a step depends on it, so the run "
                    "would not continue the same data order; resume with the same data and "
                    "settings, or start a new run"
                )
        self.seed = int(state["seed"])
        self._perms.clear()


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    micro_batch_size: int,
    max_batches: int | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation (input_ids, labels) batches over the stream in order, full batches only.

    The evaluated batches are the first ``max_batches`` (all if None), rounded down to a
    multiple of dp_size; rank r yields every dp_size-th from r. So the evaluated data does not
    depend on dp_size, and every rank runs the same number of forwards (ZeRO-3 gathers
    parameters in every forward and would hang otherwise). Average (loss sum, token count)
    across ranks for the validation loss.
    """
    _positive("seq_len", seq_len)
    _positive("micro_batch_size", micro_batch_size)
    _positive("dp_size", dp_size)
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank!r} is invalid: must be in [0, dp_size={dp_size})")
    if max_batches is not None:
        _positive("max_batches", max_batches)
    n = _num_chunks(tokens, seq_len, "validation token stream")
    what = f"the validation token stream has {n} chunks of seq_len={seq_len}"
    ranges = eval_sample_ranges(n, micro_batch_size, max_batches, dp_rank, dp_size, what)
    # A generator of its own, so that the checks above raise at the call, not at the first next().
    return (_windows(tokens, np.arange(lo, hi), seq_len) for lo, hi in ranges)


def eval_sample_ranges(
    items: int,
    micro_batch_size: int,
    max_batches: int | None,
    dp_rank: int,
    dp_size: int,
    what: str,
) -> list[tuple[int, int]]:
    """[start, end) sample ranges of this rank's validation batches: the first ``max_batches``
    full batches (all if None) rounded down to a multiple of dp_size, every dp_size-th from
    dp_rank; ``what`` describes the data in the error when not one batch per rank fits."""
    total = items // micro_batch_size
    if max_batches is not None:
        total = min(total, max_batches)
    total -= total % dp_size
    if total == 0:
        raise ConfigError(
            f"{what}, fewer than one batch of micro_batch_size={micro_batch_size} per rank "
            f"(dp_size={dp_size}); add validation data (data.validation_fraction, "
            "data.validation) or lower the micro-batch size"
        )
    b = micro_batch_size
    return [(i * b, (i + 1) * b) for i in range(dp_rank, total, dp_size)]
