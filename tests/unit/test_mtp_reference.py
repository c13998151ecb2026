"""The MTP loss against an independent plain-PyTorch reference on the same weights (TP=1)."""

import pytest
import torch

from mtp_megatron import ConfigError, build_model
from mtp_megatron.testing.reference import reference_losses
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import (
    all_combinations,
    is_valid,
    mtp_config,
    randomize_norm_weights,
    tiny_model_config,
)


def _batch(cfg, b=2, s=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((b, 1), -100)], dim=1)
    labels[0, 3] = -100  # an ignored label inside the sequence must be masked too
    return ids, labels


def _weights(model):
    # megatron layers add `_extra_state` entries (None) to the state dict
    return {k: v.detach() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("norm_placement", ["post", "pre"])
@pytest.mark.parametrize("head_type,shared,arrangement", all_combinations())
def test_mtp_loss_matches_plain_pytorch(
    single_process, head_type, shared, arrangement, norm_placement
):
    mtp = mtp_config(head_type, shared, arrangement, k=3)
    if not is_valid(head_type, shared, arrangement):
        with pytest.raises(ConfigError, match="head_arrangement|share_weights"):
            mtp.validate()
        return
    cfg = tiny_model_config(mtp, norm_placement=norm_placement)
    torch.manual_seed(0)
    model = build_model(cfg)
    randomize_norm_weights(model)
    ids, labels = _batch(cfg)
    out = model(ids, labels=labels)
    sd = _weights(model)
    main, steps = reference_losses(sd, cfg, ids, labels)
    alphas = model.objective.step_weights()
    # fp32 on both sides, same operations in a different order: agreement to ~1e-6 relative.
    assert_close_to_scale(out.main_loss, main, VALUE_RTOL)
    for k, ref in enumerate(steps, start=1):
        assert_close_to_scale(out.mtp_step_losses[f"mtp_step_{k}"], ref, VALUE_RTOL)
    expected_mtp = sum(a * s for a, s in zip(alphas, steps))
    assert_close_to_scale(out.mtp_loss, expected_mtp, VALUE_RTOL)
    assert_close_to_scale(out.loss, main + 0.5 * expected_mtp, VALUE_RTOL)


def test_tied_embeddings_match_reference(single_process):
    cfg = tiny_model_config(mtp_config("transformer", True, "chained"), tie_embeddings=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not any("output_layer" in n for n, _ in model.named_parameters())
    ids, labels = _batch(cfg)
    out = model(ids, labels=labels)
    main, steps = reference_losses(_weights(model), cfg, ids, labels)
    assert_close_to_scale(out.main_loss, main, VALUE_RTOL)
    assert_close_to_scale(out.mtp_step_losses["mtp_step_3"], steps[2], VALUE_RTOL)


def test_labels_default_to_shifted_inputs(single_process):
    cfg = tiny_model_config(mtp_config("mlp", False, "independent"))
    torch.manual_seed(0)
    model = build_model(cfg)
    ids, _ = _batch(cfg)
    shifted = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    torch.testing.assert_close(model(ids).loss, model(ids, labels=shifted).loss)


def test_heads_get_gradients_and_ntp_model_has_no_heads(single_process):
    cfg = tiny_model_config(mtp_config("transformer", False, "chained"))
    torch.manual_seed(0)
    model = build_model(cfg)
    ids, labels = _batch(cfg)
    model(ids, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    ntp = build_model(tiny_model_config(None))
    assert ntp.mtp is None
    out = ntp(ids, labels=labels)
    assert out.mtp_loss is None and out.mtp_step_losses == {}
    torch.testing.assert_close(out.loss, out.main_loss)


def test_returned_logits_are_the_real_logits(single_process):
    """megatron's vocab-parallel CE overwrites its input; the logits we return must survive it."""
    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=2))
    torch.manual_seed(0)
    model = build_model(cfg)
    ids, labels = _batch(cfg)
    out = model(ids, labels=labels, return_mtp_logits=True)
    with torch.no_grad():
        _, logits = model.trunk(ids)  # no loss computed on these
    torch.testing.assert_close(out.logits, logits)
    assert (out.logits < 0).any()  # exp(logits - max) would be all positive
    assert all((lg < 0).any() for lg in out.mtp_logits)


def test_head_type_registry_names_every_type(single_process):
    from mtp_megatron.config import HEAD_TYPES
    from mtp_megatron.model.heads import HEAD_TYPES as BUILT
    from mtp_megatron.model.heads import head_type

    assert list(BUILT) == list(HEAD_TYPES)  # recipe names and builders: one list
    with pytest.raises(ConfigError, match="'rnn'.*'transformer', 'mlp', 'linear'"):
        head_type("rnn")
    # the linear head: x + W2 SiLU(W1 x), h x h each, no attention (no KV cache when decoding)
    cfg = tiny_model_config(mtp_config("linear", False, "chained", k=2))
    model = build_model(cfg)
    h = cfg.hidden_size
    block = dict(model.mtp.heads[0].block.named_parameters())
    assert {n: tuple(p.shape) for n, p in block.items()} == {
        "up.weight": (h, h),
        "down.weight": (h, h),
    }
    assert not model.mtp.heads[0].has_attention
