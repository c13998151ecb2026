"""Stall watchdog: a rank that stops responding ends the job within a bound, and is named.

Every rank runs a daemon thread that publishes a heartbeat (a counter, the current step and
phase, host and pid) to the job's c10d store (torchrun's, at MASTER_ADDR:MASTER_PORT) every
``bound / 10`` seconds and reads everyone else's. A rank whose counter has not moved for
``bound`` seconds, as timed on the watching rank's own monotonic clock (no cross-node clock
agreement needed), is stalled: stopped (``kill -STOP``), swapped out, or lost with its node. The
watcher logs which rank, where and at what step, and exits its process non-zero, which makes
torchrun end the job. A rank that is alive but blocked in a collective keeps beating; the
process-group timeout (the same ``train.collective_timeout_s``) bounds that case.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

EXIT_STALLED = 75


class StallWatchdog:
    """Heartbeats through the c10d store; ``update(step, phase)`` from the training loop."""

    def __init__(self, bound_s: float, rank: int, world_size: int):
        self.bound = bound_s
        self.rank, self.world = rank, world_size
        self.step, self.phase = 0, "setup"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: dist.Store | None = None

    def start(self) -> bool:
        """Start beating and watching; False (and nothing started) when there is no peer or no
        store to meet at."""
        if self.world < 2 or not {"MASTER_ADDR", "MASTER_PORT"} <= set(os.environ):
            return False
        try:
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=self.bound),
            )
        except (RuntimeError, ValueError) as e:  # training goes on, bounded by the PG timeout
            print(f"[watchdog] rank {self.rank}: not started, no c10d store ({e})", file=sys.stderr)
            return False
        attempt = "{}.{}".format(
            os.environ.get("TORCHELASTIC_RUN_ID", ""),
            os.environ.get("TORCHELASTIC_RESTART_COUNT", 0),
        )
        self._store = dist.PrefixStore(f"mtp_watchdog/{attempt}/", store)
        self._beat(0)
        self._thread = threading.Thread(target=self._run, name="mtp-stall-watchdog", daemon=True)
        self._thread.start()
        return True

    def update(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _beat(self, count: int) -> None:
        beat = {"n": count, "step": self.step, "phase": self.phase}
        beat.update(host=socket.gethostname(), pid=os.getpid())
        assert self._store is not None  # (started)
        self._store.set(f"beat/{self.rank}", json.dumps(beat))

    def _run(self) -> None:
        store = self._store
        assert store is not None  # (started)
        interval = max(0.5, self.bound / 10)
        seen: dict[int, tuple[int, float, dict]] = {}  # rank -> (count, when it moved, beat)
        count = 0
        while not self._stop.wait(interval):
            count += 1
            try:
                self._beat(count)
                now = time.monotonic()
                for r in range(self.world):
                    if r == self.rank:
                        continue
                    key = f"beat/{r}"
                    if not store.check([key]):
                        seen.setdefault(r, (-1, now, {}))  # not started yet: the clock runs
                        beat = None
                    else:
                        beat = json.loads(store.get(key))
                    last = seen.get(r)
                    if beat is not None and (last is None or beat["n"] != last[0]):
                        seen[r] = (beat["n"], now, beat)
                    elif now - seen[r][1] > self.bound:
                        self._stalled(r, now - seen[r][1], seen[r][2])
            except Exception as e:  # noqa: BLE001  (the store is gone: the job is ending)
                if not self._stop.is_set():
                    print(
                        f"[watchdog] rank {self.rank}: heartbeat store unreachable ({e})",
                        file=sys.stderr,
                        flush=True,
                    )
                return

    def _stalled(self, rank: int, silent_s: float, beat: dict) -> None:
        where = f" on {beat['host']} (pid {beat['pid']})" if beat else ""
        at = f", last at step {beat['step']} ({beat['phase']})" if beat else " (it never started)"
        print(
            f"[watchdog] rank {rank}{where} has made no progress for {silent_s:.0f} s{at}, more "
            f"than train.collective_timeout_s={self.bound:g}: stopping the job (seen by rank "
            f"{self.rank}, step {self.step}). The last complete checkpoint resumes the run.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_STALLED)
