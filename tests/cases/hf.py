"""Tiny random models for the Hugging Face tests: checkpoints of the trunk's twin families made
with transformers' own classes (``from_config``), and consolidated runs of ours to export."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from mtp_megatron import consolidated
from mtp_megatron.config import ModelConfig, MTPConfig
from mtp_megatron.model import build_model
from tests.cases.indexed import tokenizer_dir

FAMILY_SWITCHES = {  # (norm_placement, qk_norm, qkv_bias, qk_norm_scope)
    "exaone4": ("post", True, False, "head"),
    "qwen3": ("pre", True, False, "head"),
    "llama": ("pre", False, False, "head"),
    "qwen2": ("pre", False, True, "head"),
    "olmo2": ("post", True, False, "full"),
}
"""The trunk settings that make each Hugging Face family's twin."""

HF_VOCAB = 512
"""The checkpoints' vocabulary: holds the 400-token test tokenizer, a multiple of 128 (no
padding rows, so our loss is the checkpoint's own)."""


def hf_checkpoint(
    root: Path, family: str, tied: bool = False, layers: int = 2, suffix: str = "", **config
) -> Path:
    """A saved ``{family}`` model (h 64, 4 heads of 16, 2 kv heads, random weights and norms;
    ``config`` overrides) with the test tokenizer (end token ``</s>``) beside it."""
    import transformers

    common = dict(
        vocab_size=HF_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5e5},
        tie_word_embeddings=tied,
    )
    common.update(config)
    full = ["full_attention"] * layers
    if family == "exaone4":
        config = transformers.Exaone4Config(**common, sliding_window=None, layer_types=full)
    elif family == "qwen3":
        config = transformers.Qwen3Config(**common, layer_types=full)
    elif family == "olmo2":
        config = transformers.Olmo2Config(**common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common, layer_types=full)
    else:
        config = transformers.LlamaConfig(**common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # a swapped norm would show
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)  # so would a dropped bias
    folder = root / f"hf-{family}-{'tied' if tied else 'untied'}{suffix}"
    model.save_pretrained(folder)
    tok_root = root / f".tok-{folder.name}"
    tok_root.mkdir()
    tok = tokenizer_dir(tok_root, "</s>")
    (folder / "tokenizer.json").write_bytes((tok / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return folder


def twin_config(family: str, tied: bool = False, mtp: MTPConfig | None = None) -> ModelConfig:
    """A tiny trunk (vocabulary 400, the test tokenizer's) that is ``family``'s twin."""
    placement, qk_norm, qkv_bias, scope = FAMILY_SWITCHES[family]
    return ModelConfig(
        vocab_size=400,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_kv_heads=2,
        max_seq_len=32,
        norm_placement=placement,
        qk_norm=qk_norm,
        qkv_bias=qkv_bias,
        qk_norm_scope=scope,
        tie_embeddings=tied,
        rope_theta=5e5,
        mtp=mtp,
    )


def consolidated_run(tmp_path: Path, cfg: ModelConfig) -> tuple[Path, torch.nn.Module]:
    """A consolidated folder of a randomly initialised model (norm weights and biases randomised
    too, so a swapped norm or a dropped bias would show)."""
    torch.manual_seed(0)
    model = build_model(cfg, backend="local").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    folder = tmp_path / "run"
    tensors = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    consolidated.save_weights(folder, tensors, {"step": "7"})
    recipe = {"model": asdict(cfg), "data": {"eod_token": "</s>"}}
    (folder / consolidated.RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    tok = tokenizer_dir(tmp_path, "</s>") / "tokenizer.json"
    (folder / consolidated.TOKENIZER_FILE).write_bytes(tok.read_bytes())
    return folder, model
