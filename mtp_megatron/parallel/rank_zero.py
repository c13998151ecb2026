"""Work one rank does while the others wait for it, outside any collective.

A collective is bounded by the process group's timeout (``train.collective_timeout_s`` + 30 s):
ranks waiting in a barrier while rank 0 prepares a corpus on first use, writes its share of a
7B checkpoint (about 20 GB) or consolidates the model at the end would end the job. Instead the
waiting ranks poll the job's c10d store (torchrun's, at MASTER_ADDR:MASTER_PORT, the one the
stall watchdog beats into) for the worker's verdict:

- the bound is sized for the work by the caller (bytes to write at a slow disk's rate, say) and
  restarts whenever the worker reports progress (:meth:`StoreWait.progress`), so a long job that
  keeps moving is never cut short;
- a worker that dies or stops is caught sooner by the stall watchdog (its heartbeat stops);
- when the bound passes, the waiting rank raises, naming what it waited for and the worker's
  last progress.

Keys are unique per job attempt and per call: every rank makes the same calls in the same order.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from mtp_megatron.config import ConfigError

POLL_S = 0.5
"""How often a waiting rank looks at the store."""

_calls = itertools.count()
_store: dist.Store | None = None


def _job_store() -> dist.Store:
    """A client of the job's c10d store (made once per process)."""
    global _store
    if _store is None and dist.is_initialized() and dist.get_world_size() == 1:
        _store = dist.HashStore()  # a world of one (no torchrun): nobody else waits
    if _store is None:
        if not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
            raise RuntimeError("waiting on another rank needs MASTER_ADDR / MASTER_PORT (torchrun)")
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=60),
        )
        attempt = "{}.{}".format(
            os.environ.get("TORCHELASTIC_RUN_ID", ""),
            os.environ.get("TORCHELASTIC_RESTART_COUNT", 0),
        )
        _store = dist.PrefixStore(f"mtp_wait/{attempt}/", store)
    return _store


class StoreWait:
    """One piece of waiting: ranks post values under keys; others wait for them."""

    def __init__(self, what: str):
        """``what``: the work, for messages ('write checkpoint step_000100')."""
        self.what = what
        self.prefix = f"{next(_calls)}/"
        self.store = _job_store()

    def post(self, key: str, value: Any) -> None:
        self.store.set(self.prefix + key, json.dumps(value))

    def progress(self, message: str) -> None:
        """Report progress: the waiting ranks' bound restarts."""
        self.post("progress", message)

    def wait(self, keys: Iterable[str], bound_s: float) -> list[Any]:
        """The values of ``keys`` once all are posted; raises RuntimeError when they are not
        within ``bound_s`` of the start or of the last progress report."""
        names = [self.prefix + k for k in keys]
        progress_key = self.prefix + "progress"
        last, deadline = None, time.monotonic() + bound_s
        while not self.store.check(names):
            if self.store.check([progress_key]):
                now = json.loads(self.store.get(progress_key))
                if now != last:
                    last, deadline = now, time.monotonic() + bound_s
            if time.monotonic() > deadline:
                missing = [k for k, n in zip(keys, names) if not self.store.check([n])]
                raise RuntimeError(
                    f"rank {dist.get_rank()}: waited {bound_s:.0f} s without progress for the "
                    f"ranks to {self.what} ({', '.join(missing)} not reported; last progress: "
                    f"{last or 'none'}); the job ends, its latest complete checkpoint resumes it"
                )
            time.sleep(POLL_S)
        return [json.loads(self.store.get(n)) for n in names]


def run_on_rank_zero(work: Callable[[StoreWait], Any], what: str, bound_s: float) -> Any:
    """Global rank 0 runs ``work(wait)`` (it may call ``wait.progress``) while the others wait
    (``bound_s``: see the module doc); every rank returns its result (JSON-able) or raises its
    error: rank 0 the error itself, the others "rank 0 could not {what}: ..." (a ConfigError
    for a ConfigError, else a RuntimeError). Without a process group, just ``work``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return work(_Local())
    wait = StoreWait(what)
    if dist.get_rank() == 0:
        try:
            result = work(wait)
        except Exception as e:
            config = isinstance(e, ConfigError)
            error = str(e) if config else f"{type(e).__name__}: {e}"
            wait.post("done", {"error": error, "config": config})
            raise
        wait.post("done", {"result": result})
        return result
    (verdict,) = wait.wait(["done"], bound_s)
    if "error" in verdict:
        message = f"rank 0 could not {what}: {verdict['error']}"
        raise ConfigError(message) if verdict["config"] else RuntimeError(message)
    return verdict["result"]


def barrier(what: str, bound_s: float) -> None:
    """Every rank arrives, through the store: a barrier bounded by ``bound_s`` (restarting at
    each arrival) instead of the process group's timeout."""
    wait = StoreWait(what)
    rank = dist.get_rank()
    wait.post(f"rank{rank}", True)
    wait.progress(f"rank {rank} arrived")
    wait.wait([f"rank{r}" for r in range(dist.get_world_size())], bound_s)


class _Local(StoreWait):
    """A world of one: nothing to report to."""

    def __init__(self):
        self.what, self.prefix = "", ""

    def post(self, key: str, value: Any) -> None:
        pass
