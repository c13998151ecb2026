"""The memory benchmark at a tiny shape: one subprocess per case, a table, clear errors."""

from mtp_megatron.bench.memory import main_bench_memory

TINY = ["--vocab", "2048", "--hidden", "64", "--layers", "1", "--heads", "4"]
TINY += ["--seq-len", "64", "--batch", "2", "--k", "2", "--warmup", "0", "--steps", "1"]


def test_table_of_two_cases(capsys):
    assert main_bench_memory([*TINY, "--cases", "ntp", "sequential"]) == 0
    out = capsys.readouterr().out
    assert "| NTP |" in out and "| MTP K=2 sequential |" in out
    assert "MTP sequential / NTP peak step memory:" in out
    row = next(line for line in out.splitlines() if line.startswith("| MTP K=2 sequential |"))
    assert float(row.split("|")[4].replace(",", "")) > 0  # a measured peak above the model


def test_bad_shape_is_a_clear_error(capsys):
    assert main_bench_memory([*TINY, "--hidden", "66"]) == 2  # not divisible by 4 heads
    assert "hidden_size" in capsys.readouterr().err


def test_bf16_case_runs_and_is_labelled(capsys):
    assert main_bench_memory([*TINY, "--cases", "ntp", "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "heads; bf16, TP=1" in out and "| NTP |" in out
