"""``import-hf`` (check that a Hugging Face checkpoint can start a run) and ``export-hf`` (a run
as a Hugging Face checkpoint, ``hf/export.py``)."""

from __future__ import annotations

from mtp_megatron.cli import command_parser


def main_export_hf(argv: list[str]) -> int:
    """Write a run as a Hugging Face checkpoint (transformers' twin class: Exaone4, Qwen3,
    Llama, Qwen2 or OLMo-2, with its chained MTP heads) that AutoModelForCausalLM loads with the
    same logits."""
    p = command_parser("export-hf", main_export_hf.__doc__)
    p.add_argument("checkpoint", help="run dir, checkpoints/ or step folder, or consolidated")
    p.add_argument("out", help="the Hugging Face directory to write (must not exist)")
    args = p.parse_args(argv)
    from mtp_megatron.hf.export import export_hf
    from mtp_megatron.train.consolidate import consolidated_folder

    export_hf(consolidated_folder(args.checkpoint), args.out)
    return 0


def main_import_hf(argv: list[str]) -> int:
    """Check that a Hugging Face checkpoint directory can start a run (init_from: hf:DIR): the
    trunk it gives, its weights loaded strictly, its tokenizer; nothing is written."""
    p = command_parser("import-hf", main_import_hf.__doc__)
    p.add_argument("directory", help="a local Hugging Face checkpoint (config.json, safetensors)")
    args = p.parse_args(argv)
    from mtp_megatron.hf.importer import check_checkpoint

    found = check_checkpoint(f"hf:{args.directory}")
    cfg, tok = found["model"], found["tokenizer"]
    print(
        f"{found['folder']}: {found['family']}, {cfg.num_layers} layers, h {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads of {cfg.head_dim} ({cfg.kv_heads} kv), SwiGLU "
        f"{cfg.ffn_size}, {cfg.norm_placement}-norm, QK-norm "
        f"{cfg.qk_norm_scope if cfg.qk_norm else 'none'}, vocabulary {cfg.vocab_size}, "
        f"{'tied' if cfg.tie_embeddings else 'untied'}; {found['parameters'] / 1e6:.1f}M trunk "
        f"parameters, every tensor used; tokenizer vocabulary {tok['vocab_size']}, end of "
        f"document {tok['eod_token']!r} = {tok['eod_id']}"
    )
    print(f"start a run from it with: init_from=hf:{found['folder']}")
    return 0
