"""The training-throughput benchmark runs every case and reports them."""

from __future__ import annotations

import pytest

from mtp_megatron.bench.train_throughput import (
    CASE_KEYS,
    LOCAL_KEY,
    NTP_KEY,
    main_bench_train,
    run_benchmark,
)
from mtp_megatron.config import ConfigError, ModelConfig

TINY = dict(vocab_size=200, hidden_size=32, num_layers=2, num_attention_heads=4, max_seq_len=16)


def test_benchmark_runs_every_case(single_process):
    cfg = ModelConfig(**TINY, mtp=None)
    result = run_benchmark(cfg, batch=2, seq_len=8, rounds=1, steps_per_round=1, warmup=0)
    assert list(result.cases) == list(CASE_KEYS)
    for case in result.cases.values():
        assert len(case.step_times_s) == 1
        assert case.params > 0 and case.tokens_per_s > 0
    assert result.cases[LOCAL_KEY].params == result.cases[NTP_KEY].params
    assert (
        result.cases["transformer"].params
        > result.cases["mlp"].params
        > result.cases["shared_lm_head"].params
        == result.cases[NTP_KEY].params
    )
    assert result.ratio_to_ntp(NTP_KEY) == 1.0 and result.ntp_over_local > 0
    assert len(result.paired_ntp_over_local()) == 1
    table = result.report()
    assert "| MTP K=4 shared_lm_head |" in table
    assert "our NTP / local-backend NTP step time:" in table


def test_cli_subset_and_errors(single_process, capsys):
    tiny = [f"model.{k}={v}" for k, v in TINY.items()] + ["model.mtp=null"]
    argv = [*tiny, "--cases", "local", "ntp", "--rounds", "1", "--steps-per-round", "1"]
    assert main_bench_train([*argv, "--warmup", "0", "--batch", "1", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "| NTP, local backend |" in out and "| NTP |" in out and "MTP" not in out
    assert main_bench_train([*tiny, "--seq-len", "64"]) == 2  # longer than max_seq_len
    assert "max_seq_len" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="cases"):
        run_benchmark(ModelConfig(**TINY), batch=1, seq_len=8, cases=["moe"])
    # the recipes leave model.vocab_size null: the tokenizer's (bpe:1000 here), as a run takes it
    shape = [f"model.{k}={v}" for k, v in TINY.items() if k != "vocab_size"]
    argv = [*shape, "data.tokenizer=bpe:1000", "--cases", "ntp", "--rounds", "1"]
    assert main_bench_train([*argv, "--steps-per-round", "1", "--warmup", "0"]) == 0
    assert "vocab 1000" in capsys.readouterr().out


@pytest.mark.slow  # trains and decodes in subprocesses: about 60 s here
def test_gpu_check_runs_its_stages_on_the_cpu(tmp_path):
    """The GPU check's commands, dry-run on the CPU with tiny shapes (a GPU runs them for real)."""
    import json
    import subprocess
    import sys

    out, work = tmp_path / "out", tmp_path / "work"
    stages = "tests,train,sdpa,decode,throughput,transformers"
    cmd = [sys.executable, "-m", "mtp_megatron", "gpu-check", "--device", "cpu", "--quick"]
    cmd += ["--stages", stages, "--out", str(out), "--work", str(work), "--budget-s", "300"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {name: s["status"] for name, s in summary["stages"].items()}
    assert status == {
        "tests": "skipped",  # needs CUDA
        "train": "ok",
        "sdpa": "ok",
        "decode": "ok",
        "throughput": "ok",
        "transformers": "ok",  # the peer table, greedy tokens identical in every row
    }, summary
    assert set(summary["stages"]["transformers"]["speedup_vs_transformers"]) == {"1", "4"}
    assert summary["stages"]["sdpa"]["kernels"]["math"] == {"train": "ok", "decode": "ok"}
    assert summary["stages"]["decode"]["tables"]["fp32"]["host_reads_per_token"] <= 2
    cases = summary["stages"]["throughput"]["cases"]
    assert set(cases) == {
        "NTP",
        "MTP K=3",
        "MTP K=3 sequential",
        "MTP K=3 sequential + checkpointing",
    }
    # the trainer's own optimizer is timed, and the heads' FLOPs are counted
    assert cases["NTP"]["optimizer"] == "DeepSpeedZeroOptimizer"
    assert cases["MTP K=3"]["gflops_per_token"] > 1.2 * cases["NTP"]["gflops_per_token"]
    assert summary["stages"]["train"]["precision"] == "fp32"
    # the reported folder holds the summary and figures only; the run stays in the work folder
    assert sorted(p.name for p in out.iterdir()) == [
        "check.log",
        "summary.json",
        "summary.txt",
        "train_loss.png",
    ]
    assert (work / "train" / "model.safetensors").is_file()
    assert "[gpu-check] summary" in proc.stdout
    assert (out / "summary.txt").read_text() in proc.stdout


@pytest.mark.slow  # starts two stage processes: about 20 s here
def test_a_gpu_check_stage_past_its_slice_is_stopped_and_the_next_runs(tmp_path, monkeypatch):
    """A stage gets its share of the budget; past it, its process group is stopped, it is
    reported as 'timeout', and the next stage still runs in what is left."""
    import json
    import subprocess

    from mtp_megatron.bench import gpu_check

    # memory (five measuring processes: about 30 s here) gets 6 s of the 60; sdpa the rest
    weights = {**gpu_check.STAGE_WEIGHTS, "memory": 2, "sdpa": 18}
    monkeypatch.setattr(gpu_check, "STAGE_WEIGHTS", weights)
    monkeypatch.setattr(gpu_check, "STOP_GRACE_S", 2.0)
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--stages", "memory,sdpa", "--budget-s", "60"]
    code = gpu_check.main_gpu_check([*argv, "--out", str(out), "--work", str(tmp_path / "w")])
    summary = json.loads((out / "summary.json").read_text())
    memory, sdpa = summary["stages"]["memory"], summary["stages"]["sdpa"]
    assert code == 1  # a stage that timed out fails the check
    assert memory["status"] == "timeout" and memory["slice_s"] == 6, memory
    assert memory["seconds"] < 6 + 5, memory  # stopped, not waited for
    # its whole process group went with it: no measuring child is left
    left = subprocess.run(["pgrep", "-f", "mtp_megatron.bench.memory"], capture_output=True)
    assert left.returncode == 1, left.stdout
    assert sdpa["status"] == "ok" and sdpa["slice_s"] > 40, sdpa
    assert "timeout" in (out / "summary.txt").read_text()


def test_gpu_check_shares_the_budget_by_weight():
    from mtp_megatron.bench.gpu_check import STAGE_WEIGHTS, _slice_s

    stages = list(STAGE_WEIGHTS)
    total = sum(STAGE_WEIGHTS.values())
    assert _slice_s(540, "train", stages) == pytest.approx(540 * STAGE_WEIGHTS["train"] / total)
    # what an earlier stage left unused goes to the ones still to run
    assert _slice_s(300, stages[-1], stages[-1:]) == 300


@pytest.mark.slow
def test_bench_data_runs_and_reports(tmp_path, capsys):
    """The indexed-data start-up benchmark: synthetic data written, cold and warm starts."""
    from mtp_megatron.bench.data_startup import main_bench_data, parse_size

    assert parse_size("10M") == 10_000_000 and parse_size("1.5B") == 1_500_000_000
    with pytest.raises(ConfigError, match="invalid"):
        parse_size("lots")
    argv = ["--sizes", "200K", "--dir", str(tmp_path), "--samples", "100"]
    assert main_bench_data(argv) == 0
    out = capsys.readouterr().out
    assert "| 200K tokens |" in out and (tmp_path / "synthetic-200K" / "manifest.json").is_file()
