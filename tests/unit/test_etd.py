"""ETD: identity at one iteration, unrolled references, LoRA experts and routers, checkpointed
iterations, KV-cached and speculative decoding, config errors."""

import dataclasses

import pytest
import torch

from mtp_megatron import ConfigError, ETDConfig, build_model, wrap_transformer_with_etd
from mtp_megatron.decoding import generate_plain
from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.model.etd import ETDTrunk, etd_metrics
from mtp_megatron.model.lora import LoRAExperts
from mtp_megatron.testing.tolerance import GRAD_RTOL, VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import randomize_norm_weights
from tests.cases.etd import MTP, REPO, etd_config, etd_model, etd_model_config, token_ids


@pytest.mark.parametrize("mtp", [MTP, None], ids=["mtp", "ntp"])
def test_one_iteration_without_router_and_experts_is_the_plain_trunk(single_process, mtp):
    etd = etd_config(max_think_iterations=1)
    torch.manual_seed(0)
    plain = build_model(etd_model_config(None, mtp))
    torch.manual_seed(0)
    wrapped = build_model(etd_model_config(etd, mtp))
    assert isinstance(wrapped.trunk, ETDTrunk) and wrapped.trunk.num_kv_caches == 4
    torch.manual_seed(3)
    randomize_norm_weights(plain)
    torch.manual_seed(3)
    randomize_norm_weights(wrapped)
    sd_plain, sd_etd = plain.state_dict(), wrapped.state_dict()
    assert sd_plain.keys() == sd_etd.keys()
    assert all(torch.equal(v, sd_etd[k]) for k, v in sd_plain.items() if torch.is_tensor(v))
    ids = token_ids(2, 16, 1)
    out_p, out_e = plain(ids), wrapped(ids)
    assert torch.equal(out_p.loss, out_e.loss) and torch.equal(out_p.logits, out_e.logits)
    for k, v in out_p.mtp_step_losses.items():
        assert torch.equal(v, out_e.mtp_step_losses[k])
    out_p.loss.backward()
    out_e.loss.backward()
    grads_e = dict(wrapped.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p.grad, grads_e[name].grad), name
    plain.eval()
    wrapped.eval()
    assert torch.equal(
        generate_plain(plain, ids[:, :5], 8)[0], generate_plain(wrapped, ids[:, :5], 8)[0]
    )


def _encode(trunk, ids):
    positions = torch.arange(ids.shape[1])
    return trunk.layers[0](trunk.embed(ids), trunk.rope, positions), positions


def test_k_iterations_equal_the_unrolled_layers(single_process):
    model = etd_model(etd_config(max_think_iterations=3), activate=False)
    trunk = model.trunk
    ids = token_ids(2, 12, 2)
    h, positions = _encode(trunk, ids)
    for _ in range(3):  # the think block, tied weights
        h = trunk.layers[2](trunk.layers[1](h, trunk.rope, positions), trunk.rope, positions)
    reference = trunk.layers[3](h, trunk.rope, positions)
    got = trunk.run_layers(trunk.embed(ids), positions)
    assert torch.equal(got, reference)
    assert trunk.last_stats.think_iterations.eq(3).all()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_halted_tokens_carry_their_state(single_process, training):
    """The depth router against a hand-written loop: halt when p >= threshold, carry the state."""
    model = etd_model(etd_config(max_think_iterations=3, use_layer_router=True)).train(training)
    trunk = model.trunk
    ids = token_ids(2, 12, 3)
    with torch.no_grad():
        state, positions = _encode(trunk, ids)
        running = torch.ones(2, 12, dtype=torch.bool)
        count = torch.zeros(2, 12)
        for it in range(3):
            if it >= 1:  # min_think_iterations = 1
                running &= trunk.halt_router(state) < 0.5
            new = trunk.layers[2](
                trunk.layers[1](state, trunk.rope, positions), trunk.rope, positions
            )
            state = torch.where(running[..., None], new, state)
            count += running
        reference = trunk.layers[3](state, trunk.rope, positions)
    assert 0 < int((count < 3).sum()) < count.numel(), "the test needs halted and running tokens"
    with torch.set_grad_enabled(training):
        got = trunk.run_layers(trunk.embed(ids), positions)
    assert torch.equal(got, reference)  # the straight-through term adds exactly 0
    assert torch.equal(trunk.last_stats.think_iterations, count)
    with torch.set_grad_enabled(training):
        again, cost = trunk.run_layers_with_cost(trunk.embed(ids), positions)
    assert torch.equal(again, got) and (cost is not None) == training  # the depth cost: a value


def test_lora_experts_equal_the_dense_formula(single_process):
    """y = base(x) + alpha/r * B_e A_e x * gate for the chosen expert e, column and row layers."""
    model = etd_model(etd_config(use_lora_experts=True, max_think_iterations=2))
    attn = model.trunk.layers[1].attention.inner
    r, E = 4, 3
    for lin, width in ((attn.q_proj, 64), (attn.o_proj, 64)):
        assert isinstance(lin, LoRAExperts)
        x = torch.randn(2, 5, width)
        route = torch.zeros(2, 5, E)
        choice = torch.randint(0, E, (2, 5))
        gate = torch.rand(2, 5)
        route.scatter_(-1, choice[..., None], gate[..., None])
        with model.trunk.routing.use(route):
            got = lin(x)
        base = x @ lin.base.weight.T
        a = lin.lora_a.view(E, r, width)[choice]  # [2, 5, r, in]
        b = lin.lora_b.view(-1, E, r).permute(1, 0, 2)[choice]  # [2, 5, out, r]
        lora = (b @ (a @ x[..., None]))[..., 0] * gate[..., None] * (16.0 / r)
        torch.testing.assert_close(got, base + lora)
        torch.testing.assert_close(lin(x), base)  # outside an iteration: the base alone


def test_expert_bias_balances_load_and_is_checkpointed(single_process):
    model = etd_model(
        etd_config(use_lora_experts=True, max_think_iterations=2, expert_bias_update_rate=0.01)
    )
    router = model.trunk.expert_router
    with torch.no_grad():
        router.weight.zero_()  # equal scores: the argmax picks expert 0 for every token
    model(token_ids(2, 8, 4))
    assert router.expert_bias.abs().sum() == 0  # a forward records its load; the step applies it
    model.after_optimizer_step()
    assert router.expert_load.tolist() == [1.0, 0.0, 0.0]
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01]))
    assert "trunk.expert_router.expert_bias" in model.state_dict()
    metrics = etd_metrics(model, "train/")
    assert (
        metrics["train/etd_expert_load_1"] == 1.0
        and metrics["train/etd_mean_think_iterations"] == 2
    )
    model(token_ids(2, 8, 5))  # the bias now sends every token to expert 1 (ties broken by index)
    model.after_optimizer_step()
    assert router.expert_load.tolist() == [0.0, 1.0, 0.0]
    before = router.expert_bias.clone()
    model.eval()
    with torch.no_grad():
        model(token_ids(2, 8, 6))
    model.after_optimizer_step()
    assert torch.equal(router.expert_bias, before)  # evaluation does not update it
    assert model.to(torch.bfloat16).trunk.expert_router.expert_bias.dtype == torch.float32


def test_expert_bias_moves_once_per_optimizer_step_under_grad_accumulation(single_process):
    """Two micro-batches of one step route with the same bias; the update then sees both."""
    model = etd_model(
        etd_config(use_lora_experts=True, max_think_iterations=2, expert_bias_update_rate=0.01)
    )
    router = model.trunk.expert_router
    with torch.no_grad():
        router.weight.zero_()  # every token to expert 0 while the bias is zero
    for seed in (4, 5):  # grad_accum = 2
        model(token_ids(2, 8, seed))
        assert router.expert_bias.abs().sum() == 0 and model.trunk.last_stats.expert_load[0] == 1
    model.after_optimizer_step()  # one step: one move of rate towards equal load
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01]))
    assert router.pending_counts.sum() == 0


def test_activation_checkpointing_recomputes_each_iteration_with_its_own_routing(single_process):
    """Recomputed think layers (in backward) must see their own iteration's experts."""
    from mtp_megatron.config import MTPTrainingConfig
    from mtp_megatron.train.apply import apply_mtp_training

    etd = etd_config(use_layer_router=True, use_lora_experts=True, max_think_iterations=3)
    results = []
    for checkpointing in (False, True):
        model = etd_model(etd)
        apply_mtp_training(model, MTPTrainingConfig(gradient_checkpointing=checkpointing))
        out = model(token_ids(2, 12, 12))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        assert_close_to_scale(grads_ckpt[name], g, VALUE_RTOL, msg=name)


DEPTHS = {
    "fixed": dict(max_think_iterations=3, use_lora_experts=True),
    "adaptive": dict(max_think_iterations=3, use_lora_experts=True, use_layer_router=True),
}


@pytest.mark.parametrize("depth", DEPTHS)
def test_kv_cached_decoding_equals_the_full_forward(single_process, depth):
    model = etd_model(etd_config(**DEPTHS[depth])).eval()
    trunk = model.trunk
    prompts = token_ids(2, 6, 9)
    cached, _ = generate_plain(model, prompts, 16)
    full, _ = generate_plain(model, prompts, 16, use_cache=False)
    assert torch.equal(cached, full)
    # token by token through the caches vs one training-mode forward: same depth, same states
    seq = cached
    caches = KVCacheSet(trunk.num_kv_caches, 2, 4, 8, seq.shape[1], seq.device, torch.float32)
    states, iterations = [], []
    with torch.no_grad():
        for t in range(seq.shape[1]):
            tok = seq[:, t : t + 1]
            states.append(
                trunk.run_layers(trunk.embed(tok), caches.positions(1), kv_caches=caches.layers)
            )
            caches.advance(1)
            iterations.append(trunk.last_stats.think_iterations)
    model.train()
    whole = trunk.run_layers(trunk.embed(seq), torch.arange(seq.shape[1]))
    assert torch.equal(torch.cat(iterations, dim=1), trunk.last_stats.think_iterations)
    # one token at a time vs the whole sequence: other matmul shapes, other fp32 rounding
    assert_close_to_scale(torch.cat(states, dim=1), whole.detach(), GRAD_RTOL)
    if depth == "adaptive":
        n = trunk.last_stats.think_iterations
        assert 0 < int((n < 3).sum()) < n.numel()


def test_speculative_greedy_with_etd_and_mtp_equals_plain(single_process):
    model = etd_model(etd_config(**DEPTHS["adaptive"]), seed=1).eval()
    prompts = token_ids(2, 5, 10)
    plain, _ = generate_plain(model, prompts, 20)
    for lookahead in (1, 2, 3):
        out, stats = model.mtp_decoder.generate(prompts, max_new_tokens=20, lookahead=lookahead)
        assert torch.equal(out, plain), lookahead
        assert stats["forward_calls"] <= 20


def test_invalid_splits_give_clear_errors(single_process):
    from mtp_megatron.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"1 \+ 3 \+ 1 = 5 is invalid: must equal model.num"):
        etd_config(n_think_layers=3).validate(num_layers=4)
    with pytest.raises(ConfigError, match="model.etd.max_think_iterations=0 is invalid"):
        etd_config(max_think_iterations=0).validate(num_layers=4)
    with pytest.raises(ConfigError, match="model.etd.n_think_layers=0 is invalid"):
        etd_config(n_think_layers=0, n_encoder_layers=2).validate(num_layers=4)
    with pytest.raises(ConfigError, match="use_layer_router=True is invalid: the router has no"):
        etd_config(max_think_iterations=1, use_layer_router=True).validate(num_layers=4)
    with pytest.raises(ConfigError, match="halt_threshold=1.5 is invalid"):
        etd_config(halt_threshold=1.5).validate()
    with pytest.raises(ConfigError, match="model.etd.lora_rank=0 is invalid"):
        etd_config(lora_rank=0).validate()
    with pytest.raises(ConfigError, match="must equal model.num_layers"):  # the guide's 7/4/5
        build_model(etd_model_config(ETDConfig()))
    recipe = REPO / "recipes" / "ablations" / "etd.yaml"
    # ETD under PP is refused before launch, whatever the split or partition
    inside_stage_1 = ["model.etd.n_encoder_layers=2", "model.etd.n_decoder_layers=0"]
    for extra in ([], ["parallel.pipeline_partition=parameters"], inside_stage_1):
        with pytest.raises(ConfigError, match="model.etd with .* is not supported yet"):
            load_recipe(recipe, ["parallel.pipeline_parallel_size=2", *extra])
    model = etd_model(etd_config(), activate=False)
    with pytest.raises(TypeError, match="wrap the trunk before adding MTP heads"):
        wrap_transformer_with_etd(model, etd_config())
    with pytest.raises(TypeError, match="already wrapped"):
        wrap_transformer_with_etd(model.trunk, etd_config())
    with pytest.raises(ValueError, match="cut through the ETD think block"):
        model.trunk.run_layers(torch.zeros(1, 3, 64), torch.arange(3), layers=range(0, 2))


def test_recipes_build_etd_models(single_process):
    from mtp_megatron.recipe import load_recipe

    for name, heads in (("etd", False), ("etd_mtp", True)):
        recipe = load_recipe(REPO / "recipes" / "ablations" / f"{name}.yaml")
        model = build_model(dataclasses.replace(recipe.model, hidden_size=64, vocab_size=200))
        assert isinstance(model.trunk, ETDTrunk) and (model.mtp is not None) == heads
        assert model.trunk.num_kv_caches == 1 + 2 * 2 + 1


def test_split_at_the_knees_of_a_u_shaped_curve():
    from mtp_megatron.etd_split import split_from_distances

    # a sharp fall, a flat middle, a rise over the last layers (the shape ETD reports)
    curve = [0.6, 0.3, 0.15, 0.1, 0.09, 0.085, 0.08, 0.08]
    curve += [0.082, 0.085, 0.09, 0.1, 0.14, 0.2, 0.3, 0.5]
    split = split_from_distances(curve)
    # the fall flattens at layer 2 (farthest below the chord of layers 0..6, 6 the flattest) and
    # the rise starts at layer 12 (farthest below the chord of layers 6..15)
    assert (split["encoder_knee"], split["flattest_layer"], split["decoder_knee"]) == (2, 6, 12)
    parts = (split["n_encoder_layers"], split["n_think_layers"], split["n_decoder_layers"])
    assert parts == (2, 11, 3)
    assert split_from_distances([0.5, 0.1, 0.4])["n_think_layers"] == 1
    assert sum(split_from_distances([0.3, 0.2]).values()) >= 2  # too short: all think
