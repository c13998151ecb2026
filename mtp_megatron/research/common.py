"""What the reproductions share: training a recipe through the real trainer (one subprocess per
run, as a user would launch it), decoding statistics of a trained run, and the files a study
writes (``results.md``, ``results.json``, plots) into ``docs/research/<name>/``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mtp_megatron.recipe import DEMO_RECIPE

REPO = Path(__file__).resolve().parents[2]
"""The checkout: the studies write into its docs/research/."""
STUDY_SHAPE = {
    # A 6-layer d128 model of the demo recipe (pre-norm, std-1 embedding, chained shared heads,
    # self-distilled) trained for 600 steps of 8 x 128 tokens (0.6M): about five minutes a run
    # in one process on this 2-core CPU (at 300 steps, validation loss 5.1: the heads and the
    # main head still agreed mostly on frequent tokens).
    "model.hidden_size": 128,
    "model.num_layers": 6,
    "model.num_attention_heads": 4,
    "model.max_seq_len": 128,
    "train.steps": 600,
    "train.micro_batch_size": 8,
    "train.lr_warmup_steps": 60,
    "train.eval_every": 0,
    "train.checkpoint_every": 0,
    "train.log_every": 10,
    "train.keep_last": 1,
}
"""Recipe overrides of ``recipes/demo.yaml`` that the trained studies start from."""

QUICK_SHAPE = {
    **STUDY_SHAPE,
    "model.hidden_size": 64,
    "model.num_layers": 2,
    "model.max_seq_len": 64,
    "train.steps": 12,
    "train.micro_batch_size": 2,
    "train.lr_warmup_steps": 2,
    "train.eval_batches": 2,
    "data.max_files": 60,
    "data.tokenizer": "bpe:512",
}
"""``--quick`` (the suite's smoke test): seconds a run, numbers meaningless."""


@dataclass
class Study:
    """Where a study runs and writes, and how big it trains."""

    out_dir: Path
    """``docs/research/<name>/``: results.md, results.json, plots."""
    work_dir: Path
    """Run directories of its trainings (kept: a second call reuses finished runs)."""
    quick: bool = False
    """Tiny shapes and few prompts (tests)."""
    log: Callable[[str], None] = print
    started: float = field(default_factory=time.perf_counter)

    @property
    def shape(self) -> dict:
        return dict(QUICK_SHAPE if self.quick else STUDY_SHAPE)

    def train(
        self,
        name: str,
        overrides: dict,
        recipe: Path = DEMO_RECIPE,
        shape: bool = True,
        nproc: int = 1,
    ) -> Path:
        """Train ``recipe`` with the study's shape (unless ``shape`` is false) and
        ``overrides`` in ``nproc`` processes (torchrun beyond one; skipped when the run
        finished before); its run directory."""
        run_dir = self.work_dir / ("quick-" + name if self.quick else name)
        base = self.shape if shape or self.quick else {}
        if self.quick:  # the suite's smoke test: its own tokenizer and token cache
            base["data.cache_dir"] = str(self.work_dir / "cache")
        merged = {**base, **overrides, "train.run_dir": str(run_dir)}
        args = [f"{k}={v}" for k, v in merged.items()]
        settings = {"recipe": str(recipe), "overrides": args, "nproc": nproc}
        settings_path = run_dir / "research_settings.json"
        if (run_dir / "final_eval.json").exists():
            saved = json.loads(settings_path.read_text()) if settings_path.exists() else settings
            if saved != settings:  # a study changed its run: never reuse a different model
                raise RuntimeError(
                    f"{run_dir} was trained with other settings ({saved}) than {name} now asks "
                    f"for ({settings}): move it away or delete it to train it again"
                )
            self.log(f"[research] {name}: trained before ({run_dir}), reused")
            return run_dir
        launcher = [sys.executable]
        if nproc > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        cmd = [*launcher, "-m", "mtp_megatron", "train", str(recipe), *args]
        self.log(f"[research] {name}: training ({' '.join(args[len(base) :])})")
        t0 = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.work_dir / f"{run_dir.name}.log"  # the trainer's progress, as it goes
        with open(log_path, "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if rc != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-30:])
            raise RuntimeError(f"training {name} failed ({rc}; log {log_path}):\n{tail}")
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
        self.log(f"[research] {name}: trained in {time.perf_counter() - t0:.0f} s")
        return run_dir

    def write(self, name: str, table: str, results: dict, command: str) -> None:
        """results.md (the table, the command and its wall time) and results.json."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        wall = time.perf_counter() - self.started
        results = {**results, "command": command, "wall_time_s": round(wall, 1)}
        (self.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        text = (
            f"# {name}: measured\n\n{table}\n\n"
            f"Command: `{command}` ({wall / 60:.1f} min on this machine"
            f"{', --quick: numbers meaningless' if self.quick else ''}).\n"
        )
        (self.out_dir / "results.md").write_text(text)
        self.log(text)


def decoding_stats(run_dir: Path, lookahead: int, prompts: int, max_new_tokens: int) -> dict:
    """Greedy self-speculative decoding of ``prompts`` held-out validation prompts at
    ``lookahead``: acceptance per draft position and tokens per trunk forward (counts, not
    wall time: the same on any machine)."""
    import torch

    from mtp_megatron.bench.decode_inputs import benchmark_inputs
    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.train.consolidate import consolidated_folder

    torch.set_num_threads(1)
    run = load_run(consolidated_folder(run_dir))
    held_out, _, _ = benchmark_inputs(run, prompts, 32, 0)
    accepted = [0.0] * lookahead
    new = calls = 0
    for x in held_out:
        _, stats = run.model.mtp_decoder.generate(
            x, max_new_tokens=max_new_tokens, lookahead=lookahead
        )
        rates = stats["acceptance_rate_per_position"]
        accepted = [a + r * stats["rounds"] for a, r in zip(accepted, rates)]
        new += stats["new_tokens"]
        calls += stats["forward_calls"]
    rounds = calls - len(held_out)  # every call after each prefill is a round
    return {
        "acceptance_per_position": [a / max(rounds, 1) for a in accepted],
        "tokens_per_forward": new / calls,
    }


def final_eval(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "final_eval.json").read_text())


def percent(values: list[float]) -> str:
    return " / ".join(f"{100 * v:.0f}%" for v in values)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
