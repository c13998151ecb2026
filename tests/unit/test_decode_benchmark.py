"""bench-decode's rows: ours and transformers' generate on the same exported weights."""

from __future__ import annotations

import pytest
import torch

from mtp_megatron.bench.decode import cost_table, peer_speedups, run_decode_benchmark, table
from mtp_megatron.bench.decode_inputs import directory_prompts
from mtp_megatron.config import ConfigError, MTPConfig
from mtp_megatron.decoding.load import load_run
from tests.cases.hf import consolidated_run, twin_config


@pytest.fixture
def trained(tmp_path, single_process):
    """A consolidated random Exaone4-twin run with two chained transformer heads."""
    cfg = twin_config(
        "exaone4", tied=True, mtp=MTPConfig(num_predict_tokens=2, speculation_lookahead=2)
    )
    cfg.max_seq_len = 64
    folder, _ = consolidated_run(tmp_path, cfg)
    return load_run(folder)


def test_peer_rows_are_greedy_identical_and_report_both_speedups(trained):
    from mtp_megatron.bench.decode_peers import TransformersPeer

    peer = TransformersPeer(trained.folder)
    assert peer.family == "Exaone4ForCausalLM" and peer.mtp_exported
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 400, (1, 8), generator=gen) for _ in range(4)]
    calibration = [torch.randint(0, 400, (1, 8), generator=gen)]
    rows = run_decode_benchmark(
        trained, prompts, 10, [1, 2], batch_sizes=(1, 2), peer=peer, calibration=calibration
    )
    auto = [r for r in rows if r.auto]
    assert [r.batch for r in auto] == [1, 2] and all(r.calibration_s > 0 for r in auto)
    rows = [r for r in rows if not r.auto]
    names = [(r.method, r.batch) for r in rows]
    assert names == [
        ("plain", 1),
        ("speculative L=1", 1),
        ("speculative L=2", 1),
        ("transformers generate", 1),
        ("transformers use_mtp (our heads)", 1),
        ("transformers prompt lookup (3)", 1),
        ("plain", 2),
        ("speculative L=1", 2),
        ("speculative L=2", 2),
        ("transformers generate", 2),  # assisted generation is batch 1 only
    ]
    # every row generated every token, greedy, identical to our plain decoding
    assert all(r.identical for r in rows + auto), [r.method for r in rows if not r.identical]
    assert all(r.new_tokens == 40 for r in rows)
    by = {(r.method, r.batch): r for r in rows}
    assert by[("transformers generate", 1)].forward_calls == 4 * 10  # hook counts forwards
    assert by[("transformers generate", 2)].tokens_per_forward == pytest.approx(1.0)
    spec = by[("speculative L=2", 1)]
    assert spec.rounds > 0 and spec.draft_s > 0 and spec.verify_s > 0
    assert 1.0 <= spec.theory_tokens_per_forward <= 3.0
    md = table(rows)
    assert "| vs our plain | vs transformers generate |" in md
    assert md.count("| 1.00x |") >= 2  # each baseline against itself
    assert "| speculative L=2 | 2 |" in cost_table(rows)
    assert set(peer_speedups(rows)) == {1, 2}


def test_prompts_from_a_directory(trained, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "a.py").write_text("def f(x):\n    return x + 1\n" * 20)
    (code / "notes.bin").write_bytes(b"\x00\x01")  # not a text suffix: not read
    prompts = directory_prompts(code, trained.tokenizer_path, 3, 6)
    assert [tuple(p.shape) for p in prompts] == [(1, 6)] * 3
    with pytest.raises(ConfigError, match="too few for 10000-token prompts"):
        directory_prompts(code, trained.tokenizer_path, 3, 10_000)
    with pytest.raises(ConfigError, match="not a directory"):
        directory_prompts(tmp_path / "missing", trained.tokenizer_path, 3, 6)


def test_lookahead_auto_calibrates_per_batch_size_and_keeps_greedy_output(trained):
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.calibrate import Calibration, calibrate

    decoder = trained.model.mtp_decoder
    assert trained.model.mtp_decoder is decoder  # one per model: its calibrations stay
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 400, (1, 8), generator=gen)
    plain, _ = generate_plain(trained.model, prompt, 12)
    found = calibrate(decoder, [prompt], max_new_tokens=8)
    assert set(found.tokens_per_s) == {0, 1, 2} and found.seconds > 0
    assert found.lookahead == max(found.tokens_per_s, key=found.tokens_per_s.get)
    out, stats = decoder.generate(prompt, 12, lookahead="auto")
    assert torch.equal(out, plain) and stats["lookahead"] == found.lookahead
    for chosen in (0, 2):  # plain decoding won, or the deepest lookahead did
        decoder.calibrations[1] = Calibration(1, chosen)
        out, stats = decoder.generate(prompt, 12, lookahead="auto")
        assert torch.equal(out, plain) and stats["lookahead"] == chosen
    batch = torch.randint(0, 400, (2, 8), generator=gen)  # a new batch size calibrates anew
    out, _ = decoder.generate(batch, 6, lookahead="auto")
    assert 2 in decoder.calibrations and torch.equal(
        out, generate_plain(trained.model, batch, 6)[0]
    )
    with pytest.raises(ConfigError, match="or 'auto'"):
        decoder.generate(prompt, 4, lookahead="fast")


def test_draft_vocabulary_is_built_once_per_ids_and_weights(trained):
    decoder = trained.model.mtp_decoder
    prompt = torch.arange(8)[None]
    ids = list(range(0, 400, 3))
    plain, _ = decoder.generate(prompt, 6, lookahead=2)
    out, _ = decoder.generate(prompt, 6, lookahead=2, draft_vocab=ids)
    first = decoder._vocab_cache[2]
    decoder.generate(prompt, 6, lookahead=2, draft_vocab=torch.tensor(ids))
    assert decoder._vocab_cache[2] is first and torch.equal(out, plain)
    decoder.generate(prompt, 6, lookahead=2, draft_vocab=ids[:-1])  # other ids: rebuilt
    assert decoder._vocab_cache[2] is not first
    with torch.no_grad():
        trained.model.trunk.output_weight.mul_(1.0)  # the weights changed in place: rebuilt
    rebuilt = decoder._vocab_cache[2]
    decoder.generate(prompt, 6, lookahead=2, draft_vocab=ids[:-1])
    assert decoder._vocab_cache[2] is not rebuilt


def test_calibration_fits_beside_a_long_prompt(trained):
    """A prompt near max_seq_len (64 here) still calibrates: fewer new tokens per trial."""
    from mtp_megatron.decoding.calibrate import calibrate

    prompt = torch.arange(50)[None] % 400
    found = calibrate(trained.model.mtp_decoder, [prompt])  # 32 would not fit
    assert set(found.tokens_per_s) == {0, 1, 2}


def test_decoding_under_inference_mode_and_a_summary_without_batch_one(trained):
    """Inference tensors have no version counter: the RoPE memo and the KV plan do without."""
    from mtp_megatron.bench.decode import DecodeRow, best_speedup
    from mtp_megatron.decoding import generate_plain

    prompt = torch.arange(8)[None]
    plain, _ = generate_plain(trained.model, prompt, 8)
    with torch.inference_mode():
        again, _ = generate_plain(trained.model, prompt, 8)
        spec, _ = trained.model.mtp_decoder.generate(prompt, 8, lookahead=2)
        trained.model(prompt)
    assert torch.equal(again, plain) and torch.equal(spec, plain)
    rows = [DecodeRow("plain", 0, 4, wall_s=2.0), DecodeRow("speculative L=1", 1, 4, wall_s=1.0)]
    assert best_speedup(rows) == (2.0, 1)  # the smallest batch measured, not batch 1
