"""ETD: identity at one iteration, unrolled references, LoRA experts and routers, TP=2 vs TP=1,
KV-cached and speculative decoding, config errors, and the split command on a trained run."""

import dataclasses
import json
import zlib
from pathlib import Path

import pytest
import torch

from mtp_megatron import ConfigError, ETDConfig, build_model, wrap_transformer_with_etd
from mtp_megatron.decoding import generate_plain
from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.model.etd import ETDTrunk, etd_metrics
from mtp_megatron.model.lora import LoRAExperts
from mtp_megatron.testing.distributed import gather_full_tensor, run_distributed
from mtp_megatron.testing.tolerance import GRAD_RTOL, VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config

REPO = Path(__file__).resolve().parent.parent
MTP = mtp_config("transformer", True, "chained", k=3)


def _etd(**overrides) -> ETDConfig:
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


def _cfg(etd, mtp=MTP, **overrides):
    return tiny_model_config(mtp, num_layers=4, max_seq_len=64, etd=etd, **overrides)


def _set_from_master(param: torch.nn.Parameter, master: torch.Tensor, group) -> None:
    """Write this rank's slice of ``master`` (the TP=1 layout) into ``param``."""
    tp = torch.distributed.get_world_size(group)
    if tp > 1 and getattr(param, "tensor_model_parallel", False):
        dim, stride = param.partition_dim, param.partition_stride
        rank = torch.distributed.get_rank(group)
        master = torch.cat(master.chunk(tp * stride, dim=dim)[rank::tp], dim=dim)
    param.data.copy_(master)


def _activate(model, seed: int = 7) -> None:
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
                _set_from_master(p, master, group)


def _model(etd, seed=0, activate=True, mtp=MTP, **overrides):
    torch.manual_seed(seed)
    model = build_model(_cfg(etd, mtp, **overrides))
    randomize_norm_weights(model)
    if activate:
        _activate(model)
    return model


def _ids(b, s, seed, vocab=200):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# -- semantics ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mtp", [MTP, None], ids=["mtp", "ntp"])
def test_one_iteration_without_router_and_experts_is_the_plain_trunk(single_process, mtp):
    etd = _etd(max_think_iterations=1)
    torch.manual_seed(0)
    plain = build_model(_cfg(None, mtp))
    torch.manual_seed(0)
    wrapped = build_model(_cfg(etd, mtp))
    assert isinstance(wrapped.trunk, ETDTrunk) and wrapped.trunk.num_kv_caches == 4
    torch.manual_seed(3)
    randomize_norm_weights(plain)
    torch.manual_seed(3)
    randomize_norm_weights(wrapped)
    sd_plain, sd_etd = plain.state_dict(), wrapped.state_dict()
    assert sd_plain.keys() == sd_etd.keys()
    assert all(torch.equal(v, sd_etd[k]) for k, v in sd_plain.items() if torch.is_tensor(v))
    ids = _ids(2, 16, 1)
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
    model = _model(_etd(max_think_iterations=3), activate=False)
    trunk = model.trunk
    ids = _ids(2, 12, 2)
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
    model = _model(_etd(max_think_iterations=3, use_layer_router=True)).train(training)
    trunk = model.trunk
    ids = _ids(2, 12, 3)
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
    model = _model(_etd(use_lora_experts=True, max_think_iterations=2))
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
    model = _model(
        _etd(use_lora_experts=True, max_think_iterations=2, expert_bias_update_rate=0.01)
    )
    router = model.trunk.expert_router
    with torch.no_grad():
        router.weight.zero_()  # equal scores: the argmax picks expert 0 for every token
    model(_ids(2, 8, 4))
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
    model(_ids(2, 8, 5))  # the bias now sends every token to expert 1 (ties broken by index)
    model.after_optimizer_step()
    assert router.expert_load.tolist() == [0.0, 1.0, 0.0]
    before = router.expert_bias.clone()
    model.eval()
    with torch.no_grad():
        model(_ids(2, 8, 6))
    model.after_optimizer_step()
    assert torch.equal(router.expert_bias, before)  # evaluation does not update it
    assert model.to(torch.bfloat16).trunk.expert_router.expert_bias.dtype == torch.float32


def test_expert_bias_moves_once_per_optimizer_step_under_grad_accumulation(single_process):
    """Two micro-batches of one step route with the same bias; the update then sees both."""
    model = _model(
        _etd(use_lora_experts=True, max_think_iterations=2, expert_bias_update_rate=0.01)
    )
    router = model.trunk.expert_router
    with torch.no_grad():
        router.weight.zero_()  # every token to expert 0 while the bias is zero
    for seed in (4, 5):  # grad_accum = 2
        model(_ids(2, 8, seed))
        assert router.expert_bias.abs().sum() == 0 and model.trunk.last_stats.expert_load[0] == 1
    model.after_optimizer_step()  # one step: one move of rate towards equal load
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.01, 0.01, 0.01]))
    assert router.pending_counts.sum() == 0


def test_activation_checkpointing_recomputes_each_iteration_with_its_own_routing(single_process):
    """Recomputed think layers (in backward) must see their own iteration's experts."""
    from mtp_megatron.config import MTPTrainingConfig

    etd = _etd(use_layer_router=True, use_lora_experts=True, max_think_iterations=3)
    results = []
    for checkpointing in (False, True):
        model = _model(etd)
        model.training_config = MTPTrainingConfig(gradient_checkpointing=checkpointing)
        out = model(_ids(2, 12, 12))
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt)
    for name, g in grads.items():
        assert_close_to_scale(grads_ckpt[name], g, VALUE_RTOL, msg=name)


# -- tensor parallelism ------------------------------------------------------------------------


def _tp_run(rank, world, tp):
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group

    initialize_parallel(tensor_parallel_size=tp)
    model = _model(_etd(use_layer_router=True, use_lora_experts=True, max_think_iterations=3))
    out = model(_ids(2, 16, 8))
    out.loss.backward()
    model.after_optimizer_step()  # the routing bias moves by this step's load
    group = tensor_parallel_group()
    return {
        "loss": out.loss.detach(),
        "steps": out.mtp_step_losses,
        "iterations": model.trunk.last_stats.think_iterations,
        "bias": model.trunk.expert_router.expert_bias.clone(),
        "grads": {n: gather_full_tensor(p.grad, p, group) for n, p in model.named_parameters()},
    }


@pytest.mark.distributed
def test_tensor_parallel_with_experts_and_router_matches_tp1():
    ref = run_distributed(_tp_run, 1, 1)[0]
    assert 0 < int((ref["iterations"] < 3).sum()) < ref["iterations"].numel()
    for got in run_distributed(_tp_run, 2, 2):
        # TP reorders fp32 reductions only; the routers' hard decisions agree (they sit far from
        # the threshold / ties compared to that rounding)
        assert torch.equal(got["iterations"], ref["iterations"])
        assert torch.equal(got["bias"], ref["bias"])
        # (tolerances relative to each tensor's scale: tests/tolerance.py says why)
        assert_close_to_scale(got["loss"], ref["loss"], VALUE_RTOL)
        for k, v in ref["steps"].items():
            assert_close_to_scale(got["steps"][k], v, VALUE_RTOL)
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0 or "expert_router" not in name, name
            assert_close_to_scale(got["grads"][name], g, msg=name)


# -- decoding ----------------------------------------------------------------------------------

DEPTHS = {
    "fixed": dict(max_think_iterations=3, use_lora_experts=True),
    "adaptive": dict(max_think_iterations=3, use_lora_experts=True, use_layer_router=True),
}


@pytest.mark.parametrize("depth", DEPTHS)
def test_kv_cached_decoding_equals_the_full_forward(single_process, depth):
    model = _model(_etd(**DEPTHS[depth])).eval()
    trunk = model.trunk
    prompts = _ids(2, 6, 9)
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
    model = _model(_etd(**DEPTHS["adaptive"]), seed=1).eval()
    prompts = _ids(2, 5, 10)
    plain, _ = generate_plain(model, prompts, 20)
    for lookahead in (1, 2, 3):
        out, stats = model.mtp_decoder.generate(prompts, max_new_tokens=20, lookahead=lookahead)
        assert torch.equal(out, plain), lookahead
        assert stats["forward_calls"] <= 20


# -- configuration -----------------------------------------------------------------------------


def test_invalid_splits_give_clear_errors(single_process):
    from mtp_megatron.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"1 \+ 3 \+ 1 = 5 is invalid: must equal model.num"):
        _etd(n_think_layers=3).validate(num_layers=4)
    with pytest.raises(ConfigError, match="model.etd.max_think_iterations=0 is invalid"):
        _etd(max_think_iterations=0).validate(num_layers=4)
    with pytest.raises(ConfigError, match="model.etd.n_think_layers=0 is invalid"):
        _etd(n_think_layers=0, n_encoder_layers=2).validate(num_layers=4)
    with pytest.raises(ConfigError, match="use_layer_router=True is invalid: the router has no"):
        _etd(max_think_iterations=1, use_layer_router=True).validate(num_layers=4)
    with pytest.raises(ConfigError, match="halt_threshold=1.5 is invalid"):
        _etd(halt_threshold=1.5).validate()
    with pytest.raises(ConfigError, match="model.etd.lora_rank=0 is invalid"):
        _etd(lora_rank=0).validate()
    with pytest.raises(ConfigError, match="must equal model.num_layers"):  # the guide's 7/4/5
        build_model(_cfg(ETDConfig()))
    recipe = REPO / "recipes" / "ablations" / "etd.yaml"
    with pytest.raises(ConfigError, match=r"spans pipeline stages 0 and 1 .* e.g. the split 0/2/2"):
        load_recipe(recipe, ["parallel.pipeline_parallel_size=2"])
    with pytest.raises(
        ConfigError, match="pipeline_partition='parameters' is invalid with model.etd"
    ):
        load_recipe(
            recipe, ["parallel.pipeline_parallel_size=2", "parallel.pipeline_partition=parameters"]
        )
    split = ["model.etd.n_encoder_layers=2", "model.etd.n_decoder_layers=0"]
    # inside stage 1: the split passes, but ETD under PP is refused before launch for now
    with pytest.raises(ConfigError, match="not supported yet"):
        load_recipe(recipe, ["parallel.pipeline_parallel_size=2", *split])
    model = _model(_etd(), activate=False)
    with pytest.raises(TypeError, match="wrap the trunk before adding MTP heads"):
        wrap_transformer_with_etd(model, _etd())
    with pytest.raises(TypeError, match="already wrapped"):
        wrap_transformer_with_etd(model.trunk, _etd())
    with pytest.raises(ValueError, match="cut through the ETD think block"):
        model.trunk.run_layers(torch.zeros(1, 3, 64), torch.arange(3), layers=range(0, 2))


def test_recipes_build_etd_models(single_process):
    from mtp_megatron.recipe import load_recipe

    for name, heads in (("etd", False), ("etd_mtp", True)):
        recipe = load_recipe(REPO / "recipes" / "ablations" / f"{name}.yaml")
        model = build_model(dataclasses.replace(recipe.model, hidden_size=64, vocab_size=200))
        assert isinstance(model.trunk, ETDTrunk) and (model.mtp is not None) == heads
        assert model.trunk.num_kv_caches == 1 + 2 * 2 + 1


# -- trained checkpoint: training under DeepSpeed, loading, the split command ------------------


def _train(rank, world, overrides):
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.train.trainer import train

    recipe = load_recipe(REPO / "recipes" / "ablations" / "etd_mtp.yaml", overrides)
    result = train(recipe, log=print)
    return {"losses": result.losses, "eval": result.eval}


@pytest.mark.distributed
def test_trained_etd_run_loads_decodes_and_splits(single_process, tmp_path):
    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.etd_split import main_etd_split

    run_dir = tmp_path / "run"
    overrides = {
        "model.vocab_size": 512,
        "model.hidden_size": 64,
        "model.max_seq_len": 32,
        "model.mtp.num_predict_tokens": 2,
        "model.mtp.speculation_lookahead": 2,
        "train.steps": 4,
        "train.micro_batch_size": 2,
        "train.lr_warmup_steps": 1,
        "train.eval_every": 0,
        "train.eval_batches": 1,
        "train.checkpoint_every": 0,
        "train.run_dir": str(run_dir),
        "data.max_files": 60,
        "data.cache_dir": str(tmp_path / "cache"),
    }
    out = run_distributed(_train, 1, [f"{k}={v}" for k, v in overrides.items()])[0]
    assert len(out["losses"]) == 4 and all(v == v for v in out["losses"].values())
    assert {"val/etd_mean_think_iterations", "val/etd_expert_load_1"} <= set(out["eval"])

    run = load_run(run_dir)
    saved = torch.load(
        next(Path(run.metadata["checkpoint"]).glob("mp_rank_*_model_states.pt")), weights_only=False
    )["module"]["trunk.expert_router.expert_bias"]
    assert torch.equal(run.model.trunk.expert_router.expert_bias, saved) and saved.abs().sum() > 0
    prompts = _ids(1, 5, 11, vocab=512)
    plain, _ = generate_plain(run.model, prompts, 12)
    spec, _ = run.model.mtp_decoder.generate(prompts, max_new_tokens=12)
    assert torch.equal(plain, spec)

    assert main_etd_split(["--checkpoint", str(run_dir), "--batches", "2"]) == 0
    result = json.loads((run_dir / "etd_split.json").read_text())
    parts = [result[f"n_{p}_layers"] for p in ("encoder", "think", "decoder")]
    assert sum(parts) == 4 and min(parts) >= 1
    assert all(0.0 <= d <= 1.0 for d in result["angular_distance"])


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
