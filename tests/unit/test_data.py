"""The data pipeline: corpus reading and skips, split, tokenizer, cache, packing, batches."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import sysconfig
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.data import (
    EOT_TOKEN,
    DataConfig,
    TokenBatches,
    eval_batches,
    load_tokenizer,
    prepare_data,
    prepare_data_distributed,
)
from mtp_megatron.data.cache import atomic_save_npy, unit_hash
from mtp_megatron.data.corpus import _list_files, read_corpus
from mtp_megatron.data.split import split_indices

VOCAB = 400
FRACTION = 0.2
WORDS = "alpha beta gamma delta value index count total result buffer parse token".split()


def _quiet(_: str) -> None:
    pass


def _name(prefix: str, validation: bool) -> str:
    """A file name that the split (seed 0) puts on the requested side."""
    for k in range(1000):
        name = f"{prefix}_{k}.txt"
        if (unit_hash("split", 0, name) < FRACTION) == validation:
            return name
    raise AssertionError("no such name")


def _write_corpus(root: Path) -> dict:
    """A few dozen small files plus every kind of bad input; returns what a reader should see."""
    rng = random.Random(0)
    root.mkdir()
    (root / "pkg").mkdir()
    for i in range(24):
        body = "".join(
            f"def {rng.choice(WORDS)}_{i}_{j}(x, y):\n"
            f"    return x * {rng.randint(0, 99)} + y  # {rng.choice(WORDS)}\n\n"
            for j in range(30)
        )
        (root / "pkg" / f"mod_{i:02d}.py").write_text(body)
    for i in range(8):
        text = " ".join(rng.choice(WORDS) for _ in range(300)) + ".\n"
        (root / f"notes_{i}.txt").write_text(text)
    (root / "README.md").write_text("# Title\n\nSome prose about the corpus.\n")
    # A train-only and a validation-only word, each repeated: BPE must learn only the first.
    (root / _name("train_word", validation=False)).write_text(" qvkw" * 400)
    (root / _name("val_word", validation=True)).write_text(" zqxj" * 400)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))  # not UTF-8
    (root / "empty.py").write_text("")
    rows = [json.dumps({"text": f"row {i}: " + " ".join(WORDS[i:] + WORDS[:i])}) for i in range(10)]
    rows[3:3] = ["{broken json", "", json.dumps({"title": "no text field"})]
    (root / "rows.jsonl").write_bytes(("\n".join(rows) + "\n").encode() + b'{"text": "\xff"}\n')
    parquet = ["parquet row one " * 20, None, "", "parquet row four " * 20]
    datasets.Dataset.from_dict({"text": parquet}).to_parquet(root / "table.parquet")
    # Not part of the corpus: hidden folders and unknown suffixes are never read.
    (root / ".hidden").mkdir()
    (root / ".hidden" / "secret.txt").write_text("hidden")
    (root / "blob.bin").write_bytes(b"\x00\x01")
    return {"files": 24 + 8 + 1 + 2 + 1 + 1 + 1 + 1, "documents": 24 + 8 + 1 + 2 + 10 + 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "corpus"
    expected = _write_corpus(root)
    cfg = DataConfig(
        source=str(root),
        validation_fraction=FRACTION,
        cache_dir=str(root.parent / "cache"),
    )
    logs: list[str] = []
    data = prepare_data(cfg, VOCAB, log=logs.append)
    return cfg, data, expected, logs


# ---------------------------------------------------------------------------------------------
# split


def test_split_depends_only_on_each_path():
    paths = [f"dir{i % 7}/file_{i}.py" for i in range(2000)]
    train, val = split_indices(paths, FRACTION, seed=0, log=_quiet)
    val_paths = {paths[i] for i in val}
    assert sorted(train + val) == list(range(len(paths)))
    assert abs(len(val) / len(paths) - FRACTION) < 0.03
    again = split_indices(paths, FRACTION, seed=0, log=_quiet)
    assert again == (train, val)
    # Reordering the files and adding others moves no existing document.
    reordered = list(reversed(paths)) + [f"new/file_{i}.py" for i in range(500)]
    _, val2 = split_indices(reordered, FRACTION, seed=0, log=_quiet)
    assert {reordered[i] for i in val2} & set(paths) == val_paths
    _, val_other_seed = split_indices(paths, FRACTION, seed=1, log=_quiet)
    assert {paths[i] for i in val_other_seed} != val_paths


def test_split_of_a_tiny_corpus_keeps_both_sides():
    train, val = split_indices(["a.txt", "b.txt"], 0.01, seed=0, log=_quiet)
    assert len(train) == 1 and len(val) == 1
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(["a.txt"], 0.1, seed=0, log=_quiet)


# ---------------------------------------------------------------------------------------------
# reading, skips, prepare_data


def test_reading_counts_every_skip(corpus):
    _, data, expected, logs = corpus
    s = data.stats
    assert s["files_read"] == expected["files"]
    assert s["train_documents"] + s["validation_documents"] == expected["documents"]
    assert s["train_documents"] > 0 and s["validation_documents"] > 0
    assert s["skipped_non_utf8"] == 2  # latin1.txt and the jsonl row with a \xff byte
    assert s["skipped_other"] == 3  # the broken JSON line, the row without 'text', a null row
    assert s["skipped_empty"] == 3  # empty.py, the empty jsonl line, the empty parquet row
    named = "\n".join(s["skipped_paths"])
    assert "latin1.txt: not valid UTF-8" in named
    assert "rows.jsonl:3: bad JSON" in named and "table.parquet:1: no string field" in named
    assert "secret" not in named and "blob" not in named
    assert any("skipped 2 not valid UTF-8" in line for line in logs)


def test_validation_holds_out_the_hashed_documents(corpus):
    cfg, data, _, _ = corpus
    docs = read_corpus(cfg, Path(cfg.cache_dir) / "hf", log=_quiet).documents
    paths = docs["path"][:]
    _, val = split_indices(paths, cfg.validation_fraction, cfg.split_seed, log=_quiet)
    assert {paths[i] for i in val} == {p for p in paths if unit_hash("split", 0, p) < FRACTION}
    # the stream holds each document followed by EOT: one EOT per document
    assert int((data.validation == data.eot_id).sum()) == len(val)
    assert int((data.train == data.eot_id).sum()) == len(paths) - len(val)


def test_tokenizer_round_trip_train_only_and_cache_hit(corpus):
    cfg, data, _, _ = corpus
    tok = load_tokenizer(data.tokenizer_path)
    assert data.eot_id == tok.token_to_id(EOT_TOKEN)
    assert tok.decode([data.eot_id], skip_special_tokens=False) == EOT_TOKEN
    snippet = "def f(x):\n    return {'a': x ** 2}  # ~`!@#$%^&*()\t\r\n"
    assert tok.decode(tok.encode(snippet).ids) == snippet
    assert tok.get_vocab_size() <= VOCAB
    # Trained on train documents only: the train-only word became one token, the other did not.
    assert len(tok.encode(" qvkw").ids) == 1
    assert len(tok.encode(" zqxj").ids) >= 3
    assert data.train.dtype == np.uint16 and data.validation.dtype == np.uint16
    assert not data.stats["cache_hit"]
    again = prepare_data(cfg, VOCAB, log=_quiet)
    assert again.stats["cache_hit"] and again.tokenizer_path == data.tokenizer_path
    assert np.array_equal(again.train, data.train)
    assert np.array_equal(again.validation, data.validation)


def test_stream_is_the_documents_separated_by_eot(corpus):
    cfg, data, _, _ = corpus
    tok = load_tokenizer(data.tokenizer_path)
    docs = read_corpus(cfg, Path(cfg.cache_dir) / "hf", log=_quiet).documents
    texts, paths = docs["text"][:], docs["path"][:]
    train, val = split_indices(paths, cfg.validation_fraction, cfg.split_seed, log=_quiet)
    for stream, rows in ((data.train, train), (data.validation, val)):
        assert stream[-1] == data.eot_id
        cuts = np.flatnonzero(stream == data.eot_id)
        pieces = np.split(np.asarray(stream), cuts + 1)[:-1]
        decoded = [tok.decode(p[:-1].tolist()) for p in pieces]
        assert sorted(decoded) == sorted(texts[i] for i in rows)
    # validation keeps path order; train is shuffled by shuffle_seed
    first_val = tok.decode(np.asarray(data.validation[: cuts[0]]).tolist())
    assert first_val == texts[val[0]]


def test_changed_settings_rebuild_and_a_corrupt_cache_is_not_trusted(corpus):
    cfg, data, _, _ = corpus
    other = prepare_data(DataConfig(**{**vars(cfg), "shuffle_seed": 7}), VOCAB, log=_quiet)
    assert other.stats["tokenizer_cache_hit"] and not other.stats["tokens_cache_hit"]
    assert not np.array_equal(other.train, data.train)  # same documents, other order
    assert np.array_equal(np.sort(other.train), np.sort(data.train))
    expected = np.array(other.train)
    folder = Path(other.train.filename).parent

    # What a crash or a stray file could leave; each must be rebuilt, not trusted. Files are
    # replaced, never rewritten in place: a live memmap of a file truncated under it is a SIGBUS
    # (the cache itself only ever renames new files into place).
    def truncated_bytes():
        (folder / "t").write_bytes((folder / "train.npy").read_bytes()[:1000])
        os.replace(folder / "t", folder / "train.npy")

    def valid_but_short():
        np.save(folder / "t.npy", expected[:1000])
        os.replace(folder / "t.npy", folder / "train.npy")

    def no_meta():  # a crash after the streams and before meta.json
        (folder / "meta.json").unlink()

    for corrupt in (truncated_bytes, valid_but_short, no_meta):
        corrupt()
        rebuilt = prepare_data(DataConfig(**{**vars(cfg), "shuffle_seed": 7}), VOCAB, log=_quiet)
        assert not rebuilt.stats["tokens_cache_hit"], corrupt.__name__
        assert np.array_equal(rebuilt.train, expected), corrupt.__name__


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.npy"

    def crash(f, array, allow_pickle):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_npy(target, np.arange(10))
    assert list(tmp_path.iterdir()) == []


def _prepare_in_child(cfg: DataConfig, queue) -> None:
    data = prepare_data(cfg, VOCAB, log=_quiet)
    queue.put((data.stats["tokens_cache_hit"], np.asarray(data.train).tobytes()))


@pytest.mark.timeout(120)
def test_concurrent_callers_build_once(corpus, tmp_path):
    cfg, _, _, _ = corpus
    fresh = DataConfig(**{**vars(cfg), "cache_dir": str(tmp_path / "cache")})
    ctx = multiprocessing.get_context("fork")  # the modules are loaded already: fast to start
    queue = ctx.Queue()
    procs = [ctx.Process(target=_prepare_in_child, args=(fresh, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=100) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert sorted(hit for hit, _ in results) == [False, True]  # one built, one waited and loaded
    assert results[0][1] == results[1][1]


def test_prepare_data_distributed_builds_on_rank_zero_first(corpus):
    cfg, _, _, _ = corpus
    events: list[str] = []
    for rank in (0, 1):
        data = prepare_data_distributed(
            cfg, VOCAB, rank, barrier=lambda r=rank: events.append(f"barrier {r}"), log=_quiet
        )
        events.append(f"done {rank}")
    assert events == ["barrier 0", "done 0", "barrier 1", "done 1"]
    assert data.stats["cache_hit"]
    # A failing rank 0 still reaches the barrier, so the other ranks fail instead of hanging.
    calls: list[str] = []
    single = DataConfig(**{**vars(cfg), "source": str(Path(cfg.source) / "README.md")})
    with pytest.raises(ValueError, match="needs at least 2"):
        prepare_data_distributed(single, VOCAB, 0, barrier=lambda: calls.append("b"), log=_quiet)
    assert calls == ["b"]


def test_stdlib_source_with_a_file_limit(tmp_path):
    cfg = DataConfig(max_files=40, cache_dir=str(tmp_path / "cache"))
    data = prepare_data(cfg, 300, log=_quiet)
    s = data.stats
    assert s["files_read"] == 40
    assert s["train_documents"] > s["validation_documents"] > 0
    assert len(data.train) > 10_000 and data.stats["vocab_size"] == 300
    # the interpreter's own modules only: site-packages differs between machines
    listed = [rel for rel, _ in _list_files(Path(sysconfig.get_paths()["stdlib"]), stdlib=True)]
    assert "os.py" in listed and "asyncio/tasks.py" in listed and listed == sorted(listed)
    assert not [rel for rel in listed if "site-packages" in rel]


def test_limits_pick_the_first_files_in_sorted_order(corpus):
    cfg, _, _, _ = corpus
    root = Path(cfg.source)
    # sorted: README.md, empty.py, latin1.txt, notes_0.txt, ...
    few = read_corpus(DataConfig(source=str(root), max_files=3), Path("unused"), log=_quiet)
    assert few.files_read == 3 and few.documents["path"][:] == ["README.md"]
    assert few.skipped_empty == 1 and few.skipped_non_utf8 == 1
    readme = (root / "README.md").stat().st_size
    one = read_corpus(DataConfig(source=str(root), max_bytes=readme), Path("unused"), log=_quiet)
    assert one.files_read == 1
    # one byte more: empty.py adds nothing, latin1.txt crosses the limit and is the last read
    three = read_corpus(
        DataConfig(source=str(root), max_bytes=readme + 1), Path("unused"), log=_quiet
    )
    assert three.files_read == 3


def test_config_errors_name_field_value_and_what_is_allowed(tmp_path, monkeypatch):
    cases = [
        (dict(validation_fraction=0.7), "data.validation_fraction=0.7", "(0, 0.5]"),
        (dict(validation_fraction=0), "data.validation_fraction=0", "(0, 0.5]"),
        (dict(source=str(tmp_path / "nope")), "data.source=", "does not exist"),
        (dict(source="hf:"), "data.source='hf:'", "hf:NAME"),
        (dict(max_files=0), "data.max_files=0", ">= 1"),
        (dict(split_seed=1.5), "data.split_seed=1.5", "integer"),
    ]
    for kwargs, field_value, allowed in cases:
        with pytest.raises(ConfigError) as err:
            DataConfig(**kwargs).validate()
        assert field_value in str(err.value) and allowed in str(err.value)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ConfigError, match="must end with one of"):
        DataConfig(source=str(tmp_path / "a.csv")).validate()
    with pytest.raises(ConfigError, match="vocab_size=100 is invalid"):
        prepare_data(DataConfig(cache_dir=str(tmp_path)), 100, log=_quiet)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/corpus' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError) as err:
        prepare_data(DataConfig(source="hf:org/corpus", cache_dir=str(tmp_path)), 300, log=_quiet)
    msg = str(err.value)
    assert "org/corpus" in msg and "network" in msg and "data.source=stdlib" in msg


def test_hub_rows_are_documents(monkeypatch):
    calls = []

    def fake_hub(name, config, split, cache_dir):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"text": ["first doc", None, "third doc", "fourth"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    cfg = DataConfig(source="hf:org/corpus:en", max_files=3)
    hub = read_corpus(cfg, Path("unused"), log=_quiet)
    assert calls == [("org/corpus", "en", "train")]
    assert hub.files_read == 3 and hub.skipped_other == 1
    assert hub.documents["path"][:] == ["org/corpus:0", "org/corpus:2"]
    with pytest.raises(ConfigError, match="data.text_field='body'.*has no such column"):
        read_corpus(DataConfig(source="hf:org/corpus", text_field="body"), Path("u"), log=_quiet)


# ---------------------------------------------------------------------------------------------
# batches


def _batches(**kw) -> TokenBatches:
    args = dict(tokens=np.arange(1001, dtype=np.uint16), seq_len=10, micro_batch_size=5, seed=3)
    return TokenBatches(**{**args, **kw})


def test_batches_are_shifted_windows_of_the_stream():
    tb = _batches()
    assert tb.num_chunks == 100
    x, y = tb.batch(step=2, micro_step=1, grad_accum=2)
    assert x.shape == y.shape == (5, 10) and x.dtype == y.dtype == torch.int64
    assert (y[:, :-1] == x[:, 1:]).all()
    for row, chunk in zip(x, tb.chunk_ids(2, 1, 2)):
        assert row.tolist() == list(range(chunk * 10, chunk * 10 + 10))
    with pytest.raises(ValueError, match="too few for one sequence"):
        TokenBatches(np.arange(10), seq_len=10, micro_batch_size=1)
    with pytest.raises(ValueError, match="micro_step=2"):
        tb.batch(0, 2, 2)


def test_data_parallel_ranks_read_disjoint_chunks_and_resume_exactly():
    grad_accum, steps_per_epoch = 2, 5  # 2 micro x 2 ranks x 5 samples = 20 chunks per step
    ranks = [_batches(dp_rank=r, dp_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        seen = [
            [c for s in range(steps_per_epoch) for m in range(grad_accum)
             for c in tb.chunk_ids(epoch * steps_per_epoch + s, m, grad_accum)]
            for tb in ranks
        ]  # fmt: skip
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(100))
    # A fresh object (a resumed run) gives the same batch, whatever was drawn before.
    fresh = _batches(dp_rank=1, dp_size=2)
    x_fresh, _ = fresh.batch(7, 1, grad_accum)
    x_old, _ = ranks[1].batch(7, 1, grad_accum)
    assert (x_fresh == x_old).all()
    other_seed = _batches(dp_rank=1, dp_size=2, seed=4)
    assert not np.array_equal(other_seed.chunk_ids(7, 1, 2), fresh.chunk_ids(7, 1, 2))
    assert not np.array_equal(ranks[0].permutation(0), ranks[0].permutation(1))


def test_loader_state_restores_the_seed_and_refuses_other_data():
    saved = _batches(seed=11).state_dict()
    tb = _batches(seed=3)
    tb.load_state_dict(saved)
    assert tb.seed == 11
    assert np.array_equal(tb.chunk_ids(4, 0, 1), _batches(seed=11).chunk_ids(4, 0, 1))
    with pytest.raises(ValueError, match="seq_len=10, this run has seq_len=20"):
        _batches(seq_len=20).load_state_dict(saved)
    with pytest.raises(ValueError, match="num_tokens=1001"):
        _batches(tokens=np.arange(2001, dtype=np.uint16)).load_state_dict(saved)
    changed = np.arange(1001, dtype=np.uint16)
    changed[500] = 0
    with pytest.raises(ValueError, match="tokens_digest"):
        _batches(tokens=changed).load_state_dict(saved)


def test_eval_batches_in_order_and_equal_per_rank():
    tokens = np.arange(1001, dtype=np.uint16)  # 100 chunks of 10 -> 14 full batches of 7
    all_batches = list(eval_batches(tokens, 10, 7))
    assert len(all_batches) == 14
    assert all_batches[0][0][0].tolist() == list(range(10))
    assert all_batches[1][0][0, 0].item() == 70
    assert len(list(eval_batches(tokens, 10, 7, max_batches=3))) == 3
    shards = [
        list(eval_batches(tokens, 10, 7, max_batches=5, dp_rank=r, dp_size=2)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 2  # 5 rounded down to a multiple of 2
    assert shards[1][0][0][0, 0].item() == 70
    with pytest.raises(ValueError, match="fewer than one batch"):
        eval_batches(tokens, 10, 101)
