"""Runs that start from a pretrained Hugging Face checkpoint (made in the test with transformers'
own classes): the imported model at TP=2 computes the checkpoint's logits; a PP=2 run loads the
same weights as PP=1, trains, resumes exactly, exports to transformers and decodes
speculatively with greedy output identical to plain decoding."""

from pathlib import Path

import pytest
import torch

from mtp_megatron.testing.distributed import run_distributed
from mtp_megatron.testing.runs import tiny_run_overrides, train_run
from mtp_megatron.testing.tolerance import VALUE_RTOL

pytestmark = pytest.mark.distributed
transformers = pytest.importorskip("transformers")

IDS = torch.arange(2 * 20).view(2, 20) * 11 % 512


def _recipe_overrides(folder: Path) -> list[str]:
    return [
        f"init_from=hf:{folder}",
        "model.max_seq_len=64",
        "model.mtp.num_predict_tokens=2",
        "model.mtp.speculation_lookahead=2",
    ]


def _tp2_logits(rank: int, world: int, folders: list[str]):
    from mtp_megatron.hf.importer import load_pretrained
    from mtp_megatron.model import build_model
    from mtp_megatron.parallel import gather_last_dim, initialize_parallel, tensor_parallel_group
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.testing.runs import DEMO_RECIPE

    initialize_parallel(tensor_parallel_size=2)
    logits = {}
    for folder in folders:
        recipe = load_recipe(DEMO_RECIPE, _recipe_overrides(Path(folder)))
        torch.manual_seed(0)
        model = build_model(recipe.model).eval()  # megatron's TP layers
        load_pretrained(model, recipe.init_from, "random", log=lambda _: None)
        with torch.no_grad():
            logits[folder] = gather_last_dim(model(IDS).logits, tensor_parallel_group())
    return logits  # [b, s, V] each


def test_every_family_imported_at_tp2_computes_the_checkpoints_logits(tmp_path):
    from tests.cases.hf import hf_checkpoint

    expected = {}
    for family in ("exaone4", "qwen3", "llama", "qwen2", "olmo2"):
        for tied in (False, True):
            folder = hf_checkpoint(tmp_path, family, tied)
            with torch.no_grad():
                model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
                expected[str(folder)] = model(IDS).logits
    for ranks_logits in run_distributed(_tp2_logits, 2, list(expected)):
        for folder, ours in ranks_logits.items():
            # fp32; each rank's heads and vocabulary slice (Qwen2's biases, OLMo-2's QK-norm
            # sharded too), reductions in another order: <= 1e-6 here
            torch.testing.assert_close(ours, expected[folder], atol=1e-5, rtol=1e-5, msg=folder)


def test_a_pp2_run_from_a_checkpoint_trains_resumes_exports_and_decodes(tmp_path, single_process):
    from mtp_megatron.decoding import generate_plain
    from mtp_megatron.decoding.load import load_run
    from mtp_megatron.hf.export import export_hf
    from tests.cases.hf import hf_checkpoint

    folder = hf_checkpoint(tmp_path, "exaone4", layers=4)
    extra = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in _recipe_overrides(folder)} | {
        "data.tokenizer": "null",  # the checkpoint's
        "mtp_head_init": "last_layer",
        "train.steps": 6,
        "train.checkpoint_every": 3,
        "train.lr": 1e-3,
    }
    cache = tmp_path / "cache"
    pp1 = run_distributed(train_run, 1, tiny_run_overrides(tmp_path / "pp1", cache, **extra))[0]
    pp2 = {**extra, "parallel.pipeline_parallel_size": 2}
    full = run_distributed(train_run, 2, tiny_run_overrides(tmp_path / "full", cache, **pp2))
    part = tiny_run_overrides(tmp_path / "part", cache, **pp2)
    first = run_distributed(train_run, 2, part, 3)[0]
    second = run_distributed(train_run, 2, part)[0]
    losses = full[0]["losses"]
    # step 0 is the loaded weights' loss: PP=2 loads what PP=1 does (the stages sum in another
    # order: the parity tolerance of every PP test)
    assert losses[0] == pytest.approx(pp1["losses"][0], rel=VALUE_RTOL)
    assert losses[5] < losses[0]
    assert {**first["losses"], **second["losses"]} == losses  # resumed bit for bit
    run = load_run(tmp_path / "part")
    out = export_hf(tmp_path / "part", tmp_path / "exported", log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, run.model(IDS).logits[..., :512])
    prompt = IDS[:1, :8]
    spec, _ = run.model.mtp_decoder.generate(prompt, max_new_tokens=12)
    plain, _ = generate_plain(run.model, prompt, 12)
    assert torch.equal(spec, plain)
