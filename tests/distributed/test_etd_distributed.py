"""ETD at TP=2 with experts and router equals TP=1; a trained ETD run loads, decodes and splits."""

import json
from pathlib import Path

import pytest
import torch

from mtp_megatron.decoding import generate_plain
from mtp_megatron.testing.distributed import gather_full_tensor, run_distributed
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from tests.cases.etd import REPO, etd_config, etd_model, token_ids


def _tp_run(rank, world, tp):
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group

    initialize_parallel(tensor_parallel_size=tp)
    model = etd_model(
        etd_config(use_layer_router=True, use_lora_experts=True, max_think_iterations=3)
    )
    out = model(token_ids(2, 16, 8))
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
        # (tolerances relative to each tensor's scale: testing/tolerance.py says why)
        assert_close_to_scale(got["loss"], ref["loss"], VALUE_RTOL)
        for k, v in ref["steps"].items():
            assert_close_to_scale(got["steps"][k], v, VALUE_RTOL)
        assert got["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            assert g.abs().sum() > 0 or "expert_router" not in name, name
            assert_close_to_scale(got["grads"][name], g, msg=name)


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
        "data.tokenizer": "bpe:512",
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
    prompts = token_ids(1, 5, 11, vocab=512)
    plain, _ = generate_plain(run.model, prompts, 12)
    spec, _ = run.model.mtp_decoder.generate(prompts, max_new_tokens=12)
    assert torch.equal(plain, spec)

    assert main_etd_split(["--checkpoint", str(run_dir), "--batches", "2"]) == 0
    result = json.loads((run_dir / "etd_split.json").read_text())
    parts = [result[f"n_{p}_layers"] for p in ("encoder", "think", "decoder")]
    assert sum(parts) == 4 and min(parts) >= 1
    assert all(0.0 <= d <= 1.0 for d in result["angular_distance"])
