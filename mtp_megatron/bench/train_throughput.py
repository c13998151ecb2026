"""Training throughput: our NTP and MTP models, and the NTP model on plain torch layers.

The ``local`` case is the same NTP model built on the ``local`` backend (``model/specs.py``:
plain ``torch.nn`` parameters and matmuls instead of megatron's TP layers) with the same
weights, so the gap between it and ``ntp`` is what megatron's layers cost at TP=1.

One training step = forward + backward + ``torch.optim.AdamW`` step, fp32, on the CPU, with torch's
default thread count. The machine is shared and noisy, so the cases are interleaved: each is
warmed up, then every round runs ``steps_per_round`` steps of each case in turn (the order rotates
from round to round), and a case's step time is the median over all its timed steps.

    python -m mtp_megatron bench-train [--recipe R] [--rounds N] ... [model.hidden_size=128 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from mtp_megatron.config import HEAD_TYPES, ConfigError, ModelConfig, MTPConfig
from mtp_megatron.config.mtp import HeadTypeName
from mtp_megatron.recipe import RECIPES

SMALL_RECIPE = RECIPES / "small.yaml"
DEFAULT_BATCH = 8
"""Sequences per step when the recipe has no ``train.micro_batch_size``."""
MTP_STEPS = 4
"""K of the MTP cases."""
LOCAL_KEY, NTP_KEY = "local", "ntp"
MTP_HEAD_KEYS = tuple(HEAD_TYPES)
CASE_KEYS = (LOCAL_KEY, NTP_KEY, *MTP_HEAD_KEYS)
"""``--cases`` choices: NTP on the local backend, our NTP, and our chained shared MTP head of
each type."""
GOAL_RATIO = 1.05
"""Our NTP step time may exceed the local build's by at most this factor."""


def case_name(key: str, k: int = MTP_STEPS) -> str:
    """Display name of a case key (the table's first column)."""
    return {LOCAL_KEY: "NTP, local backend", NTP_KEY: "NTP"}.get(key, f"MTP K={k} {key}")


@dataclass
class CaseResult:
    """Timings of one case."""

    key: str
    """Case key (one of CASE_KEYS)."""
    name: str
    """Display name, e.g. 'MTP K=4 mlp'."""
    params: int
    """Trainable parameters."""
    step_times_s: list[float]
    """Every timed step, in seconds, in the order they ran."""
    tokens_per_step: int
    """batch * seq_len."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_times_s)

    @property
    def iqr_s(self) -> tuple[float, float]:
        """25th and 75th percentile step times (the spread the noise left)."""
        if len(self.step_times_s) < 2:
            return self.median_s, self.median_s
        q = statistics.quantiles(self.step_times_s, n=4, method="inclusive")
        return q[0], q[2]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_s


@dataclass
class BenchResult:
    """Everything one benchmark run measured."""

    model: ModelConfig
    """Shape of every case (its ``mtp`` section is replaced per case)."""
    batch: int
    """Sequences per step."""
    seq_len: int
    """Tokens per sequence."""
    rounds: int
    """Interleaved rounds."""
    steps_per_round: int
    """Timed steps of each case per round."""
    warmup: int
    """Untimed steps of each case before the first round."""
    threads: int
    """torch.get_num_threads() during the run."""
    cases: dict[str, CaseResult] = field(default_factory=dict)
    """Results by case key, in the order requested."""

    def ratio_to_ntp(self, key: str) -> float | None:
        """tokens/s of a case over our NTP's (None when NTP was not run)."""
        if NTP_KEY not in self.cases:
            return None
        return self.cases[key].tokens_per_s / self.cases[NTP_KEY].tokens_per_s

    @property
    def ntp_over_local(self) -> float | None:
        """Our NTP median step time over the local build's (None unless both ran)."""
        if NTP_KEY not in self.cases or LOCAL_KEY not in self.cases:
            return None
        return self.cases[NTP_KEY].median_s / self.cases[LOCAL_KEY].median_s

    def paired_ntp_over_local(self) -> list[float]:
        """Our NTP / local median step time within each round: both ran minutes apart at most, so
        these ratios shrug off load that drifts over the run (their spread shows the noise)."""
        if self.ntp_over_local is None:
            return []
        n = self.steps_per_round
        ntp, local = self.cases[NTP_KEY].step_times_s, self.cases[LOCAL_KEY].step_times_s
        return [
            statistics.median(ntp[r * n : (r + 1) * n])
            / statistics.median(local[r * n : (r + 1) * n])
            for r in range(self.rounds)
        ]

    def report(self) -> str:
        """The header, the markdown table and the NTP-vs-local line."""
        m = self.model
        lines = [
            f"model: hidden {m.hidden_size}, layers {m.num_layers}, heads "
            f"{m.num_attention_heads}/{m.kv_heads} kv, ffn {m.ffn_size}, vocab {m.vocab_size} "
            f"(padded {m.padded_vocab_size}), norm {m.norm_placement}",
            f"step: batch {self.batch} x seq {self.seq_len} = {self.batch * self.seq_len} tokens; "
            f"fp32 AdamW on CPU, {self.threads} threads; warmup {self.warmup}, "
            f"{self.rounds} rounds x {self.steps_per_round} steps per case (interleaved)",
            "",
            "| case | params | median step ms | IQR ms | tokens/s | tokens/s vs NTP (ours) |",
            "|---|---|---|---|---|---|",
        ]
        for key, c in self.cases.items():
            lo, hi = c.iqr_s
            ratio = self.ratio_to_ntp(key)
            lines.append(
                f"| {c.name} | {c.params / 1e6:.3f}M | {1e3 * c.median_s:.1f} | "
                f"{1e3 * lo:.1f}-{1e3 * hi:.1f} | {c.tokens_per_s:,.0f} | "
                f"{'-' if ratio is None else f'{ratio:.3f}'} |"
            )
        if self.ntp_over_local is not None:
            ratio, goal = self.ntp_over_local, GOAL_RATIO
            paired = self.paired_ntp_over_local()
            lines += [
                "",
                f"our NTP / local-backend NTP step time: {ratio:.2f}x (goal <= {goal:.2f})",
                f"per-round paired ratio: median {statistics.median(paired):.2f}x, "
                f"range {min(paired):.2f}-{max(paired):.2f} over {len(paired)} rounds",
            ]
        return "\n".join(lines)


@dataclass
class _Case:
    """A model, its optimizer and its loss on the fixed batch."""

    key: str
    model: nn.Module
    loss: Callable[[], torch.Tensor]
    optimizer: torch.optim.Optimizer

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()


def mtp_case_config(cfg: ModelConfig, head_type: str, k: int = MTP_STEPS) -> MTPConfig:
    """Chained, shared-across-steps heads of ``head_type`` with K = k; the recipe's (or the
    default) loss weights and warm-up otherwise."""
    base = cfg.mtp or MTPConfig()
    return dataclasses.replace(
        base,
        num_predict_tokens=k,
        mtp_head_type=cast(HeadTypeName, head_type),
        share_weights_across_steps=True,
        head_arrangement="chained",
        speculation_lookahead=min(base.speculation_lookahead, k),
    )


def _build_cases(
    cfg: ModelConfig, keys: Sequence[str], input_ids: torch.Tensor, seed: int
) -> list[_Case]:
    from mtp_megatron.model import build_model
    from mtp_megatron.model.loss import labels_from_input_ids
    from mtp_megatron.parallel import ensure_parallel_initialized

    ensure_parallel_initialized()  # TP=1 one-process world for megatron's layers
    labels = labels_from_input_ids(input_ids)
    models: dict[str, nn.Module] = {}
    for key in keys:
        torch.manual_seed(seed)
        if key == LOCAL_KEY:
            models[key] = build_model(dataclasses.replace(cfg, mtp=None), backend="local")
        elif key == NTP_KEY:
            models[key] = build_model(dataclasses.replace(cfg, mtp=None))
        else:
            models[key] = build_model(dataclasses.replace(cfg, mtp=mtp_case_config(cfg, key)))
    if LOCAL_KEY in models and NTP_KEY in models:  # identical weights: identical work
        ntp = models[NTP_KEY].state_dict()
        models[LOCAL_KEY].load_state_dict({n: t for n, t in ntp.items() if torch.is_tensor(t)})

    def loss_fn(model: nn.Module) -> Callable[[], torch.Tensor]:
        return lambda: model(input_ids, labels=labels, return_logits=False).loss

    cases = []
    for key, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        cases.append(_Case(key, model, loss_fn(model), optimizer))
    return cases


def run_benchmark(
    cfg: ModelConfig,
    batch: int,
    seq_len: int,
    cases: Sequence[str] = CASE_KEYS,
    rounds: int = 10,
    steps_per_round: int = 3,
    warmup: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Time a training step of each case in ``cases`` (keys of CASE_KEYS) at the shape ``cfg``."""
    unknown = [c for c in cases if c not in CASE_KEYS]
    if unknown or not cases:
        raise ConfigError(f"cases={list(cases)!r} is invalid: choose from {', '.join(CASE_KEYS)}")
    for name, value, low in (
        ("batch", batch, 1),
        ("seq_len", seq_len, 2),
        ("rounds", rounds, 1),
        ("steps_per_round", steps_per_round, 1),
        ("warmup", warmup, 0),
    ):
        if value < low:
            raise ConfigError(f"{name}={value} is invalid: must be >= {low}")
    if seq_len > cfg.max_seq_len:
        raise ConfigError(
            f"seq_len={seq_len} is invalid: longer than model.max_seq_len ({cfg.max_seq_len})"
        )
    keys = list(dict.fromkeys(cases))  # keep order, drop repeats
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, cfg.known_vocab_size, (batch, seq_len), generator=generator)
    built = _build_cases(cfg, keys, input_ids, seed)
    say = progress or (lambda _msg: None)

    for case in built:
        say(f"warm-up {case_name(case.key)}")
        for _ in range(warmup):
            case.step()
    times: dict[str, list[float]] = {c.key: [] for c in built}
    gc.collect()
    gc.disable()  # no collector pauses inside a timed step; each round ends with a collection
    try:
        for r in range(rounds):
            shift = r % len(built)  # rotate so that no case always follows the same one
            for case in built[shift:] + built[:shift]:
                for _ in range(steps_per_round):
                    start = time.perf_counter()
                    case.step()
                    times[case.key].append(time.perf_counter() - start)
            gc.collect()
            say(f"round {r + 1}/{rounds}")
    finally:
        gc.enable()

    result = BenchResult(
        model=cfg,
        batch=batch,
        seq_len=seq_len,
        rounds=rounds,
        steps_per_round=steps_per_round,
        warmup=warmup,
        threads=torch.get_num_threads(),
    )
    for case in built:
        result.cases[case.key] = CaseResult(
            key=case.key,
            name=case_name(case.key),
            params=sum(p.numel() for p in case.model.parameters()),
            step_times_s=times[case.key],
            tokens_per_step=batch * seq_len,
        )
    return result


def _recipe_shape(recipe: Any) -> tuple[ModelConfig, int, int]:
    """(model, batch, seq_len) of a recipe; a recipe without a ``train`` section gives batch
    DEFAULT_BATCH and seq_len model.max_seq_len. ``model.vocab_size: null`` (the recipes'
    default) becomes the data's tokenizer's, as a run would take it (nothing is prepared)."""
    model: ModelConfig = recipe.model
    if model.vocab_size is None and getattr(recipe, "data", None) is not None:
        from mtp_megatron.data.loader import data_vocab_size

        model = dataclasses.replace(model, vocab_size=data_vocab_size(recipe.data))
    train = getattr(recipe, "train", None)
    batch = getattr(train, "micro_batch_size", None) or DEFAULT_BATCH
    seq_len = getattr(recipe, "seq_len", None) or model.max_seq_len
    return model, batch, seq_len


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mtp_megatron bench-train",
        description="Training step time of NTP (megatron, local layers) and MTP heads (CPU).",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted recipe overrides: model.hidden_size=128"
    )
    parser.add_argument(
        "--recipe", default=str(SMALL_RECIPE), help="recipe YAML (default: small.yaml)"
    )
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    parser.add_argument("--steps-per-round", type=int, default=3, help="steps per case per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per case first")
    parser.add_argument("--batch", type=int, default=None, help="default: train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the recipe's")
    parser.add_argument(
        "--cases", nargs="+", choices=CASE_KEYS, default=list(CASE_KEYS), help="subset to run"
    )
    parser.add_argument("--seed", type=int, default=0, help="model init and batch seed")
    return parser


def main_bench_train(argv: list[str]) -> int:
    """CLI entry point: print the table; 0 on success, 2 on a configuration error."""
    import mtp_megatron  # noqa: F401  (quiets megatron's import-time warnings)
    from mtp_megatron.parallel import destroy_parallel
    from mtp_megatron.recipe import load_recipe

    args = build_parser().parse_args(argv)
    owns_world = not torch.distributed.is_initialized()
    try:
        model, batch, seq_len = _recipe_shape(load_recipe(args.recipe, args.overrides))
        result = run_benchmark(
            model,
            batch=batch if args.batch is None else args.batch,
            seq_len=seq_len if args.seq_len is None else args.seq_len,
            cases=args.cases,
            rounds=args.rounds,
            steps_per_round=args.steps_per_round,
            warmup=args.warmup,
            seed=args.seed,
            progress=lambda msg: print(f"# {msg}", file=sys.stderr, flush=True),
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if owns_world:  # leave a caller's process groups alone
            destroy_parallel()
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main_bench_train(sys.argv[1:]))
