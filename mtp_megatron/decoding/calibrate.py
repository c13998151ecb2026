"""``lookahead="auto"``: the lookahead that decodes fastest for this model, batch size and machine.

The best L is a trade of measured costs, not a property of the heads alone: each extra draft
costs a head step (a fraction of a trunk step) and widens the verification forward (on a CPU,
L+1 tokens cost 1.2-1.7 one-token steps; on a GPU about one), while it is accepted only with
the heads' (falling) acceptance rate. So it is measured: every L in 0..K (0: plain decoding)
decodes the calibration prompts, interleaved and twice, and the fastest total wall time wins.
Calibrating costs about 2 (K + 1) times one request of the calibration length.

:class:`AutoLookahead` is the policy a decoder asks for L: the calibration of the request's batch
size, made on the request's prompt the first time that size is seen. It drives the decoder through
its public ``generate`` only (any decoder with a ``model``, ``mtp``, ``runner`` and this policy as
``auto``: :func:`calibrate` records into ``decoder.auto``, so a calibration made ahead of the
requests, as bench-decode makes it, is the one they use).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mtp_megatron.decoding.plain import generate_plain

CALIBRATION_TOKENS = 32
"""New tokens per calibration prompt: long enough to reach the steady state of a round."""


@dataclass
class Calibration:
    """What calibrating measured at one batch size."""

    batch: int
    """Rows decoded together (the choice is per batch size: verify cost grows with it)."""
    lookahead: int
    """The fastest L (0: plain decoding is fastest: speculation does not pay here)."""
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    """L -> measured tokens per second (greedy, calibration prompts)."""
    seconds: float = 0.0
    """Wall time calibrating took."""


@torch.no_grad()
def calibrate(
    decoder,
    prompts: list[torch.Tensor],
    max_new_tokens: int = CALIBRATION_TOKENS,
    draft_vocab: torch.Tensor | list[int] | None = None,
):
    """Measure L = 0..K on ``prompts`` (each [b, T], one batch size; ``draft_vocab`` as the
    requests will use it) and return a Calibration; ``decoder.generate(lookahead="auto")``
    uses it for that batch size from then on. Under TP, rank 0's choice is every rank's."""
    batches = {p.shape[0] for p in prompts}
    if not prompts or len(batches) != 1:
        raise ValueError(f"calibration prompts must share one batch size, got {sorted(batches)}")
    t0 = time.perf_counter()
    K = decoder.mtp.num_steps
    # what fits beside the longest prompt (the decoder's slack: 2 L + 2 slots at L = K)
    room = decoder.model.cfg.max_seq_len - max(p.shape[1] for p in prompts) - (2 * K + 2)
    max_new_tokens = max(1, min(max_new_tokens, room))
    wall = dict.fromkeys(range(K + 1), 0.0)
    tokens = dict.fromkeys(range(K + 1), 0)
    for _ in range(2):  # the first pass also warms every path up; both are counted
        for prompt in prompts:
            for L in range(K + 1):
                if L == 0:
                    _, stats = generate_plain(decoder.model, prompt, max_new_tokens)
                else:
                    _, stats = decoder.generate(
                        prompt, max_new_tokens, lookahead=L, draft_vocab=draft_vocab
                    )
                wall[L] += stats["wall_time_s"]
                tokens[L] += stats["new_tokens"]
    rates = {L: tokens[L] / wall[L] for L in wall}
    best = max(rates, key=lambda L: rates[L])
    group = decoder.runner.tp_group
    if group.size() > 1:  # each rank timed its own runs: they must not decode differently
        choice = torch.tensor([best], device=prompts[0].device)
        torch.distributed.broadcast(choice, torch.distributed.get_global_rank(group, 0), group)
        best = int(choice.item())
    result = Calibration(batches.pop(), best, rates, time.perf_counter() - t0)
    decoder.auto.calibrations[result.batch] = result
    return result


class AutoLookahead:
    """``lookahead="auto"``: per batch size, the fastest L in 0..K measured on this machine."""

    def __init__(self):
        self.calibrations: dict[int, Calibration] = {}
        """Batch size -> what calibrating measured (set by :func:`calibrate` too)."""

    def choose(self, decoder, input_ids: torch.Tensor, draft_vocab=None) -> int:
        """L for a request of ``input_ids`` [b, T] (0: plain decoding); calibrated on it when
        its batch size has not been."""
        found = self.calibrations.get(input_ids.shape[0])
        if found is None:
            found = calibrate(decoder, [input_ids], draft_vocab=draft_vocab)
        return found.lookahead
