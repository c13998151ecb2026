"""Side-by-side report of a sweep, from its TensorBoard logs.

    python -m mtp_megatron report RUNS_DIR [--out DIR] [--smooth 0.6]

Reads every run under RUNS_DIR (a folder with ``recipe.yaml``; its ``<timestamp>/`` TensorBoard
folders merged by step; ``final_eval.json`` when the logs lack a validation tag) and writes to
``--out`` (default RUNS_DIR): ``report.md`` and ``report.csv`` (per run: final train loss, final
validation loss and top-1 accuracy per head, acceptance per draft position, median tokens/s,
decode speed-up when ``decode/speedup`` was logged), ``loss_curves.png`` and ``acceptance.png``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from pathlib import Path

from mtp_megatron.report.runs import ReportError, Run, find_runs
from mtp_megatron.report.tables import rows, to_csv, to_markdown

__all__ = ["ReportError", "Run", "find_runs", "main_report", "write_report"]


def write_report(
    runs_dir: str | Path, out: str | Path | None = None, smooth: float = 0.0
) -> dict[str, Path]:
    """Write the report files; returns {kind: path}. Raises ReportError on bad input."""
    from mtp_megatron.report import plots

    runs = find_runs(runs_dir)
    out = Path(out or runs_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs)
    files = {
        "csv": out / "report.csv",
        "md": out / "report.md",
        "loss_curves": out / "loss_curves.png",
    }
    files["csv"].write_text(to_csv(table))
    plots.loss_curves(runs, files["loss_curves"], smooth=smooth)
    if plots.acceptance(runs, out / "acceptance.png"):
        files["acceptance"] = out / "acceptance.png"
    empty = [r.name for r in runs if not r.scalars]
    md = [
        f"# Sweep report: {runs_dir}",
        "",
        f"{len(runs)} runs, generated {datetime.now():%Y-%m-%d %H:%M}. Losses are "
        "cross-entropy in nats at each run's last logged step; *train loss* is what the run "
        "optimised (main + w·MTP), *train main* and *val main* are next-token losses "
        "(comparable across K). Acceptance: head k's argmax at i equals the main head's at "
        "i+k (greedy proxy). Best value per column in bold.",
        "",
    ]
    if empty:
        md += [f"No TensorBoard events yet: {', '.join(empty)}.", ""]
    md += [to_markdown(table), "", "![loss curves](loss_curves.png)", ""]
    if "acceptance" in files:
        md += ["![acceptance per draft position](acceptance.png)", ""]
    else:
        md += ["No run has MTP heads: no acceptance plot.", ""]
    files["md"].write_text("\n".join(md))
    return files


def main_report(argv: list[str]) -> int:
    """``report RUNS_DIR [--out DIR] [--smooth W]``; 0 on success, 2 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron report",
        description="Side-by-side table (markdown + CSV) and plots of the runs under RUNS_DIR.",
    )
    parser.add_argument("runs_dir", help="a sweep folder (runs/<sweep>) or any folder of runs")
    parser.add_argument("--out", default=None, help="where to write (default: RUNS_DIR)")
    parser.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="EMA weight for the training curves, 0 (raw) to <1",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.smooth < 1:
        print(f"error: --smooth={args.smooth} must be in [0, 1)", file=sys.stderr)
        return 2
    try:
        files = write_report(args.runs_dir, args.out, args.smooth)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md = files["md"].read_text()
    print(md[md.index("### ") : md.index("![")].rstrip())
    print("\nwrote " + ", ".join(str(p) for p in files.values()))
    return 0
