"""The suite's tiers, by folder: unit/ (one process), distributed/ (gloo process worlds, and the
SLURM cluster), gpu/ (CUDA; skipped without one). Helpers shared by both tiers of a topic live
in cases/; general ones ship with the package (``mtp_megatron.testing``)."""

import os
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# markers a test of each folder must (True) or must not (False) carry
TIER_MARKERS = {
    "unit": {"distributed": False, "slurm": False, "gpu": False},
    "distributed": {"distributed": True},
    "gpu": {"gpu": True},
}
# the suite runs on the CPU on any machine (gloo, CPU tensors), GPU or not; the tests marked
# `gpu` choose their device themselves. Spawned processes inherit it.
os.environ.setdefault("MTP_DEVICE", "cpu")


def pytest_collection_modifyitems(config, items):
    wrong = [item.nodeid for item in items if not _in_its_tier(item)]
    if wrong:
        raise pytest.UsageError(
            f"tests in the wrong tier folder for their markers ({TIER_MARKERS}): {wrong[:5]}"
        )
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _in_its_tier(item) -> bool:
    path = Path(str(item.path)).resolve()
    tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) else None
    rules = TIER_MARKERS.get(tier, {})
    markers = {m.name for m in item.iter_markers()}
    return all((name in markers) == required for name, required in rules.items())


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


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """One tokenizer + token cache for every training run of a test module (the first run
    builds it)."""
    return tmp_path_factory.mktemp("data_cache")
