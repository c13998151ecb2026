"""The GPU check's stages. Each runs in a process of its own (``gpu_check.py`` starts it, stops
it at its deadline and reads its result file):

    python -m mtp_megatron.bench.gpu_stages STAGE --work DIR --result FILE [--quick] ...

A stage returns a dict with ``status`` ('ok', 'failed', 'skipped') and its figures; ``lines``
(optional) are what the summary prints for it. Stages that need the trained run find it in
``<work>/train`` (the ``train`` stage writes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Context:
    """What every stage gets."""

    device: torch.device
    """cuda:0 on a GPU node; cpu for the dry run."""
    quick: bool
    """Tiny shapes and few steps (the CPU dry run)."""
    work: Path
    """Scratch folder of the whole check (the trained run, logs); not the reported folder."""
    out: Path
    """The reported folder: figures a stage draws go here."""
    peak_tflops: float | None
    """Dense bf16 peak of the device, for MFU; None: no MFU."""

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"

    @property
    def run_dir(self) -> Path:
        return self.work / "train"


def _env(ctx: Context) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", MTP_DEVICE=ctx.device.type)


def _needs_run(ctx: Context) -> dict | None:
    if not (ctx.run_dir / "model.safetensors").is_file():
        return {"status": "skipped", "why": "no trained run (the train stage did not finish)"}
    return None


def stage_tests(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return {"status": "skipped", "why": "the gpu-marked tests need CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    proc = subprocess.run([*cmd, str(REPO / "tests" / "gpu")], cwd=REPO, env=_env(ctx))
    return {"status": "ok" if proc.returncode == 0 else "failed", "pytest_rc": proc.returncode}


def _tiny() -> list[str]:
    return [
        "data.tokenizer=bpe:512",
        "model.hidden_size=64",
        "model.num_layers=2",
        "model.num_attention_heads=4",
        "model.max_seq_len=64",
        "train.micro_batch_size=4",
        "data.max_files=60",
    ]


def stage_train(ctx: Context) -> dict:
    """The demo recipe with the GPU's defaults (precision auto: bf16), stopped halfway, resumed."""
    from mtp_megatron.recipe import DEMO_RECIPE, load_recipe
    from mtp_megatron.report.plots import loss_curves
    from mtp_megatron.report.runs import load_run
    from mtp_megatron.train.checkpoint import read_run_state, step_folders
    from mtp_megatron.train.trainer import train

    steps = 20 if ctx.quick else 100
    overrides = [
        f"train.steps={steps}",
        "train.eval_every=0",
        "train.eval_batches=2",
        f"train.run_dir={ctx.run_dir}",
        "train.log_every=10",
    ]
    if ctx.quick:
        overrides += _tiny()
    recipe = load_recipe(DEMO_RECIPE, overrides)
    t0 = time.perf_counter()
    first = train(recipe, resume="never", stop_after_steps=steps // 2)
    second = train(recipe, resume="require")
    wall = time.perf_counter() - t0
    state = read_run_state(step_folders(ctx.run_dir / "checkpoints")[-1])
    loss_curves([load_run(ctx.run_dir, "demo")], ctx.out / "train_loss.png")
    tokens = recipe.train.micro_batch_size * recipe.seq_len * steps
    resumed = second.last_step == steps and min(second.losses) == steps // 2
    finite = all(v == v and abs(v) != float("inf") for v in second.losses.values())
    return {
        "status": "ok" if resumed and finite else "failed",
        "precision": state["precision"],
        "optimizer": state["optimizer"],
        "zero_stage": state["zero_stage"],
        "steps": steps,
        "first_loss": first.losses[0],
        "final_loss": second.losses[steps - 1],
        "tokens_per_s_incl_setup": tokens / wall,
        "lines": [
            f"{state['precision']} ZeRO-{state['zero_stage']} ({state['optimizer']}), "
            f"{steps} steps, stopped at {steps // 2} and resumed: loss {first.losses[0]:.3f} -> "
            f"{second.losses[steps - 1]:.3f}; {tokens / wall:,.0f} tokens/s with set-up"
        ],
    }


def stage_sdpa(ctx: Context) -> dict:
    """Which SDPA kernels accept a training step and a KV-cached decode of our attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from mtp_megatron import build_model
    from mtp_megatron.config import ModelConfig, MTPConfig
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.parallel import ensure_parallel_initialized

    ensure_parallel_initialized()
    cfg = ModelConfig(
        vocab_size=512,
        hidden_size=128,
        num_layers=2,
        num_attention_heads=2,
        max_seq_len=128,
        mtp=MTPConfig(num_predict_tokens=2, speculation_lookahead=2),
    )  # head_dim 64: what the fused kernels support
    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    torch.manual_seed(0)
    model = build_model(cfg).to(ctx.device, dtype)
    ids = torch.randint(0, 512, (2, 128), device=ctx.device)
    kernels = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        row = {}
        for what, fn in (
            ("train", lambda: model.train()(ids).loss.backward()),
            ("decode", lambda: generate_plain(model.eval(), ids[:1, :16], 4)),
        ):
            try:
                with sdpa_kernel(backend):
                    fn()
                row[what] = "ok"
            except Exception as e:  # noqa: BLE001  (a kernel refusing is the finding)
                row[what] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        kernels[backend.name.lower()] = row
    lines = [f"{name}: train {r['train']}, decode {r['decode']}" for name, r in kernels.items()]
    return {"status": "ok", "dtype": str(dtype), "kernels": kernels, "lines": lines}


def stage_decode(ctx: Context) -> dict:
    """Plain vs speculative decoding of the trained run, fp32 (and bf16 on a GPU)."""
    from mtp_megatron.bench.decode import run_decode_benchmark, table
    from mtp_megatron.bench.decode_inputs import benchmark_inputs
    from mtp_megatron.decoding.host import HostReads
    from mtp_megatron.decoding.load import load_run

    if skipped := _needs_run(ctx):
        return skipped
    result: dict = {"status": "ok", "tables": {}, "lines": []}
    for dtype in ("fp32", "bf16") if ctx.bf16 else ("fp32",):
        run = load_run(ctx.run_dir, device=ctx.device, dtype=dtype)
        prompts, _, vocab = benchmark_inputs(run, 4 if ctx.quick else 8, 16 if ctx.quick else 32)
        before = HostReads.count
        k = run.model.objective.num_steps
        rows = run_decode_benchmark(
            run, prompts, 16 if ctx.quick else 64, list(range(1, k + 1)), vocab
        )
        reads = (HostReads.count - before) / max(1, sum(r.new_tokens for r in rows))
        print(f"decoding, {dtype}:\n{table(rows)}")
        result["tables"][dtype] = {
            "rows": [r.__dict__ for r in rows],
            "host_reads_per_token": reads,
        }
        result["lines"] += [f"{dtype} (host reads per token {reads:.2f}):", table(rows)]
        if dtype == "fp32" and not all(r.identical for r in rows):  # exact only in fp32
            result["status"] = "failed"
    return result


def _throughput_shape(quick: bool) -> tuple[dict[str, Any], int, int]:
    if quick:
        return dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4), 64, 2
    # OLMo-2-1B's width and vocabulary class at half its depth
    shape = dict(vocab_size=32768, hidden_size=2048, num_layers=16, num_attention_heads=16)
    return shape, 2048, 4


def stage_throughput(ctx: Context) -> dict:
    """Tokens/s and MFU of the trainer's own step (DeepSpeed engine, optimizer, ZeRO stage and
    precision of a GPU run) for NTP and MTP K=3 with each memory-saving schedule."""
    from mtp_megatron import build_model
    from mtp_megatron.bench.batches import random_batches
    from mtp_megatron.bench.flops import model_flops
    from mtp_megatron.config import ModelConfig, MTPConfig, MTPTrainingConfig, TrainConfig
    from mtp_megatron.config.train import Precision
    from mtp_megatron.parallel import ensure_parallel_initialized
    from mtp_megatron.parallel.dims import ParallelConfig
    from mtp_megatron.train.apply import apply_training

    ensure_parallel_initialized()
    shape, seq, batch = _throughput_shape(ctx.quick)
    cases = {
        "NTP": (None, MTPTrainingConfig()),
        "MTP K=3": (3, MTPTrainingConfig()),
        "MTP K=3 sequential": (3, MTPTrainingConfig(sequential_forward=True)),
        "MTP K=3 sequential + checkpointing": (
            3,
            MTPTrainingConfig(sequential_forward=True, gradient_checkpointing=True),
        ),
    }
    precision: Precision = "bf16" if ctx.bf16 else "fp32"
    rows: dict[str, dict] = {}
    lines = []
    for name, (k, training) in cases.items():
        mtp = MTPConfig(num_predict_tokens=k) if k else None
        cfg = ModelConfig(**shape, max_seq_len=seq, mtp=mtp)
        flops = model_flops(cfg, seq)
        tcfg = TrainConfig(steps=100, micro_batch_size=batch, precision=precision, mtp=training)
        torch.manual_seed(0)
        setup = apply_training(build_model(cfg), tcfg, ParallelConfig(), ctx.device)
        batches = random_batches(cfg.known_vocab_size, batch, seq)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for step in range(2 + (2 if ctx.quick else 5)):
            _sync(ctx.device)
            t0 = time.perf_counter()
            setup.runner.train_step(batches, step, 1)  # reads the step's metrics: synchronises
            if step >= 2:
                times.append(time.perf_counter() - t0)
        step_s = sorted(times)[len(times) // 2]
        tps = batch * seq / step_s
        row: dict[str, Any] = {
            "params": flops.params,
            "gflops_per_token": flops.per_token / 1e9,
            "step_s": step_s,
            "tokens_per_s": tps,
            "optimizer": type(setup.engine.optimizer).__name__,
        }
        if ctx.peak_tflops:
            row["mfu"] = tps * flops.per_token / (ctx.peak_tflops * 1e12)
        if ctx.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows[name] = row
        mfu = f", MFU {row['mfu']:.1%}" if "mfu" in row else ""
        lines.append(
            f"{name:36s} {flops.params / 1e6:,.1f}M params, {row['gflops_per_token']:.3f} "
            f"GFLOP/token: {tps:,.0f} tokens/s{mfu}"
        )
        del setup
        gc.collect()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    dims = f"h {shape['hidden_size']}, {shape['num_layers']} layers, vocab {shape['vocab_size']}"
    stage = TrainConfig().resolved_zero_stage(ctx.device.type == "cuda")
    header = f"{precision} ZeRO-{stage}, {dims}, batch {batch} x seq {seq}"
    return {
        "status": "ok",
        "precision": precision,
        "shape": {**shape, "seq": seq, "batch": batch},
        "peak_tflops": ctx.peak_tflops,
        "cases": rows,
        "lines": [header, *lines],
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_memory(ctx: Context) -> dict:
    """bench-memory on this device, and the plan's estimate of the same steps."""
    dtype = "bf16" if ctx.bf16 else "fp32"
    cmd = [sys.executable, "-m", "mtp_megatron", "bench-memory", "--device", ctx.device.type]
    cmd += ["--dtype", dtype]
    if ctx.quick:
        cmd += ["--vocab", "512", "--hidden", "64", "--layers", "2", "--seq-len", "64"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(ctx), capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(lines))
    table = [line for line in lines if line.startswith("|")]
    return {"status": "ok" if proc.returncode == 0 else "failed", "dtype": dtype, "lines": table}


def stage_transformers(ctx: Context) -> dict:
    """bench-decode's peer table on this device: ours and transformers' generate (plain,
    use_mtp, prompt lookup) on the same weights, batch 1 and 4, with lookahead="auto"."""
    from mtp_megatron.bench.decode import peer_speedups, run_decode_benchmark, table
    from mtp_megatron.bench.decode_inputs import benchmark_inputs
    from mtp_megatron.bench.decode_peers import TransformersPeer
    from mtp_megatron.decoding.load import load_run

    if skipped := _needs_run(ctx):
        return skipped
    run = load_run(ctx.run_dir, device=ctx.device)
    peer = TransformersPeer(run.folder, device=ctx.device)
    prompts, calibration, _ = benchmark_inputs(run, 4 if ctx.quick else 8, 16 if ctx.quick else 32)
    k = run.model.objective.num_steps
    new = 16 if ctx.quick else 64
    rows = run_decode_benchmark(
        run, prompts, new, list(range(1, k + 1)), None, (1, 4), peer, calibration
    )
    print(f"decoding against transformers ({peer.family}):\n{table(rows)}")
    return {
        "status": "ok" if all(r.identical for r in rows) else "failed",
        "rows": [r.__dict__ for r in rows],
        "speedup_vs_transformers": {b: s for b, (s, _) in peer_speedups(rows).items()},
        "lines": [f"against transformers ({peer.family}):", table(rows)],
    }


STAGES: dict[str, Callable[[Context], dict]] = {
    "tests": stage_tests,
    "train": stage_train,
    "sdpa": stage_sdpa,
    "decode": stage_decode,
    "throughput": stage_throughput,
    "memory": stage_memory,
    "transformers": stage_transformers,
}


def main(argv: list[str]) -> int:
    """Run one stage and write its result (JSON) to ``--result``; 0 unless it raised."""
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron.bench.gpu_stages")
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args(argv)
    os.environ["MTP_DEVICE"] = args.device
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    ctx = Context(device, args.quick, args.work, args.out, args.peak_tflops)
    result = STAGES[args.stage](ctx)
    args.result.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
