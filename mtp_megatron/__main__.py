"""One CLI: ``python -m mtp_megatron COMMAND ...`` (``--help`` lists the commands)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import yaml

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
    count = count_parameters(recipe.model)
    print(
        f"# parameters: trunk {_fmt_params(count.trunk)}, MTP heads {_fmt_params(count.heads)} "
        f"({100 * count.overhead:.1f}% overhead), padded vocab {recipe.model.padded_vocab_size}"
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
        recipe.parallel.validate_world(args.nproc * args.nnodes)
    print(f"recipe {recipe.name}: ok")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a recipe in this process; run it under torchrun (launch/train.sh) for several."""
    from mtp_megatron.parallel import destroy_parallel
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        result = train(recipe, resume=args.resume)
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
    recipe.parallel.validate_world(args.nproc)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={args.nproc}", "-m", "mtp_megatron", "train", str(DEMO_RECIPE),
        *overrides,
    ]
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        return rc
    final = json.loads((run_directory(recipe) / "final_eval.json").read_text())
    print(validation_table(final))
    return 0


def validation_table(ev: dict[str, float]) -> str:
    """Markdown table of validation loss, top-1 accuracy and acceptance per head."""
    rows = ["| head | predicts | val loss | top-1 acc | acceptance (greedy proxy) |",
            "|---|---|---|---|---|",
            f"| main | t+1 | {ev['val/loss_main']:.4f} | {ev['val/acc_main']:.3f} | - |"]
    k = 1
    while f"val/loss_mtp_step_{k}" in ev:
        rows.append(
            f"| mtp {k} | t+{k + 1} | {ev[f'val/loss_mtp_step_{k}']:.4f} | "
            f"{ev[f'val/acc_mtp_step_{k}']:.3f} | {ev[f'val/acceptance_pos_{k}']:.3f} |"
        )
        k += 1
    return "\n".join(rows)


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

    p = sub.add_parser("demo", help=cmd_demo.__doc__)
    p.add_argument("overrides", nargs="*", help="dotted overrides of recipes/demo.yaml")
    p.add_argument("--nproc", type=int, default=2, help="processes (data parallel)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    import mtp_megatron  # noqa: F401  (quiets megatron's import-time warnings)
    from mtp_megatron.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
