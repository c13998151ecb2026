"""Decode benchmark: plain KV-cached decoding vs self-speculative decoding at lookahead 1..K.

Held-out prompts come from the run's validation split. For each prompt every method runs in
turn (interleaved, so machine noise hits all of them alike); greedy outputs are compared token
for token with plain decoding. Wall-clock speed-up = plain time / speculative time, summed over
the prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mtp_megatron.bench.decode_peers import TransformersPeer
from mtp_megatron.config import ConfigError
from mtp_megatron.decoding.calibrate import calibrate
from mtp_megatron.decoding.load import LoadedRun
from mtp_megatron.decoding.plain import generate_plain


@dataclass
class DecodeRow:
    """One method's totals over all prompts at one batch size."""

    method: str
    """'plain', 'speculative L=k' or one of transformers' (``decode_peers.py``)."""
    lookahead: int
    """Drafts per round (0 for plain decoding and transformers' rows)."""
    batch: int = 1
    """Prompts decoded together."""
    peer: bool = False
    """transformers' ``generate`` on the same weights (not our decoding)."""
    auto: bool = False
    """Our ``lookahead="auto"``: ``lookahead`` is what calibrating chose (0: plain)."""
    calibration_s: float = 0.0
    """Wall time of the calibration (``auto`` rows; not in ``wall_s``)."""
    wall_s: float = 0.0
    """Summed wall time."""
    new_tokens: int = 0
    """Tokens generated."""
    forward_calls: int = 0
    """Trunk forwards (prefill included)."""
    rounds: int = 0
    """Speculative rounds (draft, then verify)."""
    draft_s: float = 0.0
    """Wall time spent drafting (speculative rows, CPU)."""
    verify_s: float = 0.0
    """Wall time of the verification forwards (speculative rows, CPU)."""
    accepted_per_position: list[float] = field(default_factory=list)
    """Acceptance rate of draft position 1..L (mean over prompts)."""
    identical: bool = True
    """Greedy output equal to our plain decoding's at the same batch size on every prompt."""

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Per row: a batch's forward advances every row."""
        return self.new_tokens / max(self.forward_calls * self.batch, 1)

    @property
    def theory_tokens_per_forward(self) -> float | None:
        """(1 - a^(L+1)) / (1 - a), a the first draft's acceptance: the tokens per round if
        every draft were accepted independently with that rate (Leviathan et al.)."""
        if not self.accepted_per_position:
            return None
        a, L = self.accepted_per_position[0], self.lookahead
        return L + 1.0 if a >= 1.0 else (1 - a ** (L + 1)) / (1 - a)


@dataclass
class _Method:
    row: DecodeRow
    generate: Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]
    """(prompts [b, T], max_new_tokens) -> (tokens [b, T + max_new_tokens], stats)."""


def _methods(
    run: LoadedRun,
    batch: int,
    lookaheads: list[int],
    draft_vocab: torch.Tensor | None,
    peer: TransformersPeer | None,
    calibration: list[torch.Tensor] | None,
) -> list[_Method]:
    """Every row at one batch size, ours first (our plain decoding is the first)."""
    model = run.model
    methods = [_Method(DecodeRow("plain", 0, batch), lambda x, n: generate_plain(model, x, n))]
    chosen: list[int | str] = list(lookaheads)
    if calibration:  # whole batches of the calibration prompts, cycled
        need = batch * -(-len(calibration) // batch)
        cycled = [calibration[i % len(calibration)] for i in range(need)]
        groups = [torch.cat(cycled[i : i + batch]) for i in range(0, need, batch)]
        found = calibrate(model.mtp_decoder, groups, draft_vocab=draft_vocab)
        auto = DecodeRow(f"speculative auto (L={found.lookahead})", found.lookahead, batch)
        auto.auto, auto.calibration_s = True, found.seconds
        chosen.append("auto")
    for k in chosen:
        row = auto if k == "auto" else DecodeRow(f"speculative L={k}", int(k), batch)
        methods.append(_Method(row, _speculative(model, k, draft_vocab)))
    if peer is not None:
        for m in peer.methods:
            if batch == 1 or not m.batch_one_only:
                row = DecodeRow(m.name, 0, batch, peer=True)
                methods.append(_Method(row, _peer(peer, m)))
    return methods


Generate = Callable[[torch.Tensor, int], tuple[torch.Tensor, dict]]


def _speculative(model, lookahead: int | str, draft_vocab: torch.Tensor | None) -> Generate:
    def generate(x: torch.Tensor, n: int) -> tuple[torch.Tensor, dict]:
        return model.mtp_decoder.generate(
            x, max_new_tokens=n, lookahead=lookahead, draft_vocab=draft_vocab
        )

    return generate


def _peer(peer: TransformersPeer, method) -> Generate:
    return lambda x, n: peer.generate(method, x, n)


def run_decode_benchmark(
    run: LoadedRun,
    prompts: list[torch.Tensor],
    max_new_tokens: int,
    lookaheads: list[int],
    draft_vocab: torch.Tensor | None = None,
    batch_sizes: tuple[int, ...] = (1,),
    peer: TransformersPeer | None = None,
    calibration: list[torch.Tensor] | None = None,
    log=print,
) -> list[DecodeRow]:
    """Every method on every prompt, at each batch size (consecutive prompts of equal length
    form a batch; a last incomplete one is left out), the methods interleaved per batch.
    ``calibration``: other prompts, on which ``lookahead="auto"`` picks its L per batch size
    (a row of its own)."""
    device = next(run.model.parameters()).device
    rows: list[DecodeRow] = []
    for b in batch_sizes:
        groups = [torch.cat(prompts[i : i + b]) for i in range(0, len(prompts) - b + 1, b)]
        if not groups:
            log(f"batch {b}: skipped, only {len(prompts)} prompts")
            continue
        methods = _methods(run, b, lookaheads, draft_vocab, peer, calibration)
        warm = groups[0].to(device)  # first calls pay one-time costs (allocator, kernels)
        for m in methods:
            m.generate(warm, 8)
        acc_sums = {id(m): torch.zeros(m.row.lookahead) for m in methods}
        for group in groups:
            group = group.to(device)
            reference = None
            for m in methods:
                out, stats = m.generate(group, max_new_tokens)
                _add(m.row, stats)
                if reference is None:
                    reference = out
                m.row.identical &= bool(torch.equal(out.to(reference.device), reference))
                if m.row.lookahead:
                    acc_sums[id(m)] += torch.tensor(stats["acceptance_rate_per_position"])
        for m in methods:
            if m.row.lookahead:
                m.row.accepted_per_position = (acc_sums[id(m)] / len(groups)).tolist()
            rows.append(m.row)
    return rows


def _add(row: DecodeRow, stats: dict) -> None:
    row.wall_s += stats["wall_time_s"]
    row.new_tokens += stats["new_tokens"]
    row.forward_calls += stats["forward_calls"]
    row.rounds += stats.get("rounds", 0)
    row.draft_s += stats.get("draft_time_s", 0.0)
    row.verify_s += stats.get("verify_time_s", 0.0)


def _baseline(rows: list[DecodeRow], row: DecodeRow, peer: bool) -> DecodeRow | None:
    """Our plain row (peer False) or transformers' plain generate (True) at row's batch."""
    for r in rows:
        if r.batch == row.batch and r.peer == peer and r.lookahead == 0 and not r.auto:
            return r
    return None


def _ratio(base: DecodeRow | None, row: DecodeRow) -> str:
    return f"{base.wall_s / row.wall_s:.2f}x" if base is not None and row.wall_s else "-"


def table(rows: list[DecodeRow]) -> str:
    """Markdown: speed, acceptance and speed-up over our plain decoding and over transformers'
    plain ``generate`` at the same batch size."""
    lines = [
        "| method | batch | tokens/s | acceptance per draft position | tokens per forward "
        "(theory) | vs our plain | vs transformers generate | greedy identical |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acc = " / ".join(f"{a:.2f}" for a in r.accepted_per_position) or "-"
        theory = r.theory_tokens_per_forward
        tpf = f"{r.tokens_per_forward:.2f}" + (f" ({theory:.2f})" if theory else "")
        lines.append(
            f"| {r.method} | {r.batch} | {r.tokens_per_s:.1f} | {acc} | {tpf} | "
            f"{_ratio(_baseline(rows, r, False), r)} | {_ratio(_baseline(rows, r, True), r)} | "
            f"{'yes' if r.identical else 'NO'} |"
        )
    return "\n".join(lines)


def cost_table(rows: list[DecodeRow]) -> str:
    """Markdown: what a speculative round costs, in units of our plain one-token trunk step
    (the CPU's figures: on a GPU the phases overlap and are not timed apart)."""
    lines = [
        "| method | batch | draft step / trunk step | verify of L+1 tokens / trunk step |",
        "|---|---|---|---|",
    ]
    for r in rows:
        plain = _baseline(rows, r, False)
        if not r.lookahead or not r.rounds or plain is None or not plain.forward_calls:
            continue
        step = plain.wall_s / plain.forward_calls
        draft = r.draft_s / (r.rounds * r.lookahead) / step
        lines.append(
            f"| {r.method} | {r.batch} | {draft:.2f} | {r.verify_s / r.rounds / step:.2f} |"
        )
    return "\n".join(lines)


def best_speedup(
    rows: list[DecodeRow], peer: bool = False, batch: int | None = None
) -> tuple[float, int]:
    """(wall-clock speed-up, lookahead) of the fastest speculative setting at ``batch`` (default:
    the smallest measured) over our plain decoding (``peer``: over transformers' plain
    ``generate``)."""
    batch = min(r.batch for r in rows) if batch is None else batch
    spec = [r for r in rows if r.batch == batch and (r.lookahead or r.auto)]
    best = min(spec, key=lambda r: r.wall_s)
    base = _baseline(rows, best, peer)
    assert base is not None, "every batch size has its plain row"
    return base.wall_s / best.wall_s, best.lookahead


def peer_speedups(rows: list[DecodeRow]) -> dict[int, tuple[float, int]]:
    """Per batch size with a transformers row: (best speed-up over its plain generate, L)."""
    batches = sorted({r.batch for r in rows if r.peer and r.lookahead == 0})
    return {b: best_speedup(rows, peer=True, batch=b) for b in batches}


def save_results(run: LoadedRun, rows: list[DecodeRow]) -> Path:
    """decode_benchmark.json in the run's (consolidated) folder, and decode/* scalars in its
    TensorBoard folder."""
    speedup, lookahead = best_speedup(rows)
    peers = peer_speedups(rows)
    path = run.folder / "decode_benchmark.json"
    payload = {
        "rows": [
            asdict(r) | {"tokens_per_s": r.tokens_per_s, "tokens_per_forward": r.tokens_per_forward}
            for r in rows
        ],
        "best_speedup": speedup,
        "best_lookahead": lookahead,
        "speedup_vs_transformers": {
            str(b): {"speedup": s, "lookahead": k} for b, (s, k) in peers.items()
        },
    }
    path.write_text(json.dumps(payload, indent=2))
    tb_dir, step = run.metadata.get("tb_dir"), int(run.metadata.get("step") or 0)
    if tb_dir:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(tb_dir) as writer:
            writer.add_scalar("decode/speedup", speedup, step)
            writer.add_scalar("decode/best_lookahead", lookahead, step)
            for b, (s, _) in peers.items():
                writer.add_scalar(f"decode/speedup_vs_transformers_batch{b}", s, step)
            first = min(r.batch for r in rows)
            best = next(r for r in rows if r.batch == first and r.lookahead == lookahead)
            for k, a in enumerate(best.accepted_per_position, start=1):
                writer.add_scalar(f"decode/acceptance_pos_{k}", a, step)
    return path


def transformers_peer(run: LoadedRun, dtype: str) -> TransformersPeer | None:
    """transformers' model on the run's weights, or None (said why) when it cannot be built."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: no peer rows (pip install -e '.[dev]')")
        return None
    precision = torch.bfloat16 if dtype == "bf16" else torch.float32
    try:
        return TransformersPeer(run.folder, precision, next(run.model.parameters()).device)
    except ConfigError as e:  # e.g. a trunk with no Hugging Face twin (ETD)
        print(f"no transformers rows: this run cannot be exported ({e})")
        return None


@dataclass(kw_only=True)
class BenchDecodeOptions:
    """What ``bench-decode`` measures (its command-line options)."""

    prompts: int = 8
    """Held-out prompts (consecutive ones form a batch)."""
    prompt_len: int = 32
    """Tokens per prompt."""
    max_new_tokens: int = 64
    """New tokens per prompt."""
    threads: int = 1
    """torch intra-op threads (batch-1 decoding is a chain of tiny matmuls: more only sync)."""
    draft_vocab_size: int = 0
    """The heads draft only the N most frequent training tokens (0: all; same output)."""
    dtype: str = "fp32"
    """'fp32' or 'bf16'."""
    batch_sizes: tuple[int, ...] | None = None
    """Default: 1, 4 and 8 as far as the prompts allow."""
    peers: bool = True
    """Rows of transformers' generate on the same weights."""
    prompts_from: str | None = None
    """Take the prompts from this text or code directory instead of the validation split."""
    lookaheads: tuple[int, ...] | None = None
    """Default 1..K (past K only for one shared chained head, drafting by recursion)."""

    def checked_batch_sizes(self) -> tuple[int, ...]:
        sizes = self.batch_sizes
        if sizes is None:  # the default: 1, 4 and 8, as far as the prompts allow
            sizes = tuple(b for b in (1, 4, 8) if b <= max(self.prompts, 1))
        if not sizes or min(sizes) < 1 or max(sizes) > self.prompts:
            raise ConfigError(
                f"--batch-sizes {','.join(map(str, sizes))} is invalid: each between 1 and "
                f"--prompts ({self.prompts})"
            )
        return sizes

    def checked_lookaheads(self, k: int, recursive: bool) -> tuple[int, ...]:
        found = self.lookaheads or tuple(range(1, k + 1))
        if min(found) < 1 or (max(found) > k and not recursive):
            raise ConfigError(
                f"--lookaheads {','.join(map(str, found))} is invalid: each between 1 and K={k}"
                " (only one chained head shared by every step, or K=1, drafts further)"
            )
        return found


def run_bench_decode(consolidated_folder: Path, options: BenchDecodeOptions) -> Path:
    """Every decoding method on held-out prompts of a consolidated run: the tables printed, the
    results saved (returns ``decode_benchmark.json``'s path)."""
    from mtp_megatron.bench.decode_inputs import benchmark_inputs, directory_prompts
    from mtp_megatron.decoding.load import load_run

    o = options
    batch_sizes = o.checked_batch_sizes()
    torch.set_num_threads(o.threads)
    run = load_run(consolidated_folder, dtype=o.dtype)
    held_out, calibration, vocab = benchmark_inputs(
        run, o.prompts, o.prompt_len, o.draft_vocab_size
    )
    source = "held-out validation prompts"
    if o.prompts_from:
        held_out = directory_prompts(o.prompts_from, run.tokenizer_path, o.prompts, o.prompt_len)
        source = f"prompts from {o.prompts_from}"
    peer = transformers_peer(run, o.dtype) if o.peers else None
    mtp = run.model_config.mtp
    if mtp is None:
        raise ConfigError(f"{consolidated_folder} has no MTP heads: nothing to draft with")
    lookaheads = o.checked_lookaheads(mtp.num_predict_tokens, mtp.recursive_drafts)
    rows = run_decode_benchmark(
        run, held_out, o.max_new_tokens, list(lookaheads), vocab, batch_sizes, peer, calibration
    )
    _print_report(run, rows, o, len(calibration), source, peer, vocab)
    return save_results(run, rows)


def _print_report(run, rows, o: BenchDecodeOptions, calibrated, source, peer, vocab) -> None:
    device = next(run.model.parameters()).device
    where = "GPU" if device.type == "cuda" else f"{o.threads} CPU thread(s)"
    print(table(rows))
    for r in rows:
        if r.auto:
            print(
                f"batch {r.batch}: lookahead='auto' chose L={r.lookahead} (0: plain) after "
                f"{r.calibration_s:.1f} s calibrating on {calibrated} other validation "
                "prompts (one-time, not in the row's time)"
            )
    print("\nCost of a speculative round, in our one-token trunk steps (CPU wall time):")
    print(cost_table(rows))
    speedup, lookahead = best_speedup(rows)
    drafts = "all tokens" if vocab is None else f"the {len(vocab)} most frequent"
    batch = min(r.batch for r in rows)
    print(
        f"\nself-speculative decoding: {speedup:.2f}x wall-clock speed-up over our plain "
        f"KV-cached decoding at lookahead {lookahead} ({o.prompts} {source} of {o.prompt_len} "
        f"tokens, {o.max_new_tokens} new tokens each, greedy, batch {batch}, {o.dtype}, "
        f"{where}, drafts from {drafts})"
    )
    for b, (s, la) in peer_speedups(rows).items():
        print(
            f"  batch {b}: {s:.2f}x over transformers' plain generate ({peer.family}, the same "
            f"weights) at lookahead {la}"
        )
