import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
# the suite runs on the CPU on any machine (gloo, CPU tensors), GPU or not; the tests marked
# `gpu` choose their device themselves. Spawned processes inherit it.
os.environ.setdefault("MTP_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _markers_for_helpers(request, monkeypatch):
    """Tell the package's test helpers which markers the running test has (run_distributed
    refuses to spawn processes from a test not marked `distributed`)."""
    from mtp_megatron.testing.distributed import MARKERS_ENV

    names = sorted({m.name for m in request.node.iter_markers()})
    monkeypatch.setenv(MARKERS_ENV, ",".join(names))


@pytest.fixture(scope="session")
def single_process():
    """A one-process gloo world with TP=1 for unit tests (created once per test session)."""
    from mtp_megatron.parallel import initialize_parallel

    return initialize_parallel(tensor_parallel_size=1)
