"""Hugging Face interop: an exported trunk loads in transformers' own twin class with our logits,
and its weights convert back bitwise."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from mtp_megatron import consolidated
from mtp_megatron.config import ConfigError, ETDConfig, ModelConfig, MTPConfig
from mtp_megatron.hf.convert import trunk_from_hf, trunk_to_hf
from mtp_megatron.hf.export import export_hf
from mtp_megatron.hf.families import FAMILIES, family_of
from mtp_megatron.model import build_model
from tests.cases.hf import FAMILY_SWITCHES, consolidated_run, twin_config

transformers = pytest.importorskip("transformers")

VOCAB = 400  # the test tokenizer's; padded to 512 in our model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILY_SWITCHES))
def test_an_exported_trunk_is_transformers_own_model_with_our_logits(
    tmp_path, single_process, family, tied
):
    cfg = twin_config(family, tied, MTPConfig(num_predict_tokens=2, speculation_lookahead=2))
    assert family_of(cfg).model_type == family
    folder, model = consolidated_run(tmp_path, cfg)
    out = export_hf(folder, tmp_path / "hf", log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == FAMILIES[family].architecture
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(ids).logits[..., :VOCAB]
        theirs = hf(ids).logits
    # fp32 both, same weights; our RoPE table is computed in float64 then rounded, HF's in
    # fp32, and the kernels sum in other orders: measured <= 5e-7 here, 20x margin
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>" and hf.config.eos_token_id == tok.eos_token_id
    # the weights transformers loaded convert back to ours bitwise (strict: nothing left over)
    master = {k: v for k, v in model.state_dict().items() if k.startswith("trunk.")}
    master = {k: v for k, v in master.items() if torch.is_tensor(v)}
    back = trunk_from_hf(hf.state_dict(), cfg, FAMILIES[family])
    padded = ("trunk.embedding.weight", "trunk.output_layer.weight")
    for name, tensor in master.items():
        if name in padded:  # padding rows are dropped on export and zero on the way back
            assert torch.equal(back[name][:VOCAB], tensor[:VOCAB]), name
            assert not back[name][VOCAB:].any(), name
        else:
            assert torch.equal(back[name], tensor), name
    assert set(back) == set(master)
    assert trunk_to_hf(back, cfg, FAMILIES[family]).keys() == hf.state_dict().keys() - (
        {"lm_head.weight"} if tied else set()
    )


def test_a_trunk_without_a_twin_and_an_existing_output_are_refused(tmp_path, single_process):
    with pytest.raises(ConfigError, match="no Hugging Face twin"):
        family_of(ModelConfig(norm_placement="post", qk_norm=False))
    with pytest.raises(ConfigError, match="Encode-Think-Decode"):
        family_of(
            ModelConfig(
                num_layers=4,
                etd=ETDConfig(n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1),
            )
        )
    folder, _ = consolidated_run(tmp_path, twin_config("llama", False))
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        export_hf(folder, tmp_path / "taken", log=lambda _: None)
    partial = {"model.embed_tokens.weight": torch.zeros(VOCAB, 64)}
    with pytest.raises(ConfigError, match="lacks model.norm.weight"):
        trunk_from_hf(partial, twin_config("llama", False), FAMILIES["llama"])


# ---------------------------------------------------------------------------------------------
# import: init_from: hf:DIR


def _recipe(folder: Path, *extra: str):
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.testing.runs import DEMO_RECIPE

    return load_recipe(
        DEMO_RECIPE,
        [
            f"init_from=hf:{folder}",
            "model.max_seq_len=64",
            "model.mtp.num_predict_tokens=2",
            "model.mtp.speculation_lookahead=2",
            *extra,
        ],
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", sorted(FAMILY_SWITCHES))
def test_an_imported_checkpoint_computes_what_transformers_computes(
    tmp_path, single_process, family, tied
):
    from mtp_megatron.hf.importer import load_pretrained
    from tests.cases.hf import HF_VOCAB, hf_checkpoint

    folder = hf_checkpoint(tmp_path, family, tied)
    recipe = _recipe(folder, "mtp_head_init=last_layer")
    cfg = recipe.model
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.tie_embeddings) == (
        2,
        64,
        HF_VOCAB,
        tied,
    )
    switches = (cfg.norm_placement, cfg.qk_norm, cfg.qkv_bias, cfg.qk_norm_scope)
    assert switches == FAMILY_SWITCHES[family]
    assert recipe.data.tokenizer == str(folder)
    torch.manual_seed(0)
    model = build_model(cfg, backend="local").eval()
    load_pretrained(model, recipe.init_from, recipe.mtp_head_init, log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, HF_VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    # as for the export: fp32, RoPE tables rounded differently; measured <= 5e-7
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    last = model.trunk.layers[-1].state_dict()
    for head in model.mtp.heads:  # 'last_layer': every head's block starts as that layer
        for name, tensor in head.block.state_dict().items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, last[name]), name


def test_a_checkpoint_the_trunk_cannot_compute_is_refused_by_name(tmp_path):
    import json

    from tests.cases.hf import hf_checkpoint

    folder = hf_checkpoint(tmp_path, "llama")
    config = json.loads((folder / "config.json").read_text())
    cases = [
        ({"model_type": "gemma3"}, "model_type 'gemma3'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5}}, "RoPE scaling 'yarn'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ]
    for change, named in cases:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ConfigError, match="cannot be represented") as err:
            _recipe(folder)
        assert named in str(err.value)
    with pytest.raises(ConfigError, match="no config.json"):
        _recipe(tmp_path)
    (folder / "config.json").write_text(
        json.dumps({k: v for k, v in config.items() if k != "hidden_size"})
    )
    with pytest.raises(ConfigError, match="lacks 'hidden_size'"):
        _recipe(folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="needs model.mtp.mtp_head_type='transformer'"):
        _recipe(folder, "mtp_head_init=last_layer", "model.mtp.mtp_head_type=mlp")
    with pytest.raises(ConfigError, match="needs init_from"):
        from mtp_megatron.recipe import load_recipe
        from mtp_megatron.testing.runs import DEMO_RECIPE

        load_recipe(DEMO_RECIPE, ["mtp_head_init=last_layer"])


# ---------------------------------------------------------------------------------------------
# MTP heads in transformers: MtpModel and generate(use_mtp=True)


def _until_eos(ids: torch.Tensor, eos: int) -> list[int]:
    row = ids[0].tolist()
    return row[: row.index(eos) + 1] if eos in row else row


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
@pytest.mark.parametrize("head", ["transformer", "mlp", "shared_lm_head"])
def test_transformers_drafts_with_our_exported_heads(
    tmp_path, monkeypatch, single_process, head, shared
):
    from transformers.modeling_layers import MtpModel

    from mtp_megatron import build_model as build_with_decoding
    from mtp_megatron.hf.export import mtp_key_patterns

    cfg = twin_config("exaone4", tied=False)
    cfg.mtp = MTPConfig(
        num_predict_tokens=2,
        speculation_lookahead=2,
        mtp_head_type=head,
        share_weights_across_steps=shared or head == "shared_lm_head",
    )
    folder, _ = consolidated_run(tmp_path, cfg)
    torch.manual_seed(0)  # the same weights, with the decoding package (model.mtp_decoder)
    model = build_with_decoding(cfg, backend="local").eval()
    model.load_state_dict(consolidated.load_weights(folder)[0], strict=False)
    out = export_hf(folder, tmp_path / "hf", log=lambda _: None)
    # the one line transformers needs before loading: which checkpoint keys are MTP layers
    monkeypatch.setattr(
        transformers.Exaone4ForCausalLM, "_keys_to_ignore_on_load_unexpected", mtp_key_patterns(out)
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    mtp = MtpModel.from_pretrained(hf).eval()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, return_mtp_logits=True).mtp_logits
        hidden = hf(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
        positions = torch.arange(ids.shape[1])[None]
        for k in (1, 2):  # teacher forcing: step k reads the tokens k ahead
            future = torch.cat([ids[:, k:], ids.new_zeros(1, k)], dim=1)
            hidden = mtp.forward_layer(k - 1, hidden, positions, None, input_ids=future)
            theirs = mtp._project_to_logits(hidden)
            valid = ids.shape[1] - k  # positions whose future token exists
            # as for the trunk: fp32, measured <= 5e-7
            torch.testing.assert_close(
                theirs[:, :valid], ours[k - 1][:, :valid, :VOCAB], atol=1e-5, rtol=1e-5
            )
        eos = hf.config.eos_token_id
        prompt = ids[:, :6]
        drafted = hf.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True)
        greedy, _ = model.mtp_decoder.generate(prompt, max_new_tokens=12, eos_token_id=eos)
    assert _until_eos(drafted, eos) == _until_eos(greedy, eos)


def test_heads_transformers_cannot_draft_with_go_beside_the_trunk(tmp_path, single_process):
    cfg = twin_config("exaone4", tied=False)
    cfg.mtp = MTPConfig(
        num_predict_tokens=2,
        speculation_lookahead=2,
        head_arrangement="independent",
        share_weights_across_steps=False,
    )
    folder, _ = consolidated_run(tmp_path, cfg)
    logs: list[str] = []
    out = export_hf(folder, tmp_path / "hf", log=logs.append)
    assert "transformers cannot draft with: independent (Meta) heads" in logs[0]
    config = transformers.AutoConfig.from_pretrained(out)
    assert getattr(config, "num_mtp_layers", None) is None
    # the heads beside the trunk, in our names, as trained, and what they are
    from safetensors.torch import load_file

    heads = load_file(str(out / "mtp_heads.safetensors"))
    master = consolidated.load_weights(folder)[0]
    assert heads.keys() == {k for k in master if k.startswith("mtp.")}
    assert all(torch.equal(t, master[k]) for k, t in heads.items())
    about = json.loads((out / "mtp_heads.json").read_text())
    assert about["head_arrangement"] == "independent" and "cannot draft" in about["transformers"]
    transformers.AutoModelForCausalLM.from_pretrained(out)  # the trunk loads as before


@pytest.mark.parametrize(
    ("family", "config"),
    [
        ("qwen3", {"head_dim": 32}),  # wider heads than h / n, as Qwen3-0.6B's
        (
            "llama",  # Llama-3.1's scaling, with an original context the test's 60 tokens pass
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            },
        ),
    ],
    ids=["head_dim", "llama3_rope"],
)
def test_head_dim_and_llama3_rope_import_and_export_exactly(
    tmp_path, single_process, family, config
):
    from mtp_megatron.hf.importer import load_pretrained
    from tests.cases.hf import HF_VOCAB, hf_checkpoint

    folder = hf_checkpoint(tmp_path, family, **config)
    recipe = _recipe(folder)
    assert (recipe.model.kv_channels is not None) == ("head_dim" in config)
    assert (recipe.model.rope_scaling is not None) == ("rope_parameters" in config)
    torch.manual_seed(0)
    model = build_model(recipe.model, backend="local").eval()
    load_pretrained(model, recipe.init_from, "random", log=lambda _: None)
    ids = torch.randint(0, HF_VOCAB, (1, 60), generator=torch.Generator().manual_seed(4))
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # fp32, same arithmetic
    run = tmp_path / "run"
    tensors = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
    consolidated.save_weights(run, tensors, {"step": "0"})
    (run / consolidated.RECIPE_FILE).write_text(yaml.safe_dump({"model": asdict(recipe.model)}))
    (run / consolidated.TOKENIZER_FILE).write_bytes((folder / "tokenizer.json").read_bytes())
    again = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(run, tmp_path / "exported", log=lambda _: None)
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs, atol=1e-5, rtol=1e-5)


def test_an_etd_recipe_starts_from_the_checkpoint_with_fresh_experts(tmp_path, single_process):
    from mtp_megatron import build_model as build_with_decoding
    from mtp_megatron.hf.importer import hf_state_dict, load_pretrained
    from mtp_megatron.recipe import load_recipe
    from mtp_megatron.testing.runs import REPO
    from tests.cases.hf import hf_checkpoint

    folder = hf_checkpoint(tmp_path, "olmo2", layers=4)
    recipe = load_recipe(
        REPO / "recipes" / "ablations" / "etd_mtp.yaml",  # encoder 1 / think 2 x2 / decoder 1
        [f"init_from=hf:{folder}", "model.max_seq_len=64", "mtp_head_init=last_layer"],
    )
    torch.manual_seed(0)
    model = build_with_decoding(recipe.model).eval()
    fresh = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    logs: list[str] = []
    load_pretrained(model, recipe.init_from, recipe.mtp_head_init, log=logs.append)
    hf = hf_state_dict(folder)
    state = model.state_dict()
    # the think layers' wrapped linears hold the checkpoint's weights ...
    think_q = "trunk.layers.1.attention.inner.q_proj.base.weight"
    assert torch.equal(state[think_q], hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(
        state["trunk.layers.3.mlp.norm.weight"],
        hf["model.layers.3.post_feedforward_layernorm.weight"],
    )
    # ... while the LoRA experts and routers keep their initialisation
    added = [k for k in fresh if ".lora_" in k or "router." in k]
    assert added and all(torch.equal(state[k], fresh[k]) for k in added)
    assert "LoRA-expert and router tensors: initialised" in logs[0]
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16)[None] % 512).logits).all()


def test_the_import_hf_command_checks_a_checkpoint(tmp_path, capsys):
    from mtp_megatron.__main__ import main
    from tests.cases.hf import hf_checkpoint

    folder = hf_checkpoint(tmp_path, "qwen3", tied=True)
    assert main(["import-hf", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "Qwen3ForCausalLM, 2 layers, h 64, 4 heads of 16 (2 kv)" in out and "tied" in out
    assert "every tensor used" in out and "'</s>' = " in out and f"init_from=hf:{folder}" in out
    (folder / "model.safetensors").rename(folder / "weights.bin")
    assert main(["import-hf", str(folder)]) == 2
    assert "no *.safetensors" in capsys.readouterr().err


def test_the_export_finds_the_end_token_as_the_data_did(tmp_path, single_process):
    import yaml as _yaml

    from tests.cases.indexed import tokenizer_dir

    folder, _ = consolidated_run(tmp_path, twin_config("llama"))
    (tmp_path / "t").mkdir()
    tok_dir = tokenizer_dir(tmp_path / "t", "</s>")  # its tokenizer_config.json names </s>
    recipe = _yaml.safe_load((folder / consolidated.RECIPE_FILE).read_text())
    recipe["data"] = {"tokenizer": str(tok_dir)}  # no eod_token: the directory's eos_token
    (folder / consolidated.RECIPE_FILE).write_text(_yaml.safe_dump(recipe))
    out = export_hf(folder, tmp_path / "hf", log=lambda _: None)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "</s>"
    assert transformers.AutoConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
