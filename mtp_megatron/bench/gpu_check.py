"""The GPU check: one command that runs what only a GPU can show, each stage under a deadline.

    python -m mtp_megatron gpu-check [--budget-s 540] [--out DIR] [--work DIR] [--stages ...]
    scripts/gpu_check.sh WHEELS OUT      # on a node without network: docs/gpus.md

Stages (``gpu_stages.py``), in order; each runs in a process of its own:

- ``tests``: the ``gpu``-marked tests (``tests/gpu/``): CUDA vs CPU loss and gradient parity in
  fp32 and bf16, sequential backward and checkpointing vs plain on CUDA, decoding on CUDA, a
  bf16 ZeRO training run.
- ``train``: the demo recipe with a GPU's defaults (bf16), stopped halfway and resumed.
- ``sdpa``: which SDPA kernels (flash, memory-efficient, cuDNN, math) accept a training
  forward + backward and a KV-cached decode step of our attention.
- ``decode``: the decode tables (plain vs speculative) of the trained run in fp32 and bf16,
  with the host reads per token that decoding made.
- ``throughput``: tokens/s and MFU of the trainer's own step (its DeepSpeed optimizer) for NTP,
  MTP K=3, sequential and sequential + checkpointing at h 2048, 16 layers, vocab 32k, seq 2048
  (0.94B parameters, 1.00B with the heads; ``--quick``: a tiny shape). FLOPs per token are
  counted from the model (``flops.py``); the peak comes from the device's name.
- ``memory``: ``bench-memory`` on this device.
- ``transformers``: bench-decode's peer table: ours against transformers' ``generate`` (plain,
  ``use_mtp`` with our heads, prompt lookup) on the same weights, batch 1 and 4.

**Deadlines.** Each stage gets a slice of what is left of the budget, in proportion to its
weight among the stages still to run (time a stage leaves unused goes to the later ones). A
stage past its slice is stopped (its whole process group) and reported as 'timeout'; the next
one runs. One summary is printed and written to ``<out>`` with the figures: ``summary.json``,
``summary.txt``, ``check.log`` (the tail of every stage's output) and ``train_loss.png``; the
trained run and the full logs stay in ``--work`` (a temporary folder by default).
``--device cpu --quick`` runs it all on the CPU with tiny shapes, to check the commands.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from mtp_megatron.bench.flops import peak_tflops
from mtp_megatron.bench.gpu_stages import STAGES

STAGE_WEIGHTS = {
    "tests": 100,
    "train": 110,
    "sdpa": 20,
    "decode": 60,
    "throughput": 120,
    "memory": 60,
    "transformers": 60,
}
"""Expected seconds of each stage on one H100 (relative: the budget is shared out by them)."""
LOG_TAIL_LINES = 80
"""Lines of each stage's output kept in ``check.log`` and the summary."""
STOP_GRACE_S = 10.0
"""After SIGTERM, seconds a stopped stage has before SIGKILL."""


def _slice_s(left_s: float, stage: str, remaining: list[str]) -> float:
    """This stage's share of what is left, by weight among the stages still to run."""
    return left_s * STAGE_WEIGHTS[stage] / sum(STAGE_WEIGHTS[s] for s in remaining)


def run_stage(
    stage: str, argv: list[str], deadline_s: float, log: Path
) -> tuple[dict[str, Any], list[str]]:
    """Run one stage's process until it ends or ``deadline_s`` passes; (result, output tail).
    Its output streams to this process's stdout and to ``log``."""
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "mtp_megatron.bench.gpu_stages", stage, *argv]
    cmd += ["--result", str(result_file)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    with open(log, "w") as log_file:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: stopping it stops its children
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(f"  | {line}")
                sys.stdout.flush()
                log_file.write(line)
                tail.append(line.rstrip("\n"))

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(1.0, deadline_s))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        reader.join(timeout=5)
    if timed_out:
        return {"status": "timeout", "why": f"stopped after its {deadline_s:.0f} s slice"}, [*tail]
    if proc.returncode != 0 or not result_file.is_file():
        last = tail[-1] if tail else ""
        return {"status": "failed", "why": f"exit code {proc.returncode}: {last[:200]}"}, [*tail]
    return json.loads(result_file.read_text()), [*tail]


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def summary_text(summary: dict[str, Any]) -> str:
    """The printed summary: one line per stage, then each stage's figures."""
    lines = [
        f"gpu-check on {summary['device']}, torch {summary['torch']}, "
        f"{summary['budget_s']:.0f} s budget, {summary['seconds']:.0f} s used",
        "",
        f"  {'stage':13s} {'status':8s} {'seconds':>7s} / slice",
    ]
    for name, r in summary["stages"].items():
        note = r.get("why", "")
        lines.append(
            f"  {name:13s} {r['status']:8s} {r['seconds']:7.1f} / {r['slice_s']:.0f}  {note}"
        )
    for name, r in summary["stages"].items():
        if r.get("lines"):
            lines += ["", f"[{name}]", *r["lines"]]
    return "\n".join(lines)


def main_gpu_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mtp_megatron gpu-check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--budget-s", type=float, default=540.0, help="all stages together")
    parser.add_argument("--out", type=Path, default=Path("runs") / "gpu_check")
    parser.add_argument("--work", type=Path, default=None, help="scratch (default: a temp dir)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {list(STAGES)}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU dry run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16, for MFU")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        print(f"error: unknown stages {unknown}; choose from {list(STAGES)}", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda, but torch {torch.__version__} sees no CUDA device",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device == "cuda" else None)
    if device == "cuda" and peak is None:
        print(f"note: no peak TFLOP/s known for {name!r}: pass --peak-tflops for MFU")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mtp_gpu_check_"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    common = ["--work", str(work), "--out", str(out), "--device", device]
    common += ["--quick"] if args.quick else []
    common += ["--peak-tflops", str(peak)] if peak else []
    start = time.monotonic()
    summary: dict[str, Any] = {
        "device": name,
        "torch": torch.__version__,
        "peak_tflops": peak,
        "budget_s": args.budget_s,
        "work": str(work),
        "stages": {},
    }
    check_log = []
    for i, stage in enumerate(stages):
        left = args.budget_s - (time.monotonic() - start)
        slice_s = _slice_s(left, stage, stages[i:])
        t0 = time.monotonic()
        result: dict[str, Any]
        tail: list[str]
        if slice_s < 5:
            result, tail = {"status": "skipped", "why": "the budget ran out"}, []
        else:
            print(f"[gpu-check] {stage}: {slice_s:.0f} s of {left:.0f} s left", flush=True)
            result, tail = run_stage(stage, common, slice_s, work / "logs" / f"{stage}.log")
        result.update(seconds=round(time.monotonic() - t0, 1), slice_s=round(slice_s))
        summary["stages"][stage] = result
        summary["seconds"] = time.monotonic() - start
        check_log += [f"===== {stage}: {result['status']} =====", *tail]
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = summary_text(summary)
    (out / "summary.txt").write_text(text + "\n")
    (out / "check.log").write_text("\n".join(check_log) + "\n")
    print(f"\n[gpu-check] summary\n{text}\nfigures: {out}  (run and full logs: {work})")
    failed = [s for s, r in summary["stages"].items() if r["status"] in ("failed", "timeout")]
    return 1 if failed else 0
