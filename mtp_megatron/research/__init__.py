"""Reproductions of published MTP findings at CPU scale: ``python -m mtp_megatron research NAME``.

Each study trains what it needs (reusing finished runs under ``--work-dir``), measures, and
writes ``results.md`` (its table, the command and the wall time), ``results.json`` and a plot
into ``docs/research/NAME/``; that folder's README.md says what the paper found and what we did.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from mtp_megatron.research.common import REPO, Study

STUDIES = {
    "fastmtp": "FastMTP's shared K=3 head vs a K=1 head applied recursively (acceptance at L=3)",
    "induction": "Gloeckle et al.: induction accuracy of NTP vs n=2 at three sizes, 3 seeds",
    "curriculum": "Aynetdinov & Akbik: forward / reverse curriculum vs fixed K and NTP",
    "acceptance": "acceptance per draft position over the reference recipe's training (~35 min)",
}


def main_research(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron research",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", choices=[*STUDIES, "all"], help="; ".join(f"{k}: {v}" for k, v in STUDIES.items())
    )
    parser.add_argument("--out", default=str(REPO / "docs" / "research"), help="results root")
    parser.add_argument(
        "--work-dir", default=str(REPO / "runs" / "research"), help="the studies' training runs"
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    args = parser.parse_args(argv)
    names = list(STUDIES) if args.name == "all" else [args.name]
    for name in names:
        module = importlib.import_module(f"mtp_megatron.research.{name}")
        study = Study(Path(args.out) / name, Path(args.work_dir), quick=args.quick)
        found = module.run(study)
        quick = " --quick" if args.quick else ""
        study.write(
            name, found["table"], found["results"], f"python -m mtp_megatron research {name}{quick}"
        )
    return 0
