"""A recipe's ``data.source`` prepared into the cache on first use, the model's vocabulary from
its tokenizer, the trainer's batches and validation batches, and the data section's errors."""

from __future__ import annotations

import json
import multiprocessing
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from tokenizers import Tokenizer

from mtp_megatron.config import ConfigError
from mtp_megatron.data import DataConfig
from mtp_megatron.data.loader import (
    Batches,
    eval_batches,
    model_vocab_size,
    prefix_tokens,
    prepare_training_data,
    resolve_data,
)
from mtp_megatron.data.manifest import MANIFEST
from mtp_megatron.data.sources import prepare_source
from tests.cases.indexed import TEXTS, tokenizer_dir


def _quiet(_: str) -> None:
    pass


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _corpus(root: Path, n: int = 40) -> Path:
    root.mkdir()
    for i in range(n):
        (root / f"f{i:02d}.txt").write_text(TEXTS[i % len(TEXTS)] * 4)
    return root


def test_stdlib_source_is_prepared_once_into_the_cache(tmp_path):
    cfg = DataConfig(max_files=40, tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"))
    logs: list[str] = []
    folder = prepare_source(cfg, logs.append)
    assert folder.parent == tmp_path / "cache" / "datasets"
    manifest = _manifest(folder)
    sources = [f for shard in manifest["shards"] for f in shard["sources"]]
    stdlib = sysconfig.get_paths()["stdlib"]
    # the interpreter's own modules only, the first 40 in sorted order: site-packages differs
    # between machines
    assert len(sources) == 40 and all(s.startswith(stdlib) and s.endswith(".py") for s in sources)
    assert not [s for s in sources if "site-packages" in s]
    docs = manifest["totals"]["documents"]
    assert docs["train"] > docs["validation"] > 0
    assert manifest["tokenizer"]["vocab_size"] <= 300
    # a second start re-checks the inputs and changes nothing
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    logs.clear()
    assert prepare_source(cfg, logs.append) == folder
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp
    assert any("(1 already done)" in line for line in logs)
    other = prepare_source(DataConfig(**{**vars(cfg), "max_files": 41}), _quiet)
    assert other != folder


def test_a_changed_source_file_changes_the_data_and_a_run_reads_it(tmp_path, single_process):
    corpus = _corpus(tmp_path / "corpus")
    cfg = DataConfig(
        source=str(corpus), tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"), split_seed=3
    )
    first = _manifest(prepare_source(cfg, _quiet))["fingerprint"]
    (corpus / "f05.txt").write_text("something else entirely")
    second = _manifest(prepare_source(cfg, _quiet))["fingerprint"]
    assert first != second
    data = prepare_training_data(cfg, None, 16, 40, 8, seed=0, log=_quiet)
    batches = Batches(data, 16, micro_batch_size=4, dp_rank=0, dp_size=1)
    x, y = batches.batch(0, 0, 1)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert (y[:, :-1] == x[:, 1:]).all()
    assert data.vocab_size == _manifest(prepare_source(cfg, _quiet))["tokenizer"]["vocab_size"]


def test_an_hf_source_reads_the_datasets_train_split(tmp_path, monkeypatch):
    hub = tmp_path / "hub_dataset"  # a directory `datasets` loads like a hub dataset
    hub.mkdir()
    rows = [json.dumps({"text": t}) for t in TEXTS[:30]] + [json.dumps({"body": "no text"})]
    (hub / "part.jsonl").write_text("\n".join(rows) + "\n")
    cfg = DataConfig(source=f"hf:{hub}", tokenizer="bpe:300", cache_dir=str(tmp_path / "cache"))
    manifest = _manifest(prepare_source(cfg, _quiet))
    assert sum(manifest["totals"]["documents"].values()) == 30
    assert manifest["totals"]["skipped"] == {"no_text_field": 1}
    assert all(s.endswith(".parquet") for shard in manifest["shards"] for s in shard["sources"])

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset_builder", offline)
    with pytest.raises(ConfigError) as err:
        prepare_source(DataConfig(source="hf:org/corpus", cache_dir=str(tmp_path / "c")), _quiet)
    assert "org/corpus" in str(err.value) and "unreachable" in str(err.value)


def test_a_tokenizer_with_its_own_end_token_through_the_recipe(tmp_path):
    corpus = _corpus(tmp_path / "corpus", n=10)
    bare = tokenizer_dir(tmp_path, "</s>", config=False)  # no tokenizer_config.json
    cfg = DataConfig(
        source=str(corpus),
        tokenizer=str(bare / "tokenizer.json"),
        eod_token="</s>",
        validation_fraction=0.3,
        cache_dir=str(tmp_path / "cache"),
    )
    end = Tokenizer.from_file(str(bare / "tokenizer.json")).token_to_id("</s>")
    blends = resolve_data(cfg, _quiet)
    assert blends.eod_id == end and blends.vocab_size == 400
    tokens = prefix_tokens(blends.train)
    assert (
        tokens[-1] == end
        and (tokens == end).sum()
        == _manifest(prepare_source(cfg, _quiet))["totals"]["documents"]["train"]
    )
    # the same end token from a tokenizer directory's tokenizer_config.json
    (tmp_path / "with_config").mkdir()
    with_config = tokenizer_dir(tmp_path / "with_config", "</s>")
    from_dir = DataConfig(**{**vars(cfg), "tokenizer": str(with_config), "eod_token": None})
    assert resolve_data(from_dir, _quiet).eod_id == end
    no_end = tokenizer_dir(tmp_path, None)
    with pytest.raises(ConfigError, match="no end-of-document token"):
        resolve_data(DataConfig(**{**vars(from_dir), "tokenizer": str(no_end)}), _quiet)


def test_the_model_vocabulary_is_the_tokenizers_unless_the_recipe_sets_a_larger_one():
    assert model_vocab_size(None, 300) == 300
    assert model_vocab_size(512, 300) == 512
    with pytest.raises(ConfigError) as err:
        model_vocab_size(256, 300)
    assert "model.vocab_size=256" in str(err.value) and "300" in str(err.value)


def _prepare_in_child(cfg: DataConfig, queue) -> None:
    logs: list[str] = []
    folder = prepare_source(cfg, logs.append)
    queue.put((str(folder), any("training a byte-level BPE" in line for line in logs)))


@pytest.mark.timeout(120)
def test_concurrent_starts_prepare_once(tmp_path):
    cfg = DataConfig(
        source=str(_corpus(tmp_path / "corpus")),
        tokenizer="bpe:300",
        cache_dir=str(tmp_path / "cache"),
    )
    ctx = multiprocessing.get_context("fork")  # the modules are loaded already: fast to start
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(cfg, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert results[0][0] == results[1][0]
    assert sorted(trained for _, trained in results) == [False, True]  # one waited, then reused


# ---------------------------------------------------------------------------------------------
# batches over a dataset of megatron-style samples


def _data(samples: int = 100, s: int = 10) -> SimpleNamespace:
    """TrainingData's fields Batches reads; sample i's tokens are i*s .. i*s + s - 1."""
    items = [
        {"tokens": torch.arange(i * s, i * s + s), "labels": torch.arange(i * s + 1, i * s + s + 1)}
        for i in range(samples)
    ]
    return SimpleNamespace(train=items, fingerprint="f", train_samples=samples)


def _first_tokens(batches: Batches, step: int, micro: int, grad_accum: int) -> list[int]:
    return (batches.batch(step, micro, grad_accum)[0][:, 0] // 10).tolist()


def test_data_parallel_ranks_read_disjoint_samples_and_resume_exactly():
    data = _data()
    ranks = [Batches(data, 10, 5, r, 2) for r in (0, 1)]
    seen = [
        [i for step in range(5) for m in range(2) for i in _first_tokens(b, step, m, 2)]
        for b in ranks
    ]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(100))  # 5 steps x 2 micro x 2 ranks x 5
    fresh = Batches(data, 10, 5, 1, 2)  # a resumed run: the same batch, whatever came before
    assert _first_tokens(fresh, 7, 1, 2) == _first_tokens(ranks[1], 7, 1, 2)


def test_loader_state_refuses_other_data_or_sample_total():
    saved = Batches(_data(), 10, 5, 0, 2).state_dict()
    Batches(_data(), 10, 5, 1, 2).load_state_dict(saved)  # another rank, same data: fine
    other = _data()
    other.fingerprint = "g"
    with pytest.raises(ConfigError, match="fingerprint='f'"):
        Batches(other, 10, 5, 0, 2).load_state_dict(saved)
    with pytest.raises(ConfigError, match="100 training samples, this run 200"):
        Batches(_data(200), 10, 5, 0, 2).load_state_dict(saved)
    # steps in train.resume_overrides: a longer run accepts a new sample order, and says so
    note = Batches(_data(200), 10, 5, 0, 2).load_state_dict(saved, new_total_allowed=True)
    assert "sample total 100 -> 200" in note and "new sample order" in note
    assert Batches(_data(), 10, 5, 0, 2).load_state_dict(saved, new_total_allowed=True) == ""
    with pytest.raises(ConfigError, match="micro_batch_size=5"):
        Batches(_data(), 10, 4, 0, 2).load_state_dict(saved)
    with pytest.raises(ConfigError, match="older data loader"):
        Batches(_data(), 10, 5, 0, 2).load_state_dict({"seed": 1, "tokens_digest": "x"})


def test_eval_batches_in_order_and_equal_per_rank():
    dataset = _data().train  # 100 samples -> 14 full batches of 7
    every = list(eval_batches(dataset, 7, None))
    assert len(every) == 14
    assert every[0][0][0].tolist() == list(range(10)) and every[1][0][0, 0].item() == 70
    assert len(list(eval_batches(dataset, 7, max_batches=3))) == 3
    shards = [list(eval_batches(dataset, 7, 5, dp_rank=r, dp_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 2  # 5 rounded down to a multiple of 2
    assert shards[1][0][0][0, 0].item() == 70
    with pytest.raises(ConfigError, match="fewer than one batch"):
        eval_batches(dataset, 101, None)


def test_data_config_errors_name_field_value_and_what_is_allowed(tmp_path):
    cases = [
        (dict(validation_fraction=0.7), "data.validation_fraction=0.7", "(0, 0.5]"),
        (dict(validation_fraction=0), "data.validation_fraction=0", "(0, 0.5]"),
        (dict(source=str(tmp_path / "nope")), "data.source=", "does not exist"),
        (dict(source="hf:"), "data.source='hf:'", "hf:NAME"),
        (dict(max_files=0), "data.max_files=0", ">= 1"),
        (dict(split_seed=1.5), "data.split_seed=1.5", "integer"),
        (dict(tokenizer="bpe:100"), "data.tokenizer='bpe:100'", "VOCAB >= 257"),
        (dict(tokenizer=str(tmp_path / "t.json")), "data.tokenizer=", "no such file"),
        (dict(prepare_workers=0), "data.prepare_workers=0", ">= 1"),
        (dict(eod_token=""), "data.eod_token=''", "token string"),
    ]
    for kwargs, field_value, allowed in cases:
        with pytest.raises(ConfigError) as err:
            DataConfig(**kwargs).validate()
        assert field_value in str(err.value) and allowed in str(err.value)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ConfigError, match="must end with one of"):
        DataConfig(source=str(tmp_path / "a.csv")).validate()
