"""Layer backends: megatron's TP layers and the local (plain torch) ones build one model."""

from __future__ import annotations

import pytest
import torch

from mtp_megatron import build_model
from mtp_megatron.config import ConfigError
from mtp_megatron.decoding import generate_plain
from mtp_megatron.model.specs import LayerContext, LocalLinear
from mtp_megatron.parallel.sharding import partitions
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import (
    mtp_config,
    randomize_norm_weights,
    tiny_model_config,
    valid_combinations,
)
from tests.cases.etd import etd_config

ETD = etd_config(max_think_iterations=2, use_layer_router=True, use_lora_experts=True)
CONFIGS = {
    "post": dict(mtp=mtp_config("transformer", True, "chained")),
    "pre-gqa-linear": dict(
        mtp=mtp_config("linear", False, "independent"), norm_placement="pre", num_kv_heads=2
    ),
    "tied-no-qk-norm": dict(mtp=mtp_config("mlp", True, "chained"), tie_embeddings=True),
    "ntp-no-qk-norm": dict(mtp=None, qk_norm=False),
    "etd-lora-router": dict(mtp=mtp_config("transformer", True, "chained"), num_layers=4, etd=ETD),
}


def _pair(name: str):
    """(megatron, local) builds of config ``name`` from the same seed."""
    overrides = dict(CONFIGS[name])
    cfg = tiny_model_config(overrides.pop("mtp"), max_seq_len=48, **overrides)
    built = []
    for backend in ("megatron", "local"):
        torch.manual_seed(0)
        built.append(build_model(cfg, backend=backend))
    return built[0], built[1]


def _tensors(model) -> dict[str, torch.Tensor]:
    return {n: t for n, t in model.state_dict().items() if torch.is_tensor(t)}  # no _extra_state


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_backends_build_the_same_parameters(single_process, name):
    """Same names, shapes, initial values and TP partitions: a state dict moves unchanged."""
    ours, local = _pair(name)
    a, b = _tensors(ours), _tensors(local)
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert partitions(ours) == partitions(local)
    assert not any(isinstance(m, LocalLinear) for m in ours.modules())
    assert any(isinstance(m, LocalLinear) for m in local.modules())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_local_backend_computes_what_megatron_computes(single_process, name):
    """Training forward (loss, every MTP step, gradients) and evaluation logits agree."""
    ours, local = _pair(name)
    torch.manual_seed(1)
    randomize_norm_weights(ours)
    local.load_state_dict(_tensors(ours))
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    out_m, out_l = ours(ids), local(ids)
    assert_close_to_scale(out_l.loss, out_m.loss, VALUE_RTOL)
    for key, value in out_m.mtp_step_losses.items():
        assert_close_to_scale(out_l.mtp_step_losses[key], value, VALUE_RTOL)
    out_m.loss.backward()
    out_l.loss.backward()
    grads = dict(local.named_parameters())
    for pname, p in ours.named_parameters():
        assert_close_to_scale(grads[pname].grad, p.grad, VALUE_RTOL)
    ours.eval(), local.eval()
    with torch.no_grad():
        a = ours(ids, return_mtp_logits=True)
        b = local(ids, return_mtp_logits=True)
    assert_close_to_scale(b.logits, a.logits, VALUE_RTOL)
    for x, y in zip(a.mtp_logits or [], b.mtp_logits or []):
        assert_close_to_scale(y, x, VALUE_RTOL)


@pytest.mark.parametrize("variant", valid_combinations(k=3), ids=lambda v: "-".join(map(str, v)))
def test_local_backend_decodes_the_same_tokens(single_process, variant):
    cfg = tiny_model_config(mtp_config(*variant, k=3), max_seq_len=96)
    models = []
    for backend in ("megatron", "local"):
        torch.manual_seed(3)
        models.append(build_model(cfg, backend=backend).eval())
    prompt = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(4))
    plain = [generate_plain(m, prompt, 24)[0] for m in models]
    assert torch.equal(plain[0], plain[1])
    speculative = [m.mtp_decoder.generate(prompt[:1], max_new_tokens=24)[0] for m in models]
    assert torch.equal(speculative[0], speculative[1])
    assert torch.equal(speculative[1], plain[1][:1])


def test_local_layout_and_a_changed_tied_weight_is_seen(single_process):
    """Own weights are stored [in, out] row-major (``weight`` is their [out, in] view); a tied
    output layer's transposed copy follows the embedding when it changes (load, optimizer)."""
    cfg = tiny_model_config(mtp_config("mlp", True, "chained"), tie_embeddings=True)
    torch.manual_seed(0)
    model = build_model(cfg, backend="local").eval()
    for module in model.modules():
        if isinstance(module, LocalLinear) and module.weight is not None:
            assert module.weight.t().is_contiguous()
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    before, _ = generate_plain(model, ids, 6)
    with torch.no_grad():
        model.trunk.embedding.weight.mul_(-3.0)  # bumps the version: the copy is remade
        model.trunk.layers[0].mlp.inner.down.weight.mul_(-3.0)
    after, _ = generate_plain(model, ids, 6)
    with torch.enable_grad():  # the autograd path reads the weights directly
        V = cfg.vocab_size
        expected = [model(after[:, : 9 + i]).logits[:, -1, :V].argmax(-1) for i in range(6)]
    assert torch.equal(after[:, 9:], torch.stack(expected, 1))
    assert not torch.equal(before, after)
    as_bf16 = model.to(torch.bfloat16)  # a dtype change keeps the layout
    assert as_bf16.trunk.layers[0].mlp.inner.down.weight.t().is_contiguous()


def test_local_backend_needs_one_tp_rank_and_a_known_backend(single_process):
    class TwoRanks:
        def size(self) -> int:
            return 2

    cfg = tiny_model_config(None)
    with pytest.raises(ConfigError, match="backend='megatron' at TP > 1"):
        LayerContext(cfg, TwoRanks(), backend="local")
    with pytest.raises(ConfigError, match="one of"):
        build_model(cfg, backend="te")
