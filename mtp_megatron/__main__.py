"""One CLI: ``python -m mtp_megatron COMMAND ...`` (``--help`` lists the commands).

Each command is a ``main_<name>(argv) -> int`` in the module that owns it (the CLI layer,
``cli/``, for those that compose several parts; the benchmarks and tools in their own modules),
parsing its own arguments; this module is only the table and the dispatch.
"""

from __future__ import annotations

import importlib
import os
import sys

from mtp_megatron.config import ConfigError

COMMANDS: dict[str, tuple[str, str]] = {
    # name: ("module:function", summary)
    "demo": ("cli.train:main_demo", "The main job: train the demo recipe, then decode with it."),
    "train": ("cli.train:main_train", "Train a recipe (under torchrun for several processes)."),
    "check": ("cli.train:main_check", "Validate a recipe (and its layout) without starting."),
    "dry-run": ("cli.train:main_dry_run", "Print the resolved recipe, layout and parameters."),
    "plan": (
        "cli.train:main_plan",
        "Per-GPU memory of a recipe before launch, and the change that makes it fit.",
    ),
    "params": ("cli.train:main_params", "MTP head parameter overhead at the OLMo-2 1B shape."),
    "consolidate": ("cli.train:main_consolidate", "A checkpoint as TP=1 model.safetensors."),
    "prepare": (
        "cli.data:main_prepare",
        "Tokenize files (any Hugging Face tokenizer, N workers) into Megatron indexed datasets.",
    ),
    "generate": ("cli.decode:main_generate", "Generate from a trained run (speculative or plain)."),
    "bench-decode": (
        "cli.decode:main_bench_decode",
        "Plain vs speculative decoding vs transformers on held-out prompts of a trained run.",
    ),
    "import-hf": ("cli.hf:main_import_hf", "Check that a Hugging Face checkpoint can start a run."),
    "export-hf": ("cli.hf:main_export_hf", "Write a run as a Hugging Face checkpoint."),
    "bench-train": (
        "bench.train_throughput:main_bench_train",
        "Training throughput: NTP vs MTP K=4 per head type; megatron layers vs the local ones.",
    ),
    "bench-memory": (
        "bench.memory:main_bench_memory",
        "Peak memory and step time: NTP vs MTP K=4 plain / sequential / + checkpointing.",
    ),
    "bench-plan": (
        "bench.plan_check:main_bench_plan",
        "The memory plan against a real DeepSpeed step, per precision and ZeRO stage.",
    ),
    "bench-data": (
        "bench.data_startup:main_bench_data",
        "Start-up time and peak RSS of the indexed-data path for 10M / 100M / 1B-token corpora.",
    ),
    "etd-split": (
        "etd_split:main_etd_split",
        "Angular distance between the layers of a trained run, and the ETD split it proposes.",
    ),
    "gpu-check": (
        "bench.gpu_check:main_gpu_check",
        "The GPU check: gpu tests, training + resume, SDPA kernels, decoding, MFU, memory.",
    ),
    "sweep": (
        "sweep:main_sweep",
        "Plan a SLURM sweep (grid / zip over recipes) and resolve one job (launch/slurm/ uses it).",
    ),
    "report": ("report:main_report", "Side-by-side table (markdown, CSV) and plots of a sweep."),
    "research": (
        "research:main_research",
        "Reproduce a paper's MTP finding at CPU scale into docs/research/NAME/.",
    ),
}


def command(name: str):
    """The entry function of command ``name`` (imported on use: most pull in torch)."""
    target, _ = COMMANDS[name]
    module, function = target.split(":")
    return getattr(importlib.import_module(f"mtp_megatron.{module}"), function)


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"usage: python -m mtp_megatron COMMAND [options]   ({__doc__.splitlines()[0]})"]
    lines += ["", "commands (COMMAND --help for each one's options):"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import mtp_megatron  # noqa: F401  (quiets megatron's import-time warnings)

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return command(argv[0])(argv[1:])
    except ConfigError as e:  # bad input: one line; anything else keeps its traceback
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses alike
            print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
