"""``python -m mtp_megatron prepare``: the command line of ``data/prepare_indexed.py`` (tokenize
files into Megatron indexed datasets) and ``data/importers.py`` (record token data made
elsewhere)."""

from __future__ import annotations

from mtp_megatron.cli import command_parser
from mtp_megatron.config import ConfigError
from mtp_megatron.config.data import PrepareConfig
from mtp_megatron.data.importers import FLAT_DTYPES


def _parser():
    parser = command_parser(
        "prepare",
        "Tokenize files into Megatron indexed datasets (train/ and validation/), or record "
        "existing Megatron prefixes / flat token files as a dataset.",
    )
    parser.add_argument(
        "inputs", nargs="*", help="files, globs or directories to tokenize, or hf:NAME[:CONFIG]"
    )
    parser.add_argument("--output", required=True, help="the dataset directory")
    parser.add_argument("--tokenizer", help="tokenizer.json or its directory, or bpe:VOCAB")
    parser.add_argument("--eod-token", default=None, help="default: eos_token, <|endoftext|>")
    parser.add_argument("--text-field", default="text", help="text column of .jsonl / .parquet")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=float, default=64.0, help="input grouped per shard")
    parser.add_argument("--max-files", type=int, default=None, help="only the first N files")
    parser.add_argument("--max-bytes", type=int, default=None, help="only about N bytes")
    imports = parser.add_argument_group("importing token data made elsewhere (not copied)")
    imports.add_argument("--from-megatron", nargs="+", metavar="PREFIX", help=".bin/.idx prefixes")
    imports.add_argument("--from-numpy", nargs="+", metavar="GLOB", help="flat token files")
    imports.add_argument("--dtype", choices=list(FLAT_DTYPES), help="--from-numpy ids")
    imports.add_argument("--eod", type=int, help="end-of-document id (--from-numpy: required)")
    imports.add_argument(
        "--validation",
        nargs="+",
        metavar="PREFIX_OR_GLOB",
        default=[],
        help="the validation split's prefixes / files (same kind)",
    )
    return parser


def _import(args) -> int:
    from mtp_megatron.data.importers import import_data

    if args.from_megatron and args.from_numpy:
        raise ConfigError("prepare: --from-megatron and --from-numpy are separate datasets")
    if args.inputs or args.tokenizer:
        raise ConfigError("prepare: an import takes no text inputs or --tokenizer")
    given = {"train": args.from_megatron or args.from_numpy}
    if args.validation:
        given["validation"] = args.validation
    kind = "megatron" if args.from_megatron else "numpy"
    manifest = import_data(args.output, **{kind: given}, dtype=args.dtype, eod=args.eod)
    totals = manifest["totals"]
    print(
        f"prepare: imported {len(manifest['shards'])} {kind} file(s), "
        f"{totals['documents']['train']:,} train / {totals['documents']['validation']:,} "
        f"validation documents, {sum(totals['tokens'].values()):,} tokens, largest id "
        f"{manifest['max_token_id']}; fingerprint {manifest['fingerprint'][:16]}"
    )
    return 0


def main_prepare(argv: list[str]) -> int:
    """Tokenize files into Megatron indexed datasets, or record token data made elsewhere."""
    args = _parser().parse_args(argv)
    if args.from_megatron or args.from_numpy:
        return _import(args)
    if not args.tokenizer:
        raise ConfigError("prepare: --tokenizer is required to tokenize text inputs")
    from mtp_megatron.data.prepare_indexed import prepare

    prepare(
        PrepareConfig(
            inputs=args.inputs,
            tokenizer=args.tokenizer,
            output=args.output,
            eod_token=args.eod_token,
            text_field=args.text_field,
            validation_fraction=args.validation_fraction,
            split_seed=args.split_seed,
            workers=args.workers,
            shard_mb=args.shard_mb,
            max_files=args.max_files,
            max_bytes=args.max_bytes,
        )
    )
    return 0
