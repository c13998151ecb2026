"""Commands around a recipe and its run: ``train``, ``check``, ``dry-run``, ``plan``, ``params``,
``consolidate`` and ``demo`` (the main job: train the demo recipe, then decode with it)."""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, replace
from typing import get_args

from mtp_megatron.cli import command_parser
from mtp_megatron.config import ConfigError


def _recipe_parser(name: str, description: str | None):
    p = command_parser(name, description)
    p.add_argument(
        "recipe", help="recipe YAML (or a project recipe's name), e.g. recipes/demo.yaml"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    return p


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


H100_GIB = 79.6
"""What an H100 80GB reports (81,559 MiB): the plan's GPU when none is given or present."""


def _add_plan_arguments(p) -> None:
    p.add_argument(
        "--nproc", type=int, default=None, help="processes (GPUs) per node (default: TP x PP)"
    )
    p.add_argument("--nnodes", type=int, default=1, help="nodes")
    p.add_argument(
        "--gpu-mem",
        type=float,
        default=None,
        help=f"GiB per GPU to plan for (default: this node's GPU, else {H100_GIB}, an H100 80GB)",
    )


def _world(args, recipe) -> int:
    """--nproc x --nnodes, or the recipe's smallest world (TP x PP) without --nproc."""
    if args.nproc is None:
        par = recipe.parallel
        return par.tensor_parallel_size * par.pipeline_parallel_size
    for flag, value in (("--nproc (NPROC)", args.nproc), ("--nnodes (NNODES)", args.nnodes)):
        if value < 1:
            raise ConfigError(f"{flag}={value} is invalid: must be at least 1")
    return args.nproc * args.nnodes


def _gpu_bytes(gpu_mem: float | None) -> float | None:
    """--gpu-mem in bytes, else this node's first GPU's memory when a GPU is in use."""
    if gpu_mem is not None:
        if not gpu_mem > 0:
            raise ConfigError(f"--gpu-mem={gpu_mem} is invalid: GiB per GPU, > 0")
        return gpu_mem * 2**30
    from mtp_megatron.parallel.state import uses_cuda

    if uses_cuda():
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def _resolved_vocab(recipe) -> str:
    """Set ``model.vocab_size`` None to the data's (as the trainer will); a note saying so."""
    if recipe.model.vocab_size is not None:
        return ""
    from mtp_megatron.data.loader import data_vocab_size

    recipe.model = replace(recipe.model, vocab_size=data_vocab_size(recipe.data))
    return f" (the tokenizer's {recipe.model.vocab_size})"


def main_plan(argv: list[str]) -> int:
    """Per-GPU memory of a recipe before launch (weights, gradients, optimizer states by ZeRO
    stage and precision, activations and logits), and the change that makes it fit if it does
    not; exit 1 then. docs/memory-plan.md says how it is counted and how close it comes."""
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.memory_plan import GIB, make_it_fit, plan_recipe

    p = _recipe_parser("plan", main_plan.__doc__)
    _add_plan_arguments(p)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    world = _world(args, recipe)
    _resolved_vocab(recipe)
    device_bytes = _gpu_bytes(args.gpu_mem) or H100_GIB * GIB
    plan = plan_recipe(recipe, world)
    print(f"recipe {recipe.name} on {world} GPU(s):\n{plan.table(device_bytes)}")
    if plan.fits(device_bytes):
        return 0
    fix, fixed = make_it_fit(recipe, world, device_bytes)
    if fix:
        print(f"to fit: {' '.join(fix)}\n{fixed.table(device_bytes)}")
    else:
        print("no change of ZeRO stage, checkpointing, schedule or micro-batch makes it fit: ")
        print("raise parallel.tensor_parallel_size / pipeline_parallel_size, or use more GPUs")
    return 1


def main_dry_run(argv: list[str]) -> int:
    """Print the resolved recipe, the parallel layout, the parameter count and the memory plan
    per GPU (for --nproc x --nnodes processes)."""
    import yaml

    from mtp_megatron.model.params import count_parameters
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.memory_plan import plan_recipe

    parser = _recipe_parser("dry-run", main_dry_run.__doc__)
    _add_plan_arguments(parser)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    print(f"# recipe {recipe.name}: {recipe.description}")
    print(yaml.safe_dump(asdict(recipe), sort_keys=False).rstrip())
    par = recipe.parallel
    mp = par.tensor_parallel_size * par.pipeline_parallel_size
    print(
        f"# layout: world = PP {par.pipeline_parallel_size} x TP {par.tensor_parallel_size} x DP "
        f"(processes / {mp}); launch a multiple of {mp} processes"
    )
    vocab_note = _resolved_vocab(recipe)  # the trainer takes the tokenizer's
    model = recipe.model
    count = count_parameters(model)
    print(
        f"# parameters: trunk {_fmt_params(count.trunk)}, MTP heads {_fmt_params(count.heads)} "
        f"({100 * count.overhead:.1f}% overhead), padded vocab {model.padded_vocab_size}"
        f"{vocab_note}"
    )
    world = _world(args, recipe)
    try:
        table = plan_recipe(recipe, world).table(_gpu_bytes(args.gpu_mem))
    except ConfigError as e:  # a model the plan cannot trace, a layout only the CPU runs
        print(f"# memory plan: not available: {e}")
        return 0
    print(f"# on {world} GPU(s) ('auto' resolved as on a GPU; --nproc N for another count)")
    print("\n".join(f"# {line}" for line in table.splitlines()))
    return 0


def main_params(argv: list[str]) -> int:
    """MTP head parameter overhead for the OLMo-2 1B shape (meta device, nothing allocated)."""
    from mtp_megatron.model.params import OLMO2_1B, overhead_table

    p = command_parser("params", main_params.__doc__)
    p.add_argument("--k", type=int, default=4, help="MTP steps (num_predict_tokens)")
    args = p.parse_args(argv)
    print(
        f"OLMo-2 1B shape (layers {OLMO2_1B.num_layers}, d {OLMO2_1B.hidden_size}, heads "
        f"{OLMO2_1B.num_attention_heads}, vocab {OLMO2_1B.vocab_size}), K={args.k} MTP steps"
    )
    print("| arrangement | head type | shared | trunk | heads | overhead |")
    print("|---|---|---|---|---|---|")
    for r in overhead_table(OLMO2_1B, k=args.k):
        print(
            f"| {r['arrangement']} | {r['head_type']} | {'yes' if r['shared'] else 'no'} | "
            f"{_fmt_params(r['trunk'])} | {_fmt_params(r['heads'])} | {100 * r['overhead']:.1f}% |"
        )
    return 0


def main_check(argv: list[str]) -> int:
    """Validate a recipe (and its layout for --nproc processes) without starting anything."""
    from mtp_megatron.recipe import load_recipe

    p = _recipe_parser("check", main_check.__doc__)
    _add_plan_arguments(p)
    args = p.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    gpu_bytes = None
    if os.environ.get("MTP_DEVICE", "").strip() or args.gpu_mem is not None:
        # launch/train.sh sets MTP_DEVICE where GPUs are listed: the device the workers would
        # train on exists, and the recipe fits it
        gpu_bytes = _gpu_bytes(args.gpu_mem)
    if args.nproc is not None:
        recipe.dims(_world(args, recipe))
    from mtp_megatron.train.memory_plan import GIB, PlanUnavailable, check_fits, memory_check

    if gpu_bytes is not None and memory_check():
        _resolved_vocab(recipe)
        try:
            plan = check_fits(recipe, _world(args, recipe), gpu_bytes, "each GPU")
            print(f"recipe {recipe.name}: about {plan.total / GIB:.1f} GiB per GPU ({plan.what})")
        except PlanUnavailable as e:
            print(f"recipe {recipe.name}: memory plan: not available: {e}")
    print(f"recipe {recipe.name}: ok")
    return 0


def main_train(argv: list[str]) -> int:
    """Train a recipe in this process; run it under torchrun (launch/train.sh) for several."""
    from mtp_megatron.parallel import destroy_parallel
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.checkpoint import CheckpointError
    from mtp_megatron.train.guard import NonFiniteError
    from mtp_megatron.train.trainer import ResumeMode, train

    p = _recipe_parser("train", main_train.__doc__)
    p.add_argument(
        "--resume",
        choices=get_args(ResumeMode),
        default="auto",
        help="auto: continue from the run directory's latest checkpoint when there is one",
    )
    args = p.parse_args(argv)
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


def main_consolidate(argv: list[str]) -> int:
    """Write the TP=1 model.safetensors (+ recipe, tokenizer) of a checkpoint (any TP, PP, ZeRO)."""
    from mtp_megatron.train.consolidate import consolidate

    p = command_parser("consolidate", main_consolidate.__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoints/ or step folder")
    p.add_argument(
        "--out",
        default=None,
        help="folder to write (default: the run dir for its newest checkpoint, else "
        "run_dir/consolidated/step_N)",
    )
    args = p.parse_args(argv)
    consolidate(args.checkpoint, args.out)
    return 0


def main_demo(argv: list[str]) -> int:
    """The main job: train the demo recipe with 2 processes, then print its validation table
    and decode held-out prompts with it."""
    import json
    import subprocess

    from mtp_megatron.recipe import DEMO_RECIPE, load_recipe
    from mtp_megatron.train.evaluate import validation_table
    from mtp_megatron.train.trainer import run_directory

    p = command_parser("demo", main_demo.__doc__)
    p.add_argument("overrides", nargs="*", help="dotted overrides of recipes/demo.yaml")
    p.add_argument(
        "--nproc", type=int, default=None, help="processes (default: one per GPU, or 2 on CPU)"
    )
    args = p.parse_args(argv)
    recipe = load_recipe(DEMO_RECIPE, args.overrides)  # fails here, before any process starts
    if args.nproc is None:
        from mtp_megatron.parallel import default_process_count

        args.nproc = default_process_count()
    recipe.dims(args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={args.nproc}", "-m", "mtp_megatron", "train", str(DEMO_RECIPE)]
    print("$ " + " ".join([*cmd, *args.overrides]), flush=True)
    rc = subprocess.call([*cmd, *args.overrides])
    if rc != 0:
        return rc
    run_dir = run_directory(recipe)
    final = json.loads((run_dir / "final_eval.json").read_text())
    print("\nValidation (teacher-forced) after training:")
    print(validation_table(final))
    print("\nDecoding held-out prompts (one process):", flush=True)
    from mtp_megatron.bench.decode import BenchDecodeOptions, run_bench_decode
    from mtp_megatron.train.consolidate import consolidated_folder

    options = BenchDecodeOptions(prompts=8, prompt_len=32, max_new_tokens=64)
    print(f"results: {run_bench_decode(consolidated_folder(run_dir), options)}")
    return 0
