"""Random training batches behind the trainer's batch interface, for benchmarks that time or
measure the trainer's own step without a corpus."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

import torch

if TYPE_CHECKING:
    from mtp_megatron.data.loader import Batches


class _RandomBatches:
    def __init__(self, vocab: int, batch_size: int, seq: int):
        self.vocab, self.batch_size, self.seq = vocab, batch_size, seq

    def batch(self, step: int, micro_step: int, grad_accum: int):
        """(input_ids, labels) [b, s], the same for the same (step, micro_step)."""
        g = torch.Generator().manual_seed(step * grad_accum + micro_step)
        ids = torch.randint(0, self.vocab, (self.batch_size, self.seq + 1), generator=g)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def random_batches(vocab: int, batch_size: int, seq: int) -> Batches:
    """Uniform random tokens; the step runners read only ``.batch(step, micro, grad_accum)``."""
    return cast("Batches", _RandomBatches(vocab, batch_size, seq))
