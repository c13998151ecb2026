"""The memory plan's model states against a real DeepSpeed engine's: ``bench-plan`` trains a
few steps in a 2-process torchrun job and measures rank 0's memory between steps and at the
step's peak; the plan of the same run must be within 15% of both."""

from __future__ import annotations

import pytest

from mtp_megatron.bench.plan_check import main_bench_plan

pytestmark = pytest.mark.distributed


def test_plan_is_within_15_percent_of_a_deepspeed_step(capsys):
    shape = ["--hidden", "512", "--vocab", "16384", "--layers", "4", "--heads", "8"]
    configs = ["bf16:2", "fp32:1"]  # the GPU's default and the CPU's
    assert main_bench_plan([*shape, "--nproc", "2", "--configs", *configs]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].split("|")]
    assert len(rows) == 1 + len(configs)  # the header, a row per configuration
    for row in rows[1:]:
        cells = [c.strip() for c in row.split("|")]
        for column in ("plan / steady", "plan / peak"):
            ratio = float(cells[header.index(column)])
            assert 0.85 <= ratio <= 1.15, f"{cells[1]} {column}: {ratio}"
