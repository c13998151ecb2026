"""Training on a recipe blend of indexed datasets (through megatron-core's GPTDataset): exact
resume with 2 data-parallel ranks and grad accumulation 2; imported OLMo-style and Megatron data
through the same recipe; a resume that would change the sample count refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides, train_run
from tests.cases.indexed import TEXTS, tokenizer_dir

pytestmark = pytest.mark.distributed


def _prepared(root: Path) -> tuple[Path, Path, Path]:
    """Two prepared datasets (code-like and prose-like text) and their tokenizer."""
    from mtp_megatron.config.data import PrepareConfig
    from mtp_megatron.data.prepare_indexed import prepare

    tok = tokenizer_dir(root)
    out = []
    for name, texts in (("code", TEXTS * 4), ("prose", [t[::-1] for t in TEXTS] * 4)):
        src = root / f"{name}.jsonl"
        src.write_text(
            "".join(json.dumps({"text": t + str(i)}) + "\n" for i, t in enumerate(texts))
        )
        cfg = PrepareConfig(
            inputs=[str(src)], tokenizer=str(tok), output=str(root / name), validation_fraction=0.2
        )
        prepare(cfg, log=lambda _: None)
        out.append(root / name)
    return out[0], out[1], tok


def _blend(a: Path, b: Path) -> str:
    return f"[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]"


def test_blend_trains_and_resumes_exactly_with_two_ranks_and_grad_accum(tmp_path):
    a, b, _ = _prepared(tmp_path)
    extra = {
        "data.train": _blend(a, b),
        "data.tokenizer": "null",  # the one the datasets record
        "train.steps": 8,
        "train.grad_accum": 2,
        "train.zero_stage": 2,
        "train.eval_every": 4,
    }
    cache = tmp_path / "cache"
    full = run_distributed(train_run, 2, tiny_run_overrides(tmp_path / "full", cache, **extra))[0]
    assert full["losses"][7] < full["losses"][0] and full["eval"]
    part = tiny_run_overrides(tmp_path / "part", cache, **extra)
    first = run_distributed(train_run, 2, part, 4)[0]
    assert first["last_step"] == 4
    # evaluation settings may change on resume (they do not touch the training samples)
    part_eval = tiny_run_overrides(tmp_path / "part", cache, **{**extra, "train.eval_batches": 1})
    second = run_distributed(train_run, 2, part_eval)[0]
    assert sorted(second["losses"]) == list(range(4, 8))
    for step in range(8):
        got = first["losses"].get(step, second["losses"].get(step))
        assert got == full["losses"][step], (step, got, full["losses"][step])
    # a longer run draws its remaining samples in another order: only with steps in
    # train.resume_overrides (the note it logs: test_faults_distributed)
    longer = tiny_run_overrides(
        tmp_path / "part",
        cache,
        **{**extra, "train.steps": 12, "train.resume_overrides": "[steps]"},
    )
    third = run_distributed(train_run, 2, longer)[0]
    assert sorted(third["losses"]) == list(range(8, 12)) and third["last_step"] == 12


def test_imported_olmo_and_megatron_data_train_through_one_recipe(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from mtp_megatron.data.importers import import_data

    a, _, tok = _prepared(tmp_path)
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(2, 400, rng.integers(20, 90)), 1) for _ in range(300)]
    np.concatenate(docs).astype(np.uint32).tofile(tmp_path / "olmo.npy")
    import_data(
        tmp_path / "olmo", numpy={"train": [str(tmp_path / "olmo.npy")]}, dtype="uint32", eod=1
    )
    builder = IndexedDatasetBuilder(str(tmp_path / "megatron.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "megatron.idx"))
    extra = {
        "data.train": f"[{{path: {tmp_path / 'olmo'}}}, {{path: {tmp_path / 'megatron'}}}]",
        "data.validation": f"[{{path: {a}}}]",
        "data.tokenizer": str(tok),
        "train.steps": 3,
    }
    out = run_distributed(
        train_run, 1, tiny_run_overrides(tmp_path / "run", tmp_path / "c", **extra)
    )
    assert sorted(out[0]["losses"]) == [0, 1, 2]
    assert all(np.isfinite(v) for v in out[0]["losses"].values())
