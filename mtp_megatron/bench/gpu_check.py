"""The GPU check: one command that runs what only a GPU can show, under one shared deadline.

    python -m mtp_megatron gpu-check [--budget-s 480] [--out runs/gpu_check] [--stages ...]
    make gpu-check

Stages (each under what is left of the budget; one failing does not stop the others):

- ``tests``: the ``gpu``-marked tests (``tests/gpu/``): CUDA vs CPU loss and gradient parity in
  fp32 and bf16, sequential backward and checkpointing vs plain on CUDA, decoding on CUDA.
- ``train``: the demo recipe on one device, ZeRO-1 (bf16 on a GPU), stopped halfway and resumed.
- ``sdpa``: which SDPA kernels (flash, memory-efficient, cuDNN, math) accept a training
  forward + backward and a KV-cached decode step of our attention.
- ``decode``: the decode tables (plain vs speculative) of the trained run in fp32 and bf16,
  with the host reads per token that decoding made.
- ``throughput``: tokens/s and MFU of NTP, MTP K=3, sequential and sequential + checkpointing
  at a ~1.2B shape (h 2048, 16 layers, vocabulary 32k, seq 2048; ``--quick``: a tiny one).
- ``memory``: ``bench-memory`` on this device.
- ``transformers``: bench-decode's peer table: ours against transformers' ``generate`` (plain,
  ``use_mtp`` with our heads, prompt lookup) on the same weights, batch 1 and 4.

It prints one summary and writes every figure to ``<out>/summary.json``. ``--device cpu``
(with ``--quick``) runs the stages that can run on a CPU, to check the commands themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
STAGES = ("tests", "train", "sdpa", "decode", "throughput", "memory", "transformers")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak by GPU name, for MFU (override with --peak-tflops)."""


@dataclass
class Context:
    device: torch.device
    quick: bool
    out: Path
    deadline: float
    peak_tflops: float | None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"


def _env(ctx: Context) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["MTP_DEVICE"] = ctx.device.type
    return env


def stage_tests(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return {"status": "skipped", "why": "the gpu-marked tests need CUDA"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(REPO / "tests" / "gpu")]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(ctx), capture_output=True, text=True, timeout=ctx.left()
    )
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"status": "ok" if proc.returncode == 0 else "failed", "output": tail}


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
    from mtp_megatron.recipe import DEMO_RECIPE, load_recipe
    from mtp_megatron.train.trainer import train

    steps = 20 if ctx.quick else 100
    overrides = [
        f"train.steps={steps}",
        "train.zero_stage=1",
        f"train.precision={'bf16' if ctx.bf16 else 'fp32'}",
        "train.eval_every=0",
        "train.eval_batches=2",
        f"train.run_dir={ctx.out / 'train'}",
        "train.log_every=10",
    ]
    if ctx.quick:
        overrides += _tiny()
    recipe = load_recipe(DEMO_RECIPE, overrides)
    t0 = time.perf_counter()
    first = train(recipe, resume="never", stop_after_steps=steps // 2)
    second = train(recipe, resume="require")
    wall = time.perf_counter() - t0
    tokens = recipe.train.micro_batch_size * recipe.seq_len * steps
    return {
        "status": "ok"
        if second.last_step == steps and sorted(second.losses)[0] == steps // 2
        else "failed",
        "precision": "bf16" if ctx.bf16 else "fp32",
        "steps": steps,
        "first_loss": first.losses[0],
        "final_loss": second.losses[steps - 1],
        "val_loss_main": second.eval.get("val/loss_main"),
        "tokens_per_s_incl_setup": tokens / wall,
        "run_dir": str(ctx.out / "train"),
    }


def stage_sdpa(ctx: Context) -> dict:
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
    results = {}
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
        results[backend.name.lower()] = row
    return {"status": "ok", "dtype": str(dtype), "kernels": results}


def stage_decode(ctx: Context) -> dict:
    from mtp_megatron.bench.decode import run_decode_benchmark, table
    from mtp_megatron.bench.decode_inputs import benchmark_inputs
    from mtp_megatron.decoding.host import HostReads
    from mtp_megatron.decoding.load import load_run

    run_dir = ctx.out / "train"
    if not (run_dir / "checkpoints").is_dir():
        return {"status": "skipped", "why": "no trained run (the train stage did not finish)"}
    result: dict = {"status": "ok", "tables": {}}
    for dtype in ("fp32", "bf16") if ctx.bf16 else ("fp32",):
        run = load_run(run_dir, device=ctx.device, dtype=dtype)
        prompts, _, vocab = benchmark_inputs(run, 4 if ctx.quick else 8, 16 if ctx.quick else 32)
        new = 16 if ctx.quick else 64
        before = HostReads.count
        k = run.model.objective.num_steps
        rows = run_decode_benchmark(run, prompts, new, list(range(1, k + 1)), vocab)
        reads = HostReads.count - before
        print(f"decoding, {dtype}:\n{table(rows)}")
        result["tables"][dtype] = {
            "rows": [r.__dict__ for r in rows],
            "host_reads_per_token": reads / max(1, sum(r.new_tokens for r in rows)),
        }
        if dtype == "fp32" and not all(r.identical for r in rows):  # exact only in fp32
            result["status"] = "failed"
    return result


def _flops_per_token(cfg, seq_len: int, params: int) -> float:
    """6 N per token for the weights, plus attention scores and values (causal: half)."""
    attention = 6 * cfg.num_layers * cfg.hidden_size * seq_len
    return 6 * params + attention


def stage_throughput(ctx: Context) -> dict:
    from mtp_megatron import build_model
    from mtp_megatron.config import ModelConfig, MTPConfig, MTPTrainingConfig
    from mtp_megatron.parallel import ensure_parallel_initialized
    from mtp_megatron.train.apply import apply_mtp_training

    ensure_parallel_initialized()
    shape: dict[str, Any]
    if ctx.quick:
        shape = dict(vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4)
        seq, batch = 64, 2
    else:
        shape = dict(vocab_size=32768, hidden_size=2048, num_layers=16, num_attention_heads=16)
        seq, batch = 2048, 4
    cases = {
        "NTP": (None, MTPTrainingConfig()),
        "MTP K=3": (MTPConfig(num_predict_tokens=3), MTPTrainingConfig()),
        "MTP K=3 sequential": (
            MTPConfig(num_predict_tokens=3),
            MTPTrainingConfig(sequential_forward=True),
        ),
        "MTP K=3 sequential + checkpointing": (
            MTPConfig(num_predict_tokens=3),
            MTPTrainingConfig(sequential_forward=True, gradient_checkpointing=True),
        ),
    }
    dtype = torch.bfloat16 if ctx.bf16 else torch.float32
    rows = {}
    for name, (mtp, training) in cases.items():
        if ctx.left() < 30:
            rows[name] = {"status": "skipped", "why": "out of time"}
            continue
        cfg = ModelConfig(**shape, max_seq_len=seq, mtp=mtp)
        torch.manual_seed(0)
        model = build_model(cfg)
        apply_mtp_training(model, training)
        model = model.to(ctx.device, dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.known_vocab_size, (batch, seq), device=ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i in range(2 + (2 if ctx.quick else 5)):
            _sync(ctx.device)
            t0 = time.perf_counter()
            model(ids, return_logits=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(ctx.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        step = sorted(times)[len(times) // 2]
        params = sum(p.numel() for p in model.parameters())
        tps = batch * seq / step
        row = {"params": params, "step_s": step, "tokens_per_s": tps}
        if ctx.peak_tflops:
            row["mfu"] = tps * _flops_per_token(cfg, seq, params) / (ctx.peak_tflops * 1e12)
        if ctx.device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows[name] = row
        del model, opt
    return {
        "status": "ok",
        "dtype": str(dtype),
        "shape": {**shape, "seq": seq, "batch": batch},
        "cases": rows,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_memory(ctx: Context) -> dict:
    dtype = "bf16" if ctx.bf16 else "fp32"
    cmd = [sys.executable, "-m", "mtp_megatron", "bench-memory", "--device", ctx.device.type]
    cmd += ["--dtype", dtype]
    if ctx.quick:
        cmd += ["--vocab", "512", "--hidden", "64", "--layers", "2", "--seq-len", "64"]
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(ctx), capture_output=True, text=True, timeout=ctx.left()
    )
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {
        "status": "ok" if proc.returncode == 0 else "failed",
        "output": lines[-12:],
        "dtype": dtype,
    }


def stage_transformers(ctx: Context) -> dict:
    """bench-decode's peer table on this device: ours and transformers' generate (plain,
    use_mtp, prompt lookup) on the same weights, batch 1 and 4, with lookahead="auto"."""
    from mtp_megatron.bench.decode import peer_speedups, run_decode_benchmark, table
    from mtp_megatron.bench.decode_inputs import benchmark_inputs
    from mtp_megatron.bench.decode_peers import TransformersPeer
    from mtp_megatron.decoding.load import load_run

    run_dir = ctx.out / "train"
    if not (run_dir / "checkpoints").is_dir():
        return {"status": "skipped", "why": "no trained run (the train stage did not finish)"}
    run = load_run(run_dir, device=ctx.device)
    peer = TransformersPeer(run.folder, device=ctx.device)
    prompts, calibration, _ = benchmark_inputs(run, 4 if ctx.quick else 8, 16 if ctx.quick else 32)
    k = run.model.objective.num_steps
    rows = run_decode_benchmark(
        run,
        prompts,
        16 if ctx.quick else 64,
        list(range(1, k + 1)),
        None,
        (1, 4),
        peer,
        calibration,
    )
    print(f"decoding against transformers ({peer.family}):\n{table(rows)}")
    return {
        "status": "ok" if all(r.identical for r in rows) else "failed",
        "rows": [r.__dict__ for r in rows],
        "speedup_vs_transformers": {b: s for b, (s, _) in peer_speedups(rows).items()},
    }


RUNNERS: dict[str, Callable[[Context], dict]] = {
    "tests": stage_tests,
    "train": stage_train,
    "sdpa": stage_sdpa,
    "decode": stage_decode,
    "throughput": stage_throughput,
    "memory": stage_memory,
    "transformers": stage_transformers,
}


def main_gpu_check(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mtp_megatron gpu-check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="shared deadline")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"subset of {STAGES}")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a CPU dry run)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="for MFU")
    args = parser.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in RUNNERS]
    if unknown:
        print(f"error: unknown stages {unknown}; choose from {STAGES}", file=sys.stderr)
        return 2
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    os.environ["MTP_DEVICE"] = device_type
    device = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    peak = args.peak_tflops
    if peak is None and device_type == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(device, args.quick, args.out, time.monotonic() + args.budget_s, peak)
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device_type == "cuda" else "cpu",
        "torch": torch.__version__,
        "stages": {},
    }
    for name in stages:
        if ctx.left() <= 0:
            summary["stages"][name] = {
                "status": "skipped",
                "why": "the budget ran out",
                "seconds": 0,
            }
            continue
        t0 = time.monotonic()
        print(f"[gpu-check] {name} ({ctx.left():.0f} s left)", flush=True)
        try:
            result = RUNNERS[name](ctx)
        except Exception as e:  # noqa: BLE001  (record it, go on with the next stage)
            result = {
                "status": "failed",
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc().splitlines()[-8:],
            }
        result["seconds"] = round(time.monotonic() - t0, 1)
        summary["stages"][name] = result
        (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print("\n[gpu-check] summary")
    for name, result in summary["stages"].items():
        extra = result.get("why") or result.get("error") or ""
        print(f"  {name:13s} {result['status']:8s} {result['seconds']:7.1f} s  {extra}")
    print(f"figures: {args.out / 'summary.json'}")
    return 0 if all(r["status"] != "failed" for r in summary["stages"].values()) else 1
