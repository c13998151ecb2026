"""Every reproduction (``python -m mtp_megatron research NAME``) end to end at ``--quick`` size:
its trainings through the trainer (subprocesses), its files, its numbers in range."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.distributed


def test_every_study_runs_quick_and_writes_its_table_and_plot(tmp_path):
    """Five tiny trainings (about a minute); the fixed-K run serves two studies."""
    from mtp_megatron.research import STUDIES, main_research

    out, work = tmp_path / "docs", tmp_path / "runs"
    assert main_research(["all", "--quick", "--out", str(out), "--work-dir", str(work)]) == 0
    for name in STUDIES:
        results = json.loads((out / name / "results.json").read_text())
        assert results["command"] == f"python -m mtp_megatron research {name} --quick"
        assert results["wall_time_s"] > 0
        assert "| " in (out / name / "results.md").read_text()
        assert list((out / name).glob("*.png")), name
    fast = json.loads((out / "fastmtp" / "results.json").read_text())
    for drafter in ("shared head, K=3", "K=1 head, recursion"):
        rates = fast[drafter]["acceptance_per_position"]
        assert len(rates) == 3 and all(0 <= r <= 1 for r in rates)
        assert fast[drafter]["tokens_per_forward"] >= 1.0
    curriculum = json.loads((out / "curriculum" / "results.json").read_text())
    assert set(curriculum) >= {"NTP", "fixed K=3", "forward", "reverse"}
    acceptance = json.loads((out / "acceptance" / "results.json").read_text())
    assert acceptance["steps"] == [4, 8, 12] and len(acceptance["acceptance_pos_3"]) == 3
    # the fixed-K run is shared by fastmtp and curriculum: trained once
    assert (work / "quick-k3" / "final_eval.json").exists()
