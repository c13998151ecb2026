"""One CLI: ``python -m mtp_megatron COMMAND ...`` (``--help`` lists the commands)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path

import yaml

from mtp_megatron.config import ConfigError

REPO = Path(__file__).resolve().parent.parent
DEMO_RECIPE = REPO / "recipes" / "demo.yaml"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def cmd_dry_run(args: argparse.Namespace) -> int:
    """Print the resolved recipe, the parallel layout and the parameter count."""
    from mtp_megatron.model.params import count_parameters
    from mtp_megatron.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# recipe {recipe.name}: {recipe.description}")
    print(yaml.safe_dump(asdict(recipe), sort_keys=False).rstrip())
    par = recipe.parallel
    mp = par.tensor_parallel_size * par.pipeline_parallel_size
    print(
        f"# layout: world = PP {par.pipeline_parallel_size} x TP {par.tensor_parallel_size} x DP "
        f"(processes / {mp}); launch a multiple of {mp} processes"
    )
    model, vocab_note = recipe.model, ""
    if model.vocab_size is None:  # the trainer takes the tokenizer's
        from mtp_megatron.data.loader import data_vocab_size

        model = replace(model, vocab_size=data_vocab_size(recipe.data))
        vocab_note = f" (the tokenizer's {model.vocab_size})"
    count = count_parameters(model)
    print(
        f"# parameters: trunk {_fmt_params(count.trunk)}, MTP heads {_fmt_params(count.heads)} "
        f"({100 * count.overhead:.1f}% overhead), padded vocab {model.padded_vocab_size}"
        f"{vocab_note}"
    )
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    """MTP head parameter overhead for the OLMo-2 1B shape (meta device, nothing allocated)."""
    from mtp_megatron.model.params import OLMO2_1B, overhead_table

    rows = overhead_table(OLMO2_1B, k=args.k)
    print(
        f"OLMo-2 1B shape (layers {OLMO2_1B.num_layers}, d {OLMO2_1B.hidden_size}, heads "
        f"{OLMO2_1B.num_attention_heads}, vocab {OLMO2_1B.vocab_size}), K={args.k} MTP steps"
    )
    print("| arrangement | head type | shared | trunk | heads | overhead |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arrangement']} | {r['head_type']} | {'yes' if r['shared'] else 'no'} | "
            f"{_fmt_params(r['trunk'])} | {_fmt_params(r['heads'])} | {100 * r['overhead']:.1f}% |"
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a recipe (and its layout for --nproc processes) without starting anything."""
    from mtp_megatron.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.nproc is not None:
        for flag, value in (("--nproc (NPROC)", args.nproc), ("--nnodes (NNODES)", args.nnodes)):
            if value < 1:
                raise ConfigError(f"{flag}={value} is invalid: must be at least 1")
        recipe.dims(args.nproc * args.nnodes)
    print(f"recipe {recipe.name}: ok")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe in this process; run it under torchrun (launch/train.sh) for several."""
    from mtp_megatron.parallel import destroy_parallel
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.checkpoint import CheckpointError
    from mtp_megatron.train.guard import NonFiniteError
    from mtp_megatron.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = train(recipe, resume=args.resume)
    except (NonFiniteError, CheckpointError) as e:  # agreed on by every rank: say it once
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        destroy_parallel()
    return 0 if result.last_step > 0 or result.stopped_early else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: train the demo recipe with 2 processes, then print its validation table."""
    import json
    import subprocess

    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.trainer import run_directory

    overrides = list(args.overrides)
    recipe = load_recipe(DEMO_RECIPE, overrides)  # fails here, before any process starts
    if args.nproc is None:
        from mtp_megatron.parallel import default_process_count

        args.nproc = default_process_count()
    recipe.dims(args.nproc)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "mtp_megatron",
        "train",
        str(DEMO_RECIPE),
        *overrides,
    ]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    run_dir = run_directory(recipe)
    final = json.loads((run_dir / "final_eval.json").read_text())
    print("\nValidation (teacher-forced) after training:")
    print(validation_table(final))
    print("\nDecoding held-out prompts (one process):", flush=True)
    return decode_benchmark(run_dir, prompts=8, prompt_len=32, max_new_tokens=64)


def decode_benchmark(
    run_dir,
    prompts: int,
    prompt_len: int,
    max_new_tokens: int,
    threads: int = 1,
    draft_vocab_size: int = 0,
    dtype: str = "fp32",
    batch_sizes: tuple[int, ...] | None = None,
    peers: bool = True,
    prompts_from: str | None = None,
    lookaheads: tuple[int, ...] | None = None,
) -> int:
    import torch

    from mtp_megatron.bench.decode import (
        benchmark_inputs,
        best_speedup,
        cost_table,
        directory_prompts,
        peer_speedups,
        run_decode_benchmark,
        save_results,
        table,
    )
    from mtp_megatron.decoding.load import load_run

    if batch_sizes is None:  # the default: 1, 4 and 8, as far as the prompts allow
        batch_sizes = tuple(b for b in (1, 4, 8) if b <= max(prompts, 1))
    if not batch_sizes or min(batch_sizes) < 1 or max(batch_sizes) > prompts:
        raise ConfigError(
            f"--batch-sizes {','.join(map(str, batch_sizes))} is invalid: each between 1 and "
            f"--prompts ({prompts})"
        )
    # batch-1 decoding is a chain of tiny matmuls: extra intra-op threads only add sync cost
    torch.set_num_threads(threads)
    run = load_run(_consolidated(run_dir), dtype=dtype)
    device = next(run.model.parameters()).device
    where = "GPU" if device.type == "cuda" else f"{threads} CPU thread(s)"
    held_out, calibration, vocab = benchmark_inputs(run, prompts, prompt_len, draft_vocab_size)
    source = "held-out validation prompts"
    if prompts_from:
        held_out = directory_prompts(prompts_from, run.tokenizer_path, prompts, prompt_len)
        source = f"prompts from {prompts_from}"
    peer = None
    if peers:
        peer = _transformers_peer(run, dtype)
    k = run.model.mtp.num_steps
    if lookaheads is None:
        lookaheads = tuple(range(1, k + 1))
    recursive = run.model.mtp.cfg.recursive_drafts
    if not lookaheads or min(lookaheads) < 1 or (max(lookaheads) > k and not recursive):
        raise ConfigError(
            f"--lookaheads {','.join(map(str, lookaheads))} is invalid: each between 1 and K={k}"
            " (only one chained head shared by every step, or K=1, drafts further)"
        )
    rows = run_decode_benchmark(
        run, held_out, max_new_tokens, list(lookaheads), vocab, batch_sizes, peer, calibration
    )
    print(table(rows))
    for r in rows:
        if r.auto:
            print(
                f"batch {r.batch}: lookahead='auto' chose L={r.lookahead} (0: plain) after "
                f"{r.calibration_s:.1f} s calibrating on {len(calibration)} other validation "
                "prompts (one-time, not in the row's time)"
            )
    print("\nCost of a speculative round, in our one-token trunk steps (CPU wall time):")
    print(cost_table(rows))
    speedup, lookahead = best_speedup(rows)
    drafts = "all tokens" if vocab is None else f"the {len(vocab)} most frequent"
    print(
        f"\nself-speculative decoding: {speedup:.2f}x wall-clock speed-up over our plain "
        f"KV-cached decoding at lookahead {lookahead} ({len(held_out)} {source} of {prompt_len} "
        f"tokens, {max_new_tokens} new tokens each, greedy, batch {min(batch_sizes)}, {dtype}, "
        f"{where}, "
        f"drafts from {drafts})"
    )
    for b, (s, la) in peer_speedups(rows).items():
        print(
            f"  batch {b}: {s:.2f}x over transformers' plain generate ({peer.family}, the same "
            f"weights) at lookahead {la}"
        )
    print(f"results: {save_results(run, rows)}")
    return 0


def _transformers_peer(run, dtype: str):
    """transformers' model on the run's weights, or None (said why) when it cannot be built."""
    import torch

    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: no peer rows (pip install -e '.[dev]')")
        return None
    from mtp_megatron.bench.decode_peers import TransformersPeer

    precision = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        return TransformersPeer(run.folder, precision, next(run.model.parameters()).device)
    except ConfigError as e:  # e.g. a trunk with no Hugging Face twin (ETD)
        print(f"no transformers rows: this run cannot be exported ({e})")
        return None


def _consolidated(path) -> Path:
    """The consolidated folder of a run directory, checkpoints/ folder or step folder, written
    first when missing or older than the run's newest checkpoint."""
    from mtp_megatron.train.consolidate import consolidated_folder

    return consolidated_folder(path)


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Write the TP=1 model.safetensors (+ recipe, tokenizer) of a checkpoint (any TP, PP, ZeRO)."""
    from mtp_megatron.train.consolidate import consolidate

    consolidate(args.checkpoint, args.out)
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    """Write a run as a Hugging Face checkpoint (transformers' twin class: Exaone4, Qwen3,
    Llama, Qwen2 or OLMo-2, with its chained MTP heads) that AutoModelForCausalLM loads with the
    same logits."""
    from mtp_megatron.hf.export import export_hf

    export_hf(_consolidated(args.checkpoint), args.out)
    return 0


def cmd_import_hf(args: argparse.Namespace) -> int:
    """Check that a Hugging Face checkpoint directory can start a run (init_from: hf:DIR): the
    trunk it gives, its weights loaded strictly, its tokenizer; nothing is written."""
    from mtp_megatron.hf.importer import check_checkpoint

    found = check_checkpoint(f"hf:{args.directory}")
    cfg, tok = found["model"], found["tokenizer"]
    print(
        f"{found['folder']}: {found['family']}, {cfg.num_layers} layers, h {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads of {cfg.head_dim} ({cfg.kv_heads} kv), SwiGLU "
        f"{cfg.ffn_size}, {cfg.norm_placement}-norm, QK-norm "
        f"{cfg.qk_norm_scope if cfg.qk_norm else 'none'}, vocabulary {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'}; {found['parameters'] / 1e6:.1f}M trunk "
        f"parameters, every tensor used; tokenizer vocabulary {tok['vocab_size']}, end of "
        f"document {tok['eod_token']!r} = {tok['eod_id']}"
    )
    print(f"start a run from it with: init_from=hf:{found['folder']}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    """Plain vs speculative decoding (lookahead 1..K) on held-out prompts of a trained run."""
    return decode_benchmark(
        args.checkpoint,
        args.prompts,
        args.prompt_len,
        args.max_new_tokens,
        args.threads,
        args.draft_vocab,
        args.dtype,
        tuple(args.batch_sizes) if args.batch_sizes else None,
        not args.no_transformers,
        args.prompts_from,
        tuple(args.lookaheads) if args.lookaheads else None,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a trained run with self-speculative decoding (or plain, --plain)."""
    import torch

    from mtp_megatron.data import load_tokenizer
    from mtp_megatron.decoding import SamplingConfig, generate_plain
    from mtp_megatron.decoding.load import load_run

    # the arguments first: loading the model takes seconds
    SamplingConfig(
        args.temperature, args.top_p, args.top_k, acceptance_threshold=args.acceptance_threshold
    ).validate()
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 1")
    if args.lookahead is not None and args.lookahead < 1:
        raise ConfigError(f"--lookahead={args.lookahead} is invalid: must be >= 1")
    if not args.prompt:
        raise ConfigError("--prompt is empty")
    run = load_run(_consolidated(args.checkpoint), dtype=args.dtype)
    tok = load_tokenizer(str(run.tokenizer_path))
    ids = torch.tensor([tok.encode(args.prompt).ids])
    if ids.shape[1] == 0:
        raise ConfigError("--prompt encodes to no tokens")
    gen = torch.Generator().manual_seed(args.seed)
    if args.plain:
        sampling = SamplingConfig(args.temperature, args.top_p, args.top_k)
        out, stats = generate_plain(run.model, ids, args.max_new_tokens, sampling, generator=gen)
    else:
        out, stats = run.model.mtp_decoder.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            lookahead=args.lookahead,
            acceptance_threshold=args.acceptance_threshold,
            generator=gen,
        )
    print(tok.decode(out[0].tolist()))
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items()}
    print(f"\n# {shown}", file=sys.stderr)
    return 0


def validation_table(ev: dict[str, float]) -> str:
    """Markdown table of validation loss, top-1 accuracy and acceptance per head."""
    rows = [
        "| head | predicts | val loss | top-1 acc | acceptance (greedy proxy) |",
        "|---|---|---|---|---|",
        f"| main | t+1 | {ev['val/loss_main']:.4f} | {ev['val/acc_main']:.3f} | - |",
    ]
    k = 1
    while f"val/loss_mtp_step_{k}" in ev:
        rows.append(
            f"| mtp {k} | t+{k + 1} | {ev[f'val/loss_mtp_step_{k}']:.4f} | "
            f"{ev[f'val/acc_mtp_step_{k}']:.3f} | {ev[f'val/acceptance_pos_{k}']:.3f} |"
        )
        k += 1
    return "\n".join(rows)


# Commands that parse their own arguments: name -> (module, entry function, summary).
# main() hands them the rest of argv (argparse's REMAINDER would drop leading --options).
PASSTHROUGH = {
    "prepare": (
        "mtp_megatron.cli.data",
        "main_prepare",
        "Tokenize files (any Hugging Face tokenizer, N workers) into Megatron indexed datasets.",
    ),
    "bench-train": (
        "mtp_megatron.bench.train_throughput",
        "main_bench_train",
        "Training throughput: NTP vs MTP K=4 per head type; megatron layers vs the local ones.",
    ),
    "bench-memory": (
        "mtp_megatron.bench.memory",
        "main_bench_memory",
        "Peak memory and step time: NTP vs MTP K=4 plain / sequential / + checkpointing.",
    ),
    "bench-data": (
        "mtp_megatron.bench.data_startup",
        "main_bench_data",
        "Start-up time and peak RSS of the indexed-data path for 10M / 100M / 1B-token corpora.",
    ),
    "etd-split": (
        "mtp_megatron.etd_split",
        "main_etd_split",
        "Angular distance between the layers of a trained run, and the ETD split it proposes.",
    ),
    "gpu-check": (
        "mtp_megatron.bench.gpu_check",
        "main_gpu_check",
        "The GPU check: gpu tests, training + resume, SDPA kernels, decoding, MFU, memory.",
    ),
    "sweep": (
        "mtp_megatron.sweep",
        "main_sweep",
        "Plan a SLURM sweep (grid / zip over recipes) and resolve one job (launch/slurm/ uses it).",
    ),
    "report": (
        "mtp_megatron.report",
        "main_report",
        "Side-by-side table (markdown, CSV) and plots of the runs of a sweep.",
    ),
    "research": (
        "mtp_megatron.research",
        "main_research",
        "Reproduce a paper's MTP finding at CPU scale into docs/research/NAME/.",
    ),
}


def run_passthrough(name: str, rest: list[str]) -> int:
    import importlib

    module, function, _ = PASSTHROUGH[name]
    return getattr(importlib.import_module(module), function)(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mtp_megatron", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dry-run", help=cmd_dry_run.__doc__)
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides: model.mtp.num_predict_tokens=2")
    p.set_defaults(func=cmd_dry_run)

    p = sub.add_parser("params", help=cmd_params.__doc__)
    p.add_argument("--k", type=int, default=4, help="MTP steps (num_predict_tokens)")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("check", help=cmd_check.__doc__)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--nproc", type=int, default=None, help="processes per node")
    p.add_argument("--nnodes", type=int, default=1, help="nodes")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("train", help=cmd_train.__doc__)
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="dotted overrides: train.steps=100")
    p.add_argument(
        "--resume",
        choices=["auto", "require", "never"],
        default="auto",
        help="auto: continue from the run directory's latest checkpoint when there is one",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help=cmd_generate.__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ or step folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--lookahead", type=int, default=None, help="default: the recipe's")
    p.add_argument("--acceptance-threshold", type=float, default=1.0, help="< 1 is lossy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="plain decoding, no drafts")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: faster on GPU")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("consolidate", help=cmd_consolidate.__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoints/ or step folder")
    p.add_argument(
        "--out",
        default=None,
        help="folder to write (default: the run dir for its newest checkpoint, else "
        "run_dir/consolidated/step_N)",
    )
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser("import-hf", help=cmd_import_hf.__doc__)
    p.add_argument("directory", help="a local Hugging Face checkpoint (config.json, safetensors)")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help=cmd_export_hf.__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoints/ or step folder, or consolidated")
    p.add_argument("out", help="the Hugging Face directory to write (must not exist)")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("bench-decode", help=cmd_bench_decode.__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ or step folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: faster on GPU")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="heads draft only the N most frequent training tokens (0: all; same output)",
    )
    p.add_argument(
        "--batch-sizes",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="comma-separated batch sizes (consecutive prompts decoded together; default "
        "1,4,8 as far as --prompts allows)",
    )
    p.add_argument(
        "--prompts-from",
        default=None,
        help="take the prompts from this text or code directory instead of the validation split",
    )
    p.add_argument(
        "--lookaheads",
        type=lambda v: [int(x) for x in v.split(",")],
        default=None,
        help="comma-separated lookaheads to measure (default 1..K; past K only for one shared "
        "chained head, drafting by recursion)",
    )
    p.add_argument(
        "--no-transformers",
        action="store_true",
        help="leave out the rows of transformers' generate on the same weights",
    )
    p.set_defaults(func=cmd_bench_decode)

    for name, (_, _, summary) in PASSTHROUGH.items():  # listed in --help; main() dispatches
        sub.add_parser(name, help=summary, add_help=False)

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("overrides", nargs="*", help="dotted overrides of recipes/demo.yaml")
    p.add_argument(
        "--nproc", type=int, default=None, help="processes (default: one per GPU, or 2 on CPU)"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import mtp_megatron  # noqa: F401  (quiets megatron's import-time warnings)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:
        name, rest = argv[0], argv[1:]
        args = argparse.Namespace(func=lambda _: run_passthrough(name, rest))
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:  # bad input: one line; anything else keeps its traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses alike
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
