"""A pretrained Hugging Face checkpoint (a local directory: ``config.json``, ``*.safetensors``,
tokenizer files) as the start of a run: ``init_from: hf:DIR``.

:func:`architecture` turns the directory's ``config.json`` into our trunk's settings (refusing
what the trunk cannot compute, by name); the recipe's ``model`` section keeps the rest (MTP
heads, ETD, ``max_seq_len``, vocabulary padding). :func:`load_pretrained` puts the weights into
a built model at any TP size (each rank keeps its slice of the master tensors) before the
pipeline split, and initialises the MTP heads as the recipe says. Needs only ``safetensors``
and JSON, not ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import torch

from mtp_megatron.config import ConfigError, ModelConfig, RopeScalingConfig
from mtp_megatron.hf.convert import trunk_from_hf
from mtp_megatron.hf.families import FAMILIES, Family

if TYPE_CHECKING:
    from mtp_megatron.model import MTPModel

PREFIX = "hf:"


def hf_directory(init_from: str) -> Path:
    """The directory of ``init_from: hf:DIR``, checked to hold a config and weights."""
    if not init_from.startswith(PREFIX):
        raise ConfigError(f"init_from={init_from!r} is invalid: write hf:DIR (a local directory)")
    folder = Path(init_from[len(PREFIX) :]).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"init_from={init_from!r}: {folder} has no config.json")
    if not list(folder.glob("*.safetensors")):
        raise ConfigError(
            f"init_from={init_from!r}: {folder} has no *.safetensors weights (convert .bin "
            "weights with transformers' save_pretrained(safe_serialization=True))"
        )
    return folder


def _refuse(folder: Path, what: str) -> NoReturn:
    raise ConfigError(f"init_from: {folder} cannot be represented by the trunk: {what}")


def architecture(folder: Path, model: ModelConfig) -> tuple[ModelConfig, Family]:
    """``model`` with the trunk settings of ``folder``'s config.json, and its family."""
    settings, family = trunk_settings(folder)
    return dataclasses.replace(model, **settings), family


def trunk_settings(folder: Path) -> tuple[dict, Family]:
    """The ModelConfig fields ``folder``'s config.json sets, and its family."""
    try:
        config = json.loads((folder / "config.json").read_text())
        return _trunk_settings(folder, config)
    except KeyError as e:
        raise ConfigError(f"init_from: {folder}/config.json lacks {e.args[0]!r}") from None
    except ValueError as e:  # bad JSON, a non-number where a number belongs
        raise ConfigError(f"init_from: {folder}/config.json cannot be read: {e}") from None


def _trunk_settings(folder: Path, config: dict) -> tuple[dict, Family]:
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        _refuse(folder, f"model_type {model_type!r} (supported: {sorted(FAMILIES)})")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScalingConfig(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        _refuse(folder, f"RoPE scaling {rope_type!r} (plain and llama3 RoPE only)")
    if rope.get("attention_factor") not in (None, 1.0):
        _refuse(folder, f"RoPE attention_factor {rope['attention_factor']}")
    partial = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(folder, f"partial_rotary_factor {partial} (RoPE over the whole head only)")
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("hidden_act", "silu") != "silu":
        _refuse(folder, f"hidden_act {config['hidden_act']!r} (SwiGLU with silu only)")
    biases = ("mlp_bias",) if family.qkv_bias else ("attention_bias", "mlp_bias")
    for flag in biases:  # (Qwen2's q/k/v biases are its family's, not a flag)
        if config.get(flag):
            _refuse(folder, f"{flag}: true (the trunk's only biases are Qwen2's on q / k / v)")
    if config.get("use_sliding_window") or (
        model_type == "exaone4" and config.get("sliding_window")
    ):
        _refuse(folder, "sliding-window attention")
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        _refuse(folder, f"layer types {sorted(layer_types)} (full attention only)")
    settings = dict(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        ffn_hidden_size=config["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        kv_channels=head_dim if head_dim != hidden // heads else None,
        norm_eps=float(config.get("rms_norm_eps", family.default_eps)),
        qk_norm=family.qk_norm,
        qkv_bias=family.qkv_bias,
        qk_norm_scope=family.qk_norm_scope,
        norm_placement=family.norm_placement,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    return settings, family


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (one file or a sharded set)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def check_checkpoint(init_from: str, model: ModelConfig | None = None) -> dict:
    """A dry run of ``init_from``: the architecture it gives (over ``model``, default the plain
    trunk without heads), its weights converted strictly, its tokenizer; a ConfigError names
    what does not fit."""
    from mtp_megatron.data.tokenizer import load_hf_tokenizer

    folder = hf_directory(init_from)
    cfg, family = architecture(folder, model or ModelConfig(mtp=None))
    master = trunk_from_hf(hf_state_dict(folder), cfg, family)
    tok = load_hf_tokenizer(folder)
    return {
        "folder": str(folder),
        "family": family.architecture,
        "model": cfg,
        "parameters": sum(t.numel() for t in master.values()),
        "tokenizer": {
            "vocab_size": tok.vocab_size,
            "eod_token": tok.eod_token,
            "eod_id": tok.eod_id,
        },
    }


def copy_last_layer_into_heads(model: MTPModel) -> int:
    """Each MTP head's transformer block (and final norm) becomes a copy of the trunk's last
    layer (and final norm); returns how many heads got one (heads without a block keep their
    initialisation). Works on any TP slice: trunk and head blocks are sharded alike."""
    if model.mtp is None:
        return 0
    trunk_layer = model.trunk.layers[-1].state_dict()
    copied = 0
    for head in model.mtp.heads:
        block = getattr(head, "block", None)
        if block is None or set(block.state_dict()) != set(trunk_layer):
            continue
        block.load_state_dict(trunk_layer)
        final_norm = getattr(head, "final_norm", None)
        if final_norm is not None:
            final_norm.load_state_dict(model.trunk.final_norm.state_dict())
        copied += 1
    return copied


def load_pretrained(model: MTPModel, init_from: str, head_init: str, log=print) -> None:
    """Load ``init_from``'s weights into the trunk of ``model`` (built from the resolved recipe,
    before the pipeline split) and initialise its MTP heads per ``head_init``."""
    from mtp_megatron.parallel import tensor_parallel_group
    from mtp_megatron.parallel.sharding import partitions, shard_state_dict

    folder = hf_directory(init_from)
    cfg = model.cfg
    settings, family = trunk_settings(folder)
    differs = {f: v for f, v in settings.items() if getattr(cfg, f) != v}
    if differs:  # the recipe resolves init_from; a model built otherwise must agree with it
        raise ConfigError(
            f"init_from: the model was not built for {folder}: "
            + ", ".join(f"{f} {getattr(cfg, f)!r} != {v!r}" for f, v in differs.items())
        )
    master = trunk_from_hf(hf_state_dict(folder), cfg, family)
    # ETD wraps its think layers' linear modules (their weight becomes ``<name>.base.weight``)
    # and adds LoRA experts and routers, which start from the recipe's initialisation
    named: dict[str, torch.Tensor] = {}
    added = []
    for name, tensor in model.state_dict().items():
        if not (torch.is_tensor(tensor) and name.startswith("trunk.")):
            continue
        plain = name.replace(".base.", ".")
        if plain in master:
            named[name] = master[plain]
        elif ".lora_" in name or "router." in name:
            added.append(name)
        else:
            raise ConfigError(f"init_from: {folder} gives no weights for {name}")
    group = tensor_parallel_group()
    tp_rank = torch.distributed.get_rank(group)
    local = shard_state_dict(named, partitions(model), tp_rank, group.size())
    model.load_state_dict(local, strict=False)
    copied = copy_last_layer_into_heads(model) if head_init == "last_layer" else 0
    log(
        f"[init] trunk from {folder} ({family.architecture}, {cfg.num_layers} layers); MTP "
        f"heads: {head_init}"
        + (f" ({copied} copied from the last layer)" if copied else "")
        + (f"; ETD's {len(added)} LoRA-expert and router tensors: initialised" if added else "")
    )
