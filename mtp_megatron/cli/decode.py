"""``generate`` (decode from a trained run) and ``bench-decode`` (every decoding method on held-out
prompts, ``bench/decode.py``). Both read a run's consolidated weights, consolidating its newest
checkpoint first when they are missing or older (``train/consolidate.py``)."""

from __future__ import annotations

import sys

from mtp_megatron.cli import command_parser
from mtp_megatron.config import ConfigError


def _int_list(value: str) -> list[int]:
    return [int(x) for x in value.split(",")]


def main_bench_decode(argv: list[str]) -> int:
    """Plain vs speculative decoding (lookahead 1..K) on held-out prompts of a trained run."""
    from mtp_megatron.bench.decode import BenchDecodeOptions, run_bench_decode
    from mtp_megatron.decoding.load import DTYPES
    from mtp_megatron.train.consolidate import consolidated_folder

    p = command_parser("bench-decode", main_bench_decode.__doc__)
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ or step folder")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16: faster on GPU")
    p.add_argument(
        "--draft-vocab",
        type=int,
        default=0,
        help="heads draft only the N most frequent training tokens (0: all; same output)",
    )
    p.add_argument(
        "--batch-sizes",
        type=_int_list,
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
        type=_int_list,
        default=None,
        help="comma-separated lookaheads to measure (default 1..K; past K only for one shared "
        "chained head, drafting by recursion)",
    )
    p.add_argument(
        "--no-transformers",
        action="store_true",
        help="leave out the rows of transformers' generate on the same weights",
    )
    args = p.parse_args(argv)
    options = BenchDecodeOptions(
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        max_new_tokens=args.max_new_tokens,
        threads=args.threads,
        draft_vocab_size=args.draft_vocab,
        dtype=args.dtype,
        batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else None,
        peers=not args.no_transformers,
        prompts_from=args.prompts_from,
        lookaheads=tuple(args.lookaheads) if args.lookaheads else None,
    )
    options.checked_batch_sizes()  # before the model loads (seconds)
    path = run_bench_decode(consolidated_folder(args.checkpoint), options)
    print(f"results: {path}")
    return 0


def main_generate(argv: list[str]) -> int:
    """Generate from a trained run with self-speculative decoding (or plain, --plain)."""
    from mtp_megatron.decoding.load import DTYPES

    p = command_parser("generate", main_generate.__doc__)
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
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="bf16: faster on GPU")
    args = p.parse_args(argv)
    from mtp_megatron.decoding import SamplingConfig

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
    return _generate(args)


def _generate(args) -> int:
    import torch

    from mtp_megatron.data import load_tokenizer
    from mtp_megatron.decoding import SamplingConfig, generate_plain
    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.train.consolidate import consolidated_folder

    run = load_run(consolidated_folder(args.checkpoint), dtype=args.dtype)
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
