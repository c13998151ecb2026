"""``python -m mtp_megatron export-hf RUN OUT``: a run's trunk as a Hugging Face checkpoint.

OUT gets what ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer`` read:
``config.json`` (the twin family of ``families.py``), ``model.safetensors`` (the vocabulary
padding dropped), ``tokenizer.json`` and ``tokenizer_config.json`` (the run's end-of-document
token as ``eos_token``). Chained MTP heads of the types in ``convert.EXPORTABLE_HEADS`` go into
the same file in DeepSeek-V3's layout (``model.layers.{L+k}``) with ``num_mtp_layers`` in the
config, which transformers' ``MtpModel`` reads for ``generate(use_mtp=True)`` once the class
lists those keys as MTP layers (``mtp_key_patterns``: transformers' Exaone4 / Qwen3 / Llama /
Qwen2 / OLMo-2 classes register none); other heads
(independent, 'linear') go beside it, in our names, into ``mtp_heads.safetensors``, described
by ``mtp_heads.json`` (what they compute, and why transformers cannot draft with them).
Everything is written into a temporary directory renamed into place, so OUT is complete or
absent.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from mtp_megatron import consolidated
from mtp_megatron.config import ConfigError
from mtp_megatron.hf.convert import heads_exportable, heads_to_hf, hf_config, trunk_to_hf
from mtp_megatron.hf.families import family_of

DEFAULT_EOD = "<|endoftext|>"


def _eos_token(recipe: dict, tokenizer_file: Path) -> tuple[str | None, int | None]:
    """The run's end-of-document token and its id, found as the data pipeline finds it (the
    recipe's eod_token, else the tokenizer directory's eos_token when that directory is still
    here, else <|endoftext|>); (None, None) when the tokenizer has none of them."""
    from tokenizers import Tokenizer

    from mtp_megatron.data.tokenizer import load_hf_tokenizer

    data = recipe.get("data") or {}
    source = data.get("tokenizer")
    if source and Path(source).is_dir():
        try:
            tok = load_hf_tokenizer(source, data.get("eod_token"))
            return tok.eod_token, tok.eod_id
        except ConfigError:
            pass  # fall back to the run's own copy
    own = Tokenizer.from_file(str(tokenizer_file))
    token = data.get("eod_token") or DEFAULT_EOD
    token_id = own.token_to_id(token)
    return (token, token_id) if token_id is not None else (None, None)


HEADS_FILE = "mtp_heads.safetensors"
"""Heads transformers cannot run (independent, 'linear'): our tensors, described in
``mtp_heads.json``."""


def _save_heads_beside(out: Path, master: dict, cfg, why_not: str) -> None:
    from safetensors.torch import save_file

    heads = {k: v.contiguous() for k, v in master.items() if k.startswith("mtp.")}
    save_file(heads, str(out / HEADS_FILE), metadata={"format": "pt"})
    mtp = cfg.mtp
    about = {
        "file": HEADS_FILE,
        "names": "mtp-megatron's (mtp.heads.<i>.*): load them with mtp_megatron",
        "num_predict_tokens": mtp.num_predict_tokens,
        "head_type": mtp.mtp_head_type,
        "head_arrangement": mtp.head_arrangement,
        "share_weights_across_steps": mtp.share_weights_across_steps,
        "computes": (
            "step k: logits_k = lm_head(final_norm_k(block_k(z))), z the trunk's last hidden "
            "state before model.norm"
            if mtp.head_arrangement == "independent"
            else "step k: logits_k = lm_head(final_norm_k(block_k(eh_proj([enorm(e_{i+k}); "
            "hnorm(h^{k-1})]))))"
        ),
        "transformers": f"cannot draft with these heads: {why_not}",
    }
    (out / "mtp_heads.json").write_text(json.dumps(about, indent=1) + "\n")


def mtp_key_patterns(out: str | Path) -> list[str]:
    """What the exported model's class must list in ``_keys_to_ignore_on_load_unexpected`` for
    transformers' ``MtpModel`` to find the MTP layers (one regex per layer ``L + k``)."""
    config = json.loads((Path(out) / "config.json").read_text())
    layers, k = config["num_hidden_layers"], config.get("num_mtp_layers") or 0
    return [rf"model\.layers\.{layers + i}\." for i in range(k)]


def export_hf(folder: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Write the Hugging Face checkpoint of the consolidated model in ``folder`` (a finished
    run's directory, or what ``consolidate`` wrote) to ``out``; returns ``out``."""
    from safetensors.torch import save_file

    out, folder = Path(out).resolve(), Path(folder).resolve()
    if out.exists():
        raise ConfigError(f"{out} exists; export into a new directory (nothing is overwritten)")
    if not consolidated.is_consolidated(folder):
        raise ConfigError(
            f"{folder} holds no consolidated model; `python -m mtp_megatron consolidate` it first"
        )
    cfg = consolidated.read_model_config(folder)
    family = family_of(cfg)
    master, metadata = consolidated.load_weights(folder)
    bad = consolidated.non_finite_tensors(master)
    if bad:
        raise ConfigError(f"{folder} holds non-finite weights ({bad[:3]}); export another step")
    recipe = consolidated.read_recipe(folder)
    eos, eos_id = _eos_token(recipe, folder / consolidated.TOKENIZER_FILE)
    dtype = str(master["trunk.embedding.weight"].dtype).removeprefix("torch.")
    tmp = out.parent / f".{out.name}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf_config(cfg, family, eos_id, dtype).save_pretrained(tmp)
        tensors = trunk_to_hf(master, cfg, family)
        why_not = heads_exportable(cfg)
        if why_not is None:
            tensors.update(heads_to_hf(master, cfg, family))
        elif cfg.mtp is not None:  # beside the trunk, in our names, with what they are
            _save_heads_beside(tmp, master, cfg, why_not)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copyfile(folder / consolidated.TOKENIZER_FILE, tmp / "tokenizer.json")
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.max_seq_len,
            **({"eos_token": eos} if eos else {}),
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if why_not is None and cfg.mtp is not None:
        note = (
            f", {cfg.mtp.num_predict_tokens} MTP layers (generate(use_mtp=True) drafts with them)"
        )
    elif cfg.mtp is not None:
        note = f"; MTP heads in {HEADS_FILE}, which transformers cannot draft with: {why_not}"
    else:
        note = ""
    log(
        f"[export-hf] {folder} (step {metadata.get('step', '?')}) -> {out}: "
        f"{family.architecture}, {cfg.num_layers} layers, vocabulary {cfg.vocab_size}{note}"
    )
    return out
