"""Decode benchmark: plain KV-cached decoding vs self-speculative decoding at lookahead 1..K.

Held-out prompts come from the run's validation split. For each prompt every method runs in
turn (interleaved, so machine noise hits all of them alike); greedy outputs are compared token
for token with plain decoding. Wall-clock speed-up = plain time / speculative time, summed over
the prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtp_megatron.config import ConfigError, from_dict
from mtp_megatron.decoding.draft_vocab import frequent_token_ids
from mtp_megatron.decoding.load import LoadedRun
from mtp_megatron.decoding.speculative import generate_plain


@dataclass
class DecodeRow:
    """One method's totals over all prompts."""

    method: str
    """'plain' or 'speculative L=k'."""
    lookahead: int
    """Drafts per round (0 for plain)."""
    wall_s: float = 0.0
    """Summed wall time."""
    new_tokens: int = 0
    """Tokens generated."""
    forward_calls: int = 0
    """Trunk forwards (prefill included)."""
    accepted_per_position: list[float] = field(default_factory=list)
    """Acceptance rate of draft position 1..L (mean over prompts)."""
    identical: bool = True
    """Greedy output equal to plain decoding's on every prompt."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / max(self.forward_calls, 1)


FREQUENCY_TOKENS = 50_000_000
"""Training tokens counted for the draft vocabulary (bounded: a pretraining corpus is large)."""


def benchmark_inputs(
    run: LoadedRun, n: int, prompt_len: int, draft_vocab_size: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """n prompts of prompt_len tokens, evenly spaced over the run's validation documents (back
    to back), and the draft_vocab_size most frequent tokens of the first
    ``FREQUENCY_TOKENS`` training tokens (None when 0: drafts use every token)."""
    from mtp_megatron.data.config import DataConfig
    from mtp_megatron.data.loader import prefix_tokens, resolve_data

    vocab_size = run.model_config.vocab_size
    data_cfg = from_dict(DataConfig, run.recipe.get("data") or {}, "data")
    blends = resolve_data(data_cfg, log=lambda *a: None)  # prepared already: a no-op
    stream = torch.from_numpy(prefix_tokens(blends.validation).astype("int64"))
    span = len(stream) - prompt_len - 1
    if span <= 0:
        raise ConfigError(f"validation split too short for {prompt_len}-token prompts")
    starts = [int(i * span / max(n, 1)) for i in range(n)]
    prompts = [stream[s : s + prompt_len][None] for s in starts]
    vocab = None
    if draft_vocab_size:
        train = prefix_tokens(blends.train, limit=FREQUENCY_TOKENS)
        vocab = frequent_token_ids(train, draft_vocab_size, vocab_size)
    return prompts, vocab


def run_decode_benchmark(
    run: LoadedRun,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    lookaheads: list[int],
    draft_vocab: torch.Tensor | None = None,
) -> list[DecodeRow]:
    model = run.model
    device = next(model.parameters()).device
    rows = [DecodeRow("plain", 0)] + [DecodeRow(f"speculative L={k}", k) for k in lookaheads]
    acc_sums = {k: torch.zeros(k) for k in lookaheads}
    warm = prompts[0].to(device)  # first calls pay one-time costs (allocator, kernels): untimed
    generate_plain(model, warm, 8)
    for k in lookaheads:
        model.mtp_decoder.generate(warm, max_new_tokens=8, lookahead=k, draft_vocab=draft_vocab)
    for prompt in prompts:
        prompt = prompt.to(device)
        plain, stats = generate_plain(model, prompt, max_new_tokens)
        _add(rows[0], stats)
        for row in rows[1:]:
            out, stats = model.mtp_decoder.generate(
                prompt,
                max_new_tokens=max_new_tokens,
                lookahead=row.lookahead,
                draft_vocab=draft_vocab,
            )
            _add(row, stats)
            row.identical &= bool(torch.equal(out, plain))
            acc_sums[row.lookahead] += torch.tensor(stats["acceptance_rate_per_position"])
    for row in rows[1:]:
        row.accepted_per_position = (acc_sums[row.lookahead] / len(prompts)).tolist()
    return rows


def _add(row: DecodeRow, stats: dict) -> None:
    row.wall_s += stats["wall_time_s"]
    row.new_tokens += stats["new_tokens"]
    row.forward_calls += stats["forward_calls"]


def table(rows: list[DecodeRow]) -> str:
    plain = rows[0]
    lines = [
        "| method | tokens/s | acceptance per draft position | tokens per forward | "
        "wall-clock speed-up | greedy identical |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = " / ".join(f"{a:.2f}" for a in r.accepted_per_position) or "-"
        lines.append(
            f"| {r.method} | {r.tokens_per_s:.1f} | {acc} | {r.tokens_per_forward:.2f} | "
            f"{plain.wall_s / r.wall_s:.2f}x | {'yes' if r.identical else 'NO'} |"
        )
    return "\n".join(lines)


def best_speedup(rows: list[DecodeRow]) -> tuple[float, int]:
    """(wall-clock speed-up, lookahead) of the fastest speculative setting."""
    best = min(rows[1:], key=lambda r: r.wall_s)
    return rows[0].wall_s / best.wall_s, best.lookahead


def save_results(run: LoadedRun, rows: list[DecodeRow]) -> Path:
    """decode_benchmark.json in the run's (consolidated) folder, and decode/* scalars in its
    TensorBoard folder."""
    speedup, lookahead = best_speedup(rows)
    path = run.folder / "decode_benchmark.json"
    payload = {
        "rows": [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in rows],
        "best_speedup": speedup,
        "best_lookahead": lookahead,
    }
    path.write_text(json.dumps(payload, indent=2))
    tb_dir, step = run.metadata.get("tb_dir"), int(run.metadata.get("step") or 0)
    if tb_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(tb_dir) as writer:
            writer.add_scalar("decode/speedup", speedup, step)
            writer.add_scalar("decode/best_lookahead", lookahead, step)
            best = next(r for r in rows[1:] if r.lookahead == lookahead)
            for k, a in enumerate(best.accepted_per_position, start=1):
                writer.add_scalar(f"decode/acceptance_pos_{k}", a, step)
    return path
