"""Waiting on another rank outside any collective (``parallel/rank_zero.py``): the bound of a
wait, and how progress restarts it."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch.distributed as dist

from mtp_megatron.parallel import rank_zero


@pytest.fixture
def job_store(single_process, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    master = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setattr(rank_zero, "_store", None)
    monkeypatch.setattr(rank_zero, "POLL_S", 0.05)
    yield master


def test_a_wait_without_progress_ends_at_its_bound(job_store):
    wait = rank_zero.StoreWait("write checkpoint step_000004")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"waited 1 s .* to write checkpoint step_000004 .*done"):
        wait.wait(["done"], 1.0)
    assert 1.0 <= time.monotonic() - start < 3.0


def test_progress_restarts_the_bound_and_the_value_arrives(job_store):
    """Work of 2.4 s reporting progress every 0.4 s passes a wait bounded by 1 s."""
    wait = rank_zero.StoreWait("consolidate")

    def worker():
        for i in range(6):
            time.sleep(0.4)
            wait.progress(f"{i + 1} of 6 files")
        wait.post("done", {"result": 7})

    thread = threading.Thread(target=worker)
    thread.start()
    (verdict,) = wait.wait(["done"], 1.0)
    thread.join()
    assert verdict == {"result": 7}


def test_without_a_process_group_the_work_just_runs(job_store):
    assert rank_zero.run_on_rank_zero(lambda wait: 3, "add", 1.0) == 3  # a world of one
