"""`prepare`: Hugging Face tokenizers, Megatron indexed datasets (byte-identical to megatron-core's
builder), worker-count independence, skipped input counted by reason, crash-safe reuse."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import PrepareConfig
from mtp_megatron.data import prepare_indexed
from mtp_megatron.data.indexed import IndexedWriter
from mtp_megatron.data.manifest import prefixes
from mtp_megatron.data.prepare_indexed import prepare
from mtp_megatron.data.tokenizer import load_hf_tokenizer
from tests.cases.indexed import TEXTS, tokenizer_dir


def _read_prefix(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(str(prefix), mmap=True)
    return [data[i].tolist() for i in range(len(data))]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_writer_is_megatrons_format_byte_for_byte(tmp_path, dtype):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 60000, size=n) for n in (5, 1, 17, 300, 2)]
    with IndexedWriter(tmp_path / "ours", dtype) as writer:
        for doc in docs:
            writer.add_document(doc)
        stats = writer.finish()
    builder = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
    for doc in docs:  # as Megatron-LM's preprocess_data.py: one item per document
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(tmp_path / "theirs.idx"))
    for suffix in (".bin", ".idx"):
        ours = (tmp_path / f"ours{suffix}").read_bytes()
        assert ours == (tmp_path / f"theirs{suffix}").read_bytes(), suffix
    assert _read_prefix(tmp_path / "ours") == [d.tolist() for d in docs]
    assert (stats.documents, stats.tokens) == (5, sum(len(d) for d in docs))


def test_writer_refuses_an_id_its_dtype_cannot_hold_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="token id 70000 does not fit uint16"):
        with IndexedWriter(tmp_path / "p", np.uint16) as writer:
            writer.add_document([1, 2, 3])
            writer.add_document([70000])
    assert list(tmp_path.iterdir()) == []  # no prefix, no temporary file


def test_hf_tokenizer_end_of_document_token(tmp_path):
    folder = tokenizer_dir(tmp_path, "</s>")
    from_config = load_hf_tokenizer(folder)  # tokenizer_config.json's eos_token
    assert from_config.eod_token == "</s>" and from_config.eod_id == 1
    (tmp_path / "bare").mkdir()
    bare = tokenizer_dir(tmp_path / "bare", "</s>", config=False)
    from_recipe = load_hf_tokenizer(bare / "tokenizer.json", eod_token="</s>")
    assert from_recipe.eod_id == 1 and from_recipe.vocab_size == from_config.vocab_size
    with pytest.raises(ConfigError, match=r"tried '<\|endoftext\|>' \(the default\)"):
        load_hf_tokenizer(bare / "tokenizer.json")  # no end token anywhere it looks
    with pytest.raises(ConfigError, match=r"tried '<eot>' \(the recipe's eod_token\)"):
        load_hf_tokenizer(folder, eod_token="<eot>")  # an explicit choice must exist
    none = tokenizer_dir(tmp_path, None)
    with pytest.raises(ConfigError, match="no end-of-document token"):
        load_hf_tokenizer(none)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="save_pretrained"):
        load_hf_tokenizer(empty)


def _corpus(root: Path) -> Path:
    """Good and bad input of every kind: text files, jsonl rows, parquet row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = root / "corpus"
    (corpus / "code").mkdir(parents=True)
    for i, text in enumerate(TEXTS[:20]):
        (corpus / "code" / f"m{i:02d}.py").write_text(text)
    (corpus / "notes.md").write_text("# notes\n\nsome *markdown*\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (corpus / "blank.txt").write_text("  \n")
    (corpus / ".hidden.txt").write_text("never read")
    lines = [json.dumps({"text": t}) for t in TEXTS[20:40]]
    lines += [
        '{"text": broken',
        json.dumps({"body": "no text field"}),
        "",
        json.dumps({"text": ""}),
        '{"text": "\\ud800"}',  # valid JSON, a lone surrogate: no UTF-8 text
    ]
    (corpus / "rows.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"text": TEXTS[40:60], "n": list(range(20))})
    pq.write_table(table, corpus / "rows.parquet", row_group_size=7)  # 3 row groups
    good = (corpus / "rows.parquet").read_bytes()
    (corpus / "cut.parquet").write_bytes(good[: len(good) // 2])  # truncated
    return corpus


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.parent.name in ("train", "validation")
    }


def _config(corpus: Path, tok: Path, out: Path, **kw) -> PrepareConfig:
    """Every input file its own shard unless ``shard_mb`` says otherwise."""
    kw.setdefault("shard_mb", 1e-6)
    return PrepareConfig(
        inputs=[str(corpus)], tokenizer=str(tok), output=str(out), validation_fraction=0.2, **kw
    )


def _decoded(dataset: Path, hf) -> Counter:
    """Every document read back through megatron-core, decoded, checked to end with EOD."""
    decoded = Counter()
    for split in ("train", "validation"):
        for prefix, tokens in prefixes(dataset, split):
            docs = _read_prefix(prefix)
            assert sum(map(len, docs)) == tokens
            for ids in docs:
                assert ids[-1] == hf.eod_id
                decoded[hf.tokenizer.decode(ids[:-1])] += 1
    return decoded


def test_prepare_is_independent_of_workers_and_counts_what_it_skips(tmp_path):
    corpus, tok = _corpus(tmp_path), tokenizer_dir(tmp_path)
    one = prepare(_config(corpus, tok, tmp_path / "one", workers=1), log=lambda _: None)
    two = prepare(_config(corpus, tok, tmp_path / "two", workers=2), log=lambda _: None)
    assert _files(tmp_path / "one") == _files(tmp_path / "two") != {}
    assert one["fingerprint"] == two["fingerprint"]
    totals = one["totals"]
    assert totals["skipped"] == {
        "bad_json": 1,
        "empty": 3,  # blank.txt, the empty line, the row with an empty text
        "no_text_field": 1,
        "not_utf8": 2,  # latin1.txt, the lone surrogate
        "unreadable": 1,  # cut.parquet
    }
    documents = totals["documents"]["train"] + totals["documents"]["validation"]
    assert documents == 20 + 1 + 20 + 20  # .py files, notes.md, jsonl rows, parquet rows
    assert totals["documents"]["validation"] > 0 and one["dtype"] == "uint16"
    # read back through megatron-core: every document once, encoded, ending with </s>
    hf = load_hf_tokenizer(tok)
    expected = Counter(TEXTS + ["# notes\n\nsome *markdown*\n"])
    assert _decoded(tmp_path / "one", hf) == expected
    # small files grouped into shards of ~1 kB: fewer shards, the same documents and split
    grouped = prepare(_config(corpus, tok, tmp_path / "grouped", shard_mb=1e-3), lambda _: None)
    assert 1 < len(grouped["shards"]) < len(one["shards"])
    assert grouped["totals"] == one["totals"]
    assert _decoded(tmp_path / "grouped", hf) == expected


def test_a_crash_leaves_no_manifest_and_the_rerun_reuses_finished_shards(tmp_path, monkeypatch):
    corpus, tok = _corpus(tmp_path), tokenizer_dir(tmp_path)
    clean = prepare(_config(corpus, tok, tmp_path / "clean"), log=lambda _: None)
    real = prepare_indexed.iter_documents
    calls = []

    def failing(file, *args):
        calls.append(file.name)
        if len(calls) == 3:
            raise RuntimeError("killed mid-shard")
        return real(file, *args)

    monkeypatch.setattr(prepare_indexed, "iter_documents", failing)
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="killed mid-shard"):
        prepare(_config(corpus, tok, out), log=lambda _: None)
    assert not (out / "manifest.json").exists()
    assert len(list((out / "shards").glob("*.json"))) == 2  # the two shards before the crash
    monkeypatch.setattr(prepare_indexed, "iter_documents", real)
    lines = []
    again = prepare(_config(corpus, tok, out), log=lines.append)
    assert "(2 already done)" in lines[0]
    assert again["fingerprint"] == clean["fingerprint"]
    assert _files(out) == _files(tmp_path / "clean")
    # nothing changed: a no-op that leaves the manifest alone
    stamp = (out / "manifest.json").stat().st_mtime_ns
    lines.clear()
    prepare(_config(corpus, tok, out), log=lines.append)
    assert f"({len(again['shards'])} already done)" in lines[0]
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # one input file changed: that shard is redone and the fingerprint changes
    (corpus / "notes.md").write_text("# other notes\n")
    changed = prepare(_config(corpus, tok, out), log=lambda _: None)
    assert changed["fingerprint"] != clean["fingerprint"]


def test_prepare_command_and_its_errors(tmp_path, capsys):
    from mtp_megatron.__main__ import main

    corpus, tok = _corpus(tmp_path), tokenizer_dir(tmp_path)
    out = tmp_path / "out"
    argv = ["prepare", str(corpus / "code"), "--tokenizer", str(tok), "--output", str(out)]
    assert main(argv) == 0
    assert "fingerprint" in capsys.readouterr().out and (out / "manifest.json").is_file()
    assert main([*argv[:2], "--tokenizer", str(tmp_path / "missing.json"), "--output", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert (
        main(["prepare", str(tmp_path / "nothing*"), "--tokenizer", str(tok), "--output", "x"]) == 2
    )
    assert "no file, directory or matching glob" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no prepared dataset"):
        prefixes(tmp_path / "x", "train")


def test_the_projects_own_bpe_is_trained_once_on_the_train_split(tmp_path):
    corpus = _corpus(tmp_path)
    lines: list[str] = []
    one = prepare(_config(corpus, "bpe:300", tmp_path / "one", workers=1), log=lines.append)
    assert any("training a byte-level BPE of 300 tokens" in line for line in lines)
    two = prepare(_config(corpus, "bpe:300", tmp_path / "two", workers=2), log=lambda _: None)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    assert one["fingerprint"] == two["fingerprint"]
    assert one["tokenizer"]["eod_token"] == "<|endoftext|>" and one["tokenizer"]["eod_id"] == 0
    hf = load_hf_tokenizer(tmp_path / "one" / "tokenizer.json")
    assert hf.vocab_size <= 300
    assert _decoded(tmp_path / "one", hf) == Counter(TEXTS + ["# notes\n\nsome *markdown*\n"])
    lines.clear()
    prepare(_config(corpus, "bpe:300", tmp_path / "one"), log=lines.append)  # nothing changed
    assert not any("training" in line for line in lines)
    with pytest.raises(ConfigError, match="'bpe:VOCAB'"):
        prepare(_config(corpus, "bpe:lots", tmp_path / "x"), log=lambda _: None)


def test_a_rerun_never_reuses_a_shard_whose_files_another_run_replaced(tmp_path, monkeypatch):
    """Run B (another tokenizer) dies after writing shard 0's files but before its record:
    run A again must redo shard 0, not trust A's old record next to B's files."""
    corpus, tok_a = _corpus(tmp_path), tokenizer_dir(tmp_path)
    (tmp_path / "b").mkdir()
    tok_b = tokenizer_dir(tmp_path / "b", "<s>")  # other ids
    clean = prepare(_config(corpus, tok_a, tmp_path / "clean"), log=lambda _: None)
    out = tmp_path / "out"
    prepare(_config(corpus, tok_a, out), log=lambda _: None)
    real = prepare_indexed.atomic_write_json

    def dies_before_the_record(path, obj):
        if path.parent.name == "shards":
            raise RuntimeError("killed before the record")
        return real(path, obj)

    monkeypatch.setattr(prepare_indexed, "atomic_write_json", dies_before_the_record)
    with pytest.raises(RuntimeError, match="killed"):
        prepare(_config(corpus, tok_b, out), log=lambda _: None)
    monkeypatch.setattr(prepare_indexed, "atomic_write_json", real)
    lines = []
    again = prepare(_config(corpus, tok_a, out), log=lines.append)
    assert f"({len(clean['shards']) - 1} already done)" in lines[0]  # shard 0 redone
    assert _files(out) == _files(tmp_path / "clean") and again == clean
