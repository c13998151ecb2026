"""Device -> host reads of decoding, in one place: on a GPU each one waits for the device, so
they are few by design and counted here (tests hold them to a budget).

A plain decoded token needs none (the KV caches know their longest row on the host, see
``kv_cache.py``); an EOS check adds one. A speculative round reads its rows' positions, with
their EOS flags, once.
"""

from __future__ import annotations

import torch


class HostReads:
    """How many device -> host reads decoding has made in this process."""

    count = 0


def host_read(t: torch.Tensor):
    """``t.tolist()`` (a Python number for a 0-d tensor), counted."""
    HostReads.count += 1
    return t.tolist()
