"""The memory plan against a real DeepSpeed training step, per precision and ZeRO stage.

    python -m mtp_megatron bench-plan [--nproc 2] [--hidden 1024 --layers 4 --vocab 32000 ...]

For each configuration a fresh ``torchrun`` job of ``--nproc`` processes builds the model and
the trainer's engine (``apply_training``) and runs the trainer's step (forward, backward,
optimizer) on random tokens; rank 0 measures, above its memory before the model was built:

- **steady**: between steps (weights, master weights, Adam's moments, kept buffers);
- **peak**: the most memory one whole step held (activations, logits, gradients, buckets,
  the optimizer's temporaries).

On the CPU that is the resident set size (``VmRSS`` / ``VmHWM``, with every allocation of 64
KiB or more mapped on its own, as ``bench-memory`` does), on a GPU the allocator's counters.
The plan (``train/memory_plan.py``) of the same run is printed beside each, with the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import cast

import torch

from mtp_megatron.bench.batches import random_batches
from mtp_megatron.bench.memory import MIB, MMAP_THRESHOLD, MemoryMeter
from mtp_megatron.config import ConfigError, ModelConfig, MTPConfig, MTPTrainingConfig
from mtp_megatron.train.memory_plan import MemoryPlan, plan_memory

CONFIGS = ("fp32:0", "fp32:1", "fp32:2", "fp32:3", "bf16:1", "bf16:2", "bf16:3")
"""``--configs``: precision:ZeRO stage."""


def _shape(args: argparse.Namespace) -> ModelConfig:
    mtp = MTPConfig(num_predict_tokens=args.k) if args.k else None
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_attention_heads=args.heads,
        max_seq_len=args.seq_len,
        mtp=mtp,
    )


# -- the child (one rank of a torchrun job) -------------------------------------------------------
def run_child(args: argparse.Namespace) -> dict:
    """Measure one configuration on this rank (under torchrun)."""
    from mtp_megatron.config import TrainConfig
    from mtp_megatron.config.train import ZeroStage
    from mtp_megatron.model import build_model
    from mtp_megatron.parallel import initialize_parallel
    from mtp_megatron.parallel.dims import ParallelConfig
    from mtp_megatron.train.apply import apply_training

    precision, stage = args.child.split(":")
    zero_stage = cast(ZeroStage, int(stage))
    layout = initialize_parallel()
    device = layout.device
    train = TrainConfig(
        steps=10, micro_batch_size=args.batch, zero_stage=zero_stage, precision=precision
    )
    meter = MemoryMeter(device)
    # a tiny engine first: DeepSpeed's lazy imports and extensions load outside the baseline
    tiny = ModelConfig(vocab_size=256, hidden_size=64, num_layers=1, num_attention_heads=2)
    warm = apply_training(build_model(tiny), train, ParallelConfig(), device)
    warm.runner.train_step(random_batches(256, 1, 16), 0, 1)
    del warm
    gc.collect()
    base = meter.start()
    torch.manual_seed(0)
    cfg = _shape(args)
    setup = apply_training(build_model(cfg), train, ParallelConfig(), device)
    batches = random_batches(cfg.known_vocab_size, args.batch, args.seq_len)
    for step in range(2):  # Adam's states exist after the first step
        setup.runner.train_step(batches, step, 1)
    gc.collect()
    steady = meter.start() - base  # and the peak starts again for the measured step
    setup.runner.train_step(batches, 2, 1)
    peak = meter.peak() - base
    return {
        "config": args.child,
        "dp": layout.data_parallel_size,
        "optimizer": type(setup.engine.optimizer).__name__,
        # ZeRO-3 partitions the parameters: their full size is ds_numel
        "params": sum(getattr(p, "ds_numel", p.numel()) for p in setup.module.parameters()),
        "steady_mib": steady,
        "peak_mib": peak,
    }


# -- the parent -----------------------------------------------------------------------------------
def _child_cmd(args: argparse.Namespace, config: str) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(args.nproc)]
    cmd += ["-m", "mtp_megatron.bench.plan_check", "--child", config]
    for name in ("vocab", "hidden", "layers", "heads", "seq_len", "batch", "k"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return cmd


def measure(args: argparse.Namespace, config: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), PYTHONWARNINGS="ignore")
    env.setdefault("MTP_DEVICE", "cpu")
    proc = subprocess.run(_child_cmd(args, config), env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{config} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def report(args: argparse.Namespace, rows: list[tuple[dict, MemoryPlan]]) -> str:
    cfg = _shape(args)
    lines = [
        f"shape: vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"MTP K={args.k}; micro-batch {args.batch} x {args.seq_len}; {args.nproc} process(es), "
        f"{os.environ.get('MTP_DEVICE', 'cpu')}; memory above the model's build, rank 0",
        "",
        "| precision, ZeRO | optimizer | params | steady MiB | plan | plan / steady | peak MiB "
        "| plan | plan / peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, plan in rows:
        planned_steady = (plan.weights + plan.optimizer) / MIB
        planned_peak = plan.total / MIB
        lines.append(
            f"| {m['config'].replace(':', ', ZeRO-')} | {m['optimizer']} | "
            f"{m['params'] / 1e6:.1f}M | {m['steady_mib']:,.0f} | {planned_steady:,.0f} | "
            f"{planned_steady / m['steady_mib']:.2f} | {m['peak_mib']:,.0f} | "
            f"{planned_peak:,.0f} | {planned_peak / m['peak_mib']:.2f} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron bench-plan",
        description="The memory plan against a real DeepSpeed training step's memory.",
    )
    add = parser.add_argument
    add("--vocab", type=int, default=32000)
    add("--hidden", type=int, default=1024)
    add("--layers", type=int, default=4)
    add("--heads", type=int, default=8)
    add("--seq-len", type=int, default=256)
    add("--batch", type=int, default=2, help="micro-batch")
    add("--k", type=int, default=1, help="MTP steps (0: NTP)")
    add("--nproc", type=int, default=2, help="processes (the data-parallel size)")
    add("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    add("--child", help=argparse.SUPPRESS)
    return parser


def main_bench_plan(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        result = run_child(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result), flush=True)
        return 0
    if args.nproc < 1 or args.batch < 1:
        raise ConfigError("--nproc and --batch must be >= 1")
    rows = []
    for config in args.configs:
        print(f"# {config} ...", file=sys.stderr, flush=True)
        measured = measure(args, config)
        precision, stage = config.split(":")
        plan = plan_memory(
            _shape(args),
            MTPTrainingConfig(),
            precision=precision,
            zero_stage=int(stage),
            micro_batch=args.batch,
            seq_len=args.seq_len,
            dp=measured["dp"],
        )
        rows.append((measured, plan))
    print(report(args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main_bench_plan(sys.argv[1:]))
