"""Peak memory and step time of one training step: NTP against MTP K=4 plain, sequential,
sequential + activation checkpointing, and plain with self-distillation, at a vocabulary-heavy
shape where the logits dominate.

A step is forward + backward (gradients set to None before it; no optimizer), fp32 or bf16
(``--dtype``), TP=1. Every
case runs in a fresh subprocess, one after the other, so that no case inherits another's heap:

- CPU: the peak resident set size of the child during a step (``VmHWM``, reset before each step
  through ``/proc/self/clear_refs``) minus its RSS just before the step (imports, model, batch).
  The child runs with ``MALLOC_MMAP_THRESHOLD_=65536``: every allocation of 64 KiB or more is a
  mapping of its own, returned to the OS when freed, so the RSS follows the tensors alive rather
  than the heap's high-water mark. It counts all the step allocates: activations, logits,
  gradients, and the ops' temporary buffers.
- GPU: ``torch.cuda.max_memory_allocated()`` during the step minus ``memory_allocated()`` before.

Step time is the median of the timed steps (after the warm-up ones) in the same child: wall
time, and on CPU also the process's CPU time (all threads), which other load on a shared machine
inflates much less than the wall time.

    python -m mtp_megatron bench-memory [--vocab 50257 --hidden 512 --seq-len 1024 --batch 4 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import get_args

import torch

from mtp_megatron.config import (
    HEAD_TYPES,
    ConfigError,
    ModelConfig,
    MTPConfig,
    MTPTrainingConfig,
)
from mtp_megatron.config.mtp import HeadArrangement
from mtp_megatron.parallel.state import uses_cuda

CASES = {
    "ntp": "NTP",
    "mtp": "MTP K={k} plain",
    "sequential": "MTP K={k} sequential",
    "sequential_ckpt": "MTP K={k} sequential + checkpointing",
    "distill": "MTP K={k} plain + self-distillation (0.5)",
}
"""``--cases`` keys and their table names."""
GOAL_MEMORY_RATIO = 1.10
"""Peak memory of MTP sequential over NTP: the goal."""
GOAL_TIME_OVERHEAD = 0.10
"""Step-time overhead of MTP sequential over MTP plain: the goal."""
MMAP_THRESHOLD = 65536
"""Bytes from which the children's malloc maps every allocation on its own (see above)."""
MIB = 2**20


@dataclass
class CaseResult:
    """What one child measured."""

    key: str
    """Case key (one of CASES)."""
    params: int
    """Trainable parameters of the model."""
    base_mib: float
    """Memory before the step: RSS of the child (CPU) or allocated (GPU), model included."""
    peak_mib: float
    """Largest extra memory of one step, above ``base_mib``."""
    step_times_s: list[float]
    """Timed steps (forward + backward), wall seconds."""
    cpu_times_s: list[float]
    """CPU seconds of the same steps (all threads of the process)."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_times_s)


def _model_config(args: argparse.Namespace, key: str) -> tuple[ModelConfig, MTPTrainingConfig]:
    mtp = None
    if key != "ntp":
        mtp = MTPConfig(
            num_predict_tokens=args.k,
            mtp_head_type=args.head_type,
            share_weights_across_steps=args.arrangement == "chained",
            head_arrangement=args.arrangement,
            speculation_lookahead=min(3, args.k),
        )
    cfg = ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        max_seq_len=args.seq_len,
        mtp=mtp,
    )
    training = MTPTrainingConfig(
        sequential_forward=key.startswith("sequential"),
        gradient_checkpointing=key == "sequential_ckpt",
        distill_weight=0.5 if key == "distill" else 0.0,
    )
    return cfg, training


# -- the child ----------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryMeter:
    """Memory before a step and the peak during it, in MiB (RSS on CPU, the allocator's on
    GPU); ``bench-plan`` measures with it too."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> float:
        """The memory now; the peak starts again from it."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated() / MIB
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return _proc_status_kib("VmRSS") / 1024

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / MIB
        return _proc_status_kib("VmHWM") / 1024


def run_case(args: argparse.Namespace, key: str) -> CaseResult:
    """Build the case's model and measure its steps in this process."""
    from mtp_megatron.model import build_model
    from mtp_megatron.model.loss import labels_from_input_ids
    from mtp_megatron.parallel import ensure_parallel_initialized
    from mtp_megatron.train.apply import apply_mtp_training

    device = torch.device(args.device)
    ensure_parallel_initialized()
    cfg, training = _model_config(args, key)
    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build_model(cfg)
    apply_mtp_training(model, training)
    model = model.to(device, dtype)
    model.train()
    generator = torch.Generator().manual_seed(1)
    vocab = cfg.known_vocab_size
    input_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=generator)
    input_ids = input_ids.to(device)
    labels = labels_from_input_ids(input_ids)
    meter = MemoryMeter(device)

    def step() -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = model(input_ids, labels=labels, return_logits=False)  # as the trainer does
        out.loss.backward()  # `out` stays alive through backward, as in a training loop
        if meter.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - start_cpu

    for _ in range(args.warmup):
        step()
        model.zero_grad(set_to_none=True)
    times, cpu_times, base, peak = [], [], float("inf"), 0.0
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)  # before the baseline: the step's gradients count
        before = meter.start()
        wall, cpu = step()
        times.append(wall)
        cpu_times.append(cpu)
        base, peak = min(base, before), max(peak, meter.peak() - before)
    return CaseResult(
        key=key,
        params=sum(p.numel() for p in model.parameters()),
        base_mib=base,
        peak_mib=peak,
        step_times_s=times,
        cpu_times_s=cpu_times,
    )


# -- the parent -----------------------------------------------------------------------------------
def _child_argv(args: argparse.Namespace, key: str) -> list[str]:
    argv = [sys.executable, "-m", "mtp_megatron.bench.memory", "--child", key]
    for name in ("vocab", "hidden", "layers", "heads", "seq_len", "batch", "k", "warmup", "steps"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--head-type", args.head_type, "--arrangement", args.arrangement]
    return argv + ["--device", args.device, "--dtype", args.dtype]


def measure(args: argparse.Namespace, progress=None) -> dict[str, CaseResult]:
    """Run every case of ``args.cases`` in its own subprocess; results by case key."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONWARNINGS="ignore")
    results = {}
    for key in dict.fromkeys(args.cases):  # in order, once each
        if progress:
            progress(f"{key} ...")
        proc = subprocess.run(_child_argv(args, key), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"case {key} failed:\n{proc.stderr[-3000:]}")
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        results[key] = CaseResult(**data)
    return results


def planned_mib(args: argparse.Namespace, key: str) -> float:
    """The memory plan's trace of the same step (``train/memory_plan.py``), gradients kept."""
    from mtp_megatron.train.memory_plan import trace_step

    cfg, training = _model_config(args, key)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    trace = trace_step(cfg, training, args.batch, args.seq_len, dtype, keep_grads=True)
    return trace.peak_bytes / MIB


def report(args: argparse.Namespace, results: dict[str, CaseResult]) -> str:
    """The header, the markdown table and the two goal lines."""
    cfg, _ = _model_config(args, "mtp")
    on = "GPU: torch.cuda.max_memory_allocated" if args.device == "cuda" else "CPU: peak RSS"
    lines = [
        f"shape: vocab {cfg.vocab_size} (padded {cfg.padded_vocab_size}), hidden {cfg.hidden_size}"
        f", {cfg.num_layers} layers, {cfg.num_attention_heads} heads, ffn {cfg.ffn_size}; batch "
        f"{args.batch} x seq {args.seq_len}; MTP K={args.k} {args.arrangement} {args.head_type} "
        f"heads; {args.dtype}, TP=1",
        f"step = forward + backward; memory: {on} above the model, per step; {args.warmup} "
        f"warm-up + {args.steps} timed steps per case, each case in a fresh process; "
        f"{torch.get_num_threads()} threads",
        "",
        "| case | params | model MiB | peak step memory MiB | vs NTP | plan MiB | plan / "
        "measured | step s | vs NTP | step CPU s | vs NTP |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ntp = results.get("ntp")

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:.2f}x" if b else "-"

    for key, r in results.items():
        plan = planned_mib(args, key)
        lines.append(
            f"| {CASES[key].format(k=args.k)} | {r.params / 1e6:.1f}M | {r.base_mib:,.0f} | "
            f"{r.peak_mib:,.0f} | {ratio(r.peak_mib, ntp.peak_mib if ntp else None)} | "
            f"{plan:,.0f} | {plan / r.peak_mib:.2f} | "
            f"{r.median_s:.2f} | {ratio(r.median_s, ntp.median_s if ntp else None)} | "
            f"{r.median_cpu_s:.2f} | {ratio(r.median_cpu_s, ntp.median_cpu_s if ntp else None)} |"
        )
    lines.append("")
    seq, plain = results.get("sequential"), results.get("mtp")
    if seq and ntp:
        lines.append(
            f"MTP sequential / NTP peak step memory: {seq.peak_mib / ntp.peak_mib:.2f}x "
            f"(goal <= {GOAL_MEMORY_RATIO:.2f})"
        )
    if seq and plain:
        lines.append(
            f"MTP sequential / MTP plain: peak step memory {seq.peak_mib / plain.peak_mib:.2f}x; "
            f"step time {seq.median_s / plain.median_s - 1:+.1%} wall, "
            f"{seq.median_cpu_s / plain.median_cpu_s - 1:+.1%} CPU "
            f"(goal <= +{GOAL_TIME_OVERHEAD:.0%})"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron bench-memory",
        description="Peak memory and step time of NTP vs MTP plain / sequential / + checkpointing "
        "/ + self-distillation.",
    )
    add = parser.add_argument
    add("--vocab", type=int, default=50257, help="vocabulary (GPT-2's by default)")
    add("--hidden", type=int, default=512, help="model width")
    add("--layers", type=int, default=4, help="trunk layers")
    add("--heads", type=int, default=8, help="attention heads")
    add("--seq-len", type=int, default=1024, help="tokens per sequence")
    add("--batch", type=int, default=4, help="sequences per step")
    add("--k", type=int, default=4, help="MTP steps K")
    add("--head-type", default="transformer", choices=tuple(HEAD_TYPES))
    add("--arrangement", default="chained", choices=get_args(HeadArrangement))
    add("--warmup", type=int, default=1, help="untimed steps per case first")
    add("--steps", type=int, default=1, help="timed steps per case")
    add("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="subset to run")
    add("--device", default="cuda" if uses_cuda() else "cpu", choices=("cpu", "cuda"))
    add("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and activations")
    add("--child", choices=list(CASES), help=argparse.SUPPRESS)
    return parser


def _check(args: argparse.Namespace) -> None:
    for name in ("vocab", "hidden", "layers", "heads", "batch", "k", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    if args.seq_len < 2 or args.warmup < 0:
        raise ConfigError("--seq-len must be >= 2 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device here")
    for key in args.cases:
        cfg, training = _model_config(args, key)
        cfg.validate()


def main_bench_memory(argv: list[str]) -> int:
    """CLI entry point: print the table; 0 on success, 2 on a configuration error."""
    args = build_parser().parse_args(argv)
    try:
        _check(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.child:  # inside a measuring subprocess: one JSON line
        from mtp_megatron.parallel import destroy_parallel

        try:
            result = run_case(args, args.child)
        finally:
            destroy_parallel()
        print(json.dumps(result.__dict__))
        return 0
    results = measure(args, progress=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True))
    print(report(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench_memory(sys.argv[1:]))
