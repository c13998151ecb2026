"""The command line: one module per area, each command a ``main_<name>(argv) -> int`` that parses
its own arguments (``__main__.py`` is the table of commands).

    train.py    train, check, dry-run, params, consolidate, demo
    data.py     prepare
    decode.py   generate, bench-decode
    hf.py       import-hf, export-hf

The benchmarks, ``etd-split``, ``sweep``, ``report`` and ``research`` keep their ``main_*`` in
the module that does the work. This layer sits on top: it may import any part of the package,
nothing imports it but ``__main__``.
"""

from __future__ import annotations

import argparse


def command_parser(name: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m mtp_megatron NAME``."""
    return argparse.ArgumentParser(prog=f"python -m mtp_megatron {name}", description=description)
