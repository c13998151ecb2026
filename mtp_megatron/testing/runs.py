"""Short training runs of the demo recipe at a tiny shape, for the tests that train end to end.

``tiny_run_overrides`` gives the recipe overrides of a run that trains in seconds on a CPU;
``train_run`` runs one on this process's rank (a ``run_distributed`` target) and returns what
the tests compare: per-step losses and grad norms, the evaluations and the last step.
"""

from __future__ import annotations

from pathlib import Path

from mtp_megatron.recipe import DEMO_RECIPE

REPO = Path(__file__).resolve().parents[2]
"""The repository checkout the tests run from (recipes/, launch/)."""


def tiny_run_overrides(run_dir: Path, cache: Path, **extra) -> list[str]:
    """Overrides of ``recipes/demo.yaml``: a 2-layer d64 K=2 model, 30 steps of 4 x 64 tokens,
    no evaluation or checkpoints unless ``extra`` asks; ``cache``: the tokenizer + token cache
    (share one between runs: the first run builds it)."""
    base = {
        "data.tokenizer": "bpe:512",
        "model.hidden_size": 64,
        "model.num_layers": 2,
        "model.num_attention_heads": 4,
        "model.max_seq_len": 64,
        # the base recipe's trunk and loss (the suite's training tests were written against
        # them), not the demo's pre-norm, std-1 embedding and self-distillation (make demo
        # exercises those; test_trunk_training / test_tp_parity test distillation)
        "model.norm_placement": "post",
        "model.embedding_init_std": "null",
        "train.mtp.distill_weight": 0.0,
        "model.mtp.num_predict_tokens": 2,
        "model.mtp.speculation_lookahead": 2,
        "train.steps": 30,
        "train.micro_batch_size": 4,
        "train.lr": 3e-3,
        "train.lr_warmup_steps": 5,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.checkpoint_every": 0,
        "train.run_dir": str(run_dir),
        "data.max_files": 60,
        "data.cache_dir": str(cache),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_run(rank: int, world: int, overrides: list[str], stop_after: int | None = None) -> dict:
    """Train the demo recipe with ``overrides`` (stopping after ``stop_after`` steps if set)."""
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.trainer import train

    recipe = load_recipe(DEMO_RECIPE, overrides)
    result = train(recipe, log=print, stop_after_steps=stop_after)
    return {
        "losses": result.losses,
        "grad_norms": result.grad_norms,
        "eval": result.eval,
        "last_step": result.last_step,
    }
