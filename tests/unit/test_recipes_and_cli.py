"""Recipes resolve and validate; the CLI's dry-run and params commands; meta-device counts."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtp_megatron import ConfigError, build_model
from mtp_megatron.__main__ import main
from mtp_megatron.model.params import count_parameters
from mtp_megatron.recipe import load_recipe
from mtp_megatron.testing.variants import mtp_config, tiny_model_config

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
RECIPES = sorted(RECIPES_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves_and_validates(path, tmp_path):
    overrides = []
    if "init_from" in path.read_text() or path.parent.name == "pretrained":
        pytest.importorskip("transformers")
        from tests.cases.hf import hf_checkpoint

        # a pretrained start: a tiny OLMo-2 as deep as OLMo-2 1B stands in for the download
        overrides = [f"init_from=hf:{hf_checkpoint(tmp_path, 'olmo2', layers=16)}"]
    recipe = load_recipe(path, overrides)
    assert recipe.name == path.stem
    if overrides:
        assert recipe.model.num_layers == 16 and recipe.model.qk_norm_scope == "full"


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "model:\n  hidden_size: 128\n"
        "  mtp:\n    num_predict_tokens: 2\n    speculation_lookahead: 2\n"
    )
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  num_layers: 3\n")
    r = load_recipe(tmp_path / "b.yaml", ["model.mtp.mtp_head_type=mlp"])
    assert (r.model.hidden_size, r.model.num_layers) == (128, 3)
    assert (r.model.mtp.num_predict_tokens, r.model.mtp.mtp_head_type) == (2, "mlp")
    assert load_recipe(tmp_path / "b.yaml", ["model.mtp=null"]).model.mtp is None


def test_recipe_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("model:\n  hiden_size: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'model.hiden_size'"):
        load_recipe(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_recipe(tmp_path / "e.yaml", ["parallel.tensor_parallel_size=3"])


def test_dry_run_and_params_commands(capsys, single_process):
    assert (
        main(
            [
                "dry-run",
                str(RECIPES[0]),
                "model.mtp.num_predict_tokens=2",
                "model.mtp.speculation_lookahead=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "num_predict_tokens: 2" in out and "# parameters: trunk" in out
    # model.vocab_size null: counted with the tokenizer's vocabulary
    assert "vocab_size: null" in out and "padded vocab 4096 (the tokenizer's 4096)" in out
    assert main(["dry-run", str(RECIPES[0]), "data.tokenizer=bpe:1000"]) == 0
    assert "padded vocab 1024 (the tokenizer's 1000)" in capsys.readouterr().out
    assert main(["dry-run", str(RECIPES[0]), "model.mtp.num_predict_tokens=0"]) == 2
    assert "num_predict_tokens=0" in capsys.readouterr().err
    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert "| chained | transformer | yes | 1.48B |" in out
    assert "| chained | shared_lm_head | yes | 1.48B | 0.00M | 0.0% |" in out
    assert "| independent | linear | no | 1.48B |" in out


def test_cli_turns_only_config_errors_into_exit_2(monkeypatch, capsys):
    import mtp_megatron.__main__ as cli
    import mtp_megatron.cli.train

    def broken(argv):
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(mtp_megatron.cli.train, "main_check", broken)
    with pytest.raises(ValueError, match="a bug"):  # keeps its traceback
        cli.main(["check", str(RECIPES[0])])
    assert cli.main(["sweep", "job", str(RECIPES[0]), "model.mtp.num_predict_tokens=0"]) == 2
    assert "num_predict_tokens=0" in capsys.readouterr().err
    assert cli.main(["sweep", "job", str(RECIPES[0])]) == 0


@pytest.mark.parametrize("variant", [("transformer", False, "chained"), ("mlp", True, "chained")])
def test_meta_count_equals_real_model(single_process, variant):
    cfg = tiny_model_config(mtp_config(*variant))
    count = count_parameters(cfg)
    model = build_model(cfg)
    assert count.trunk == sum(p.numel() for p in model.trunk.parameters())
    assert count.heads == sum(p.numel() for p in model.mtp.parameters()) > 0
    # unshared heads are K copies of one shared head
    shared = count_parameters(tiny_model_config(mtp_config(variant[0], True, "chained")))
    assert count.heads == (3 if not variant[1] else 1) * shared.heads
    # counted on the meta device: a 7B-parameter shape costs no memory (28 GB in fp32 here)
    big = tiny_model_config(
        mtp_config(*variant),
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_attention_heads=32,
        num_kv_heads=32,
        ffn_hidden_size=11008,
    )
    assert 6.5e9 < count_parameters(big).trunk < 7e9


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.zero_stage=4", "train.zero_stage=4"),
        ("train.steps=0", "train.steps=0"),
        ("train.precision=fp16", "train.precision='fp16'"),
        ("train.lr=0", "train.lr=0"),
        ("train.seq_len=4096", "train.seq_len=4096"),
        ("data.validation_fraction=0.9", "data.validation_fraction=0.9"),
        ("data.source=/no/such/corpus", "data.source"),
        ("parallel.tensor_parallel_size=0", "parallel.tensor_parallel_size=0"),
        ("train.zero_stage=2 parallel.pipeline_parallel_size=2", "ZeRO 0 and 1"),
        ("model.mtp.mtp_head_type=rnn", "model.mtp.mtp_head_type='rnn'"),
        ("train.not_a_field=1", "unknown key 'train.not_a_field'"),
    ],
)
def test_each_invalid_field_fails_with_its_name(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(RECIPES_DIR / "demo.yaml", override.split())


def _launch(override: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    launcher = RECIPES_DIR.parent / "launch" / "train.sh"
    return subprocess.run(
        ["bash", str(launcher), str(RECIPES_DIR / "demo.yaml"), override],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHON=sys.executable, NPROC="2", **env),
        cwd=cwd,
        timeout=120,
    )


def test_launcher_rejects_a_bad_recipe_before_starting_processes(tmp_path):
    bad = _launch("train.zero_stage=9", tmp_path)
    assert bad.returncode == 2
    assert "train.zero_stage=9" in bad.stderr
    assert "torch.distributed" not in bad.stdout + bad.stderr  # torchrun never started
    layout = _launch("parallel.tensor_parallel_size=4", tmp_path)
    assert layout.returncode == 2 and "cannot be split" in layout.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that cannot use CUDA")
def test_launcher_refuses_gpus_its_torch_cannot_use(tmp_path):
    """nvidia-smi lists a GPU but this torch has no CUDA: refused before torchrun, not N gloo
    processes silently training on the CPU."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    fake.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    env = {k: v for k, v in os.environ.items() if k != "MTP_DEVICE"}  # the suite sets cpu
    result = subprocess.run(
        ["bash", str(RECIPES_DIR.parent / "launch" / "train.sh"), str(RECIPES_DIR / "demo.yaml")],
        capture_output=True,
        text=True,
        env=dict(env, PYTHON=sys.executable, PATH=path),
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "MTP_DEVICE=cuda, but torch" in result.stderr and "MTP_DEVICE=cpu" in result.stderr
    assert "torch.distributed" not in result.stdout + result.stderr  # torchrun never started


def test_every_command_of_the_table_resolves_and_main_lists_them(capsys):
    from mtp_megatron.__main__ import COMMANDS, command

    assert all(callable(command(name)) for name in COMMANDS)
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)
    assert main(["no-such-command"]) == 2 and "unknown command" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["bench-train", "bench-memory", "etd-split", "report", "prepare", "generate"]
)
def test_commands_take_their_own_options(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"python -m mtp_megatron {command}" in capsys.readouterr().out
