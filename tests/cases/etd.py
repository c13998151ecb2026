"""ETD configs, models and inputs shared by the ETD tests of both tiers."""

import zlib
from pathlib import Path

import torch

from mtp_megatron import ETDConfig, build_model
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config

REPO = Path(__file__).resolve().parents[2]


MTP = mtp_config("transformer", True, "chained", k=3)


def etd_config(**overrides) -> ETDConfig:
    """1 / 2 x k / 1 on the 4-layer tiny model; router and experts off unless asked."""
    base = dict(
        n_encoder_layers=1,
        n_think_layers=2,
        n_decoder_layers=1,
        max_think_iterations=3,
        use_layer_router=False,
        use_lora_experts=False,
        num_lora_experts=3,
        lora_rank=4,
    )
    base.update(overrides)
    return ETDConfig(**base)


def etd_model_config(etd, mtp=MTP, **overrides):
    return tiny_model_config(mtp, num_layers=4, max_seq_len=64, etd=etd, **overrides)


def set_from_master(param: torch.nn.Parameter, master: torch.Tensor, group) -> None:
    """Write this rank's slice of ``master`` (the TP=1 layout) into ``param``."""
    tp = torch.distributed.get_world_size(group)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        dim, stride = param.partition_dim, param.partition_stride
        rank = torch.distributed.get_rank(group)
        master = torch.cat(master.chunk(tp * stride, dim=dim)[rank::tp], dim=dim)
    param.data.copy_(master)


def activate_etd_parts(model, seed: int = 7) -> None:
    """Make the ETD parts matter (the same at every TP size): random LoRA B (it starts at 0),
    routers sharp enough that tokens spread over experts and about half of them halt."""
    from mtp_megatron.parallel import tensor_parallel_group

    group = tensor_parallel_group()
    tp = torch.distributed.get_world_size(group)
    for name, p in model.named_parameters():
        if "lora_b" in name or "router" in name:
            shape = list(p.shape)
            if tp > 1 and getattr(p, "tensor_model_parallel", False):
                shape[p.partition_dim] *= tp
            g = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
            std = 0.05 if "lora_b" in name else 0.25
            master = torch.randn(shape, generator=g) * std
            if name.endswith("halt_router.bias"):
                master = torch.zeros(1)
            with torch.no_grad():
                set_from_master(p, master, group)


def etd_model(etd, seed=0, activate=True, mtp=MTP, **overrides):
    torch.manual_seed(seed)
    model = build_model(etd_model_config(etd, mtp, **overrides))
    randomize_norm_weights(model)
    if activate:
        activate_etd_parts(model)
    return model


def token_ids(b, s, seed, vocab=200):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))
