"""Pipeline parallelism on DeepSpeed's pipeline engine (gloo): PP=2 and PP=2 x TP=2 against PP=1,
heads on the last stage only, the rank layout, exact resume, decoding a PP=2 checkpoint in one
process, and the layouts refused before launch."""

from pathlib import Path

import pytest
import torch

from mtp_megatron import ConfigError
from mtp_megatron.recipe import load_recipe
from mtp_megatron.testing.distributed import gather_full_tensor, run_distributed
from mtp_megatron.testing.tolerance import VALUE_RTOL, assert_close_to_scale
from mtp_megatron.testing.variants import mtp_config, randomize_norm_weights, tiny_model_config
from mtp_megatron.train.pipeline_layout import partition_decoder_layers

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
SEQ, MICRO_BATCH, GRAD_ACCUM, STEP = 16, 2, 2, 5

# (head type, shared, arrangement, tie_embeddings, partition, memory savers): every head type,
# chained and independent, with and without the embedding tie across the first and last stage;
# the memory savers (sequential MTP forward, activation checkpointing) must not change a thing
VARIANTS = [
    ("transformer", True, "chained", False, "uniform", False),
    ("mlp", False, "independent", False, "parameters", False),
    ("shared_lm_head", True, "chained", True, "uniform", False),
    ("transformer", False, "chained", True, "uniform", True),
    ("linear", False, "independent", True, "parameters", True),
]


def _config(variant):
    head, shared, arrangement, tie = variant[:4]
    mtp = mtp_config(head, shared, arrangement, k=3)
    mtp.warmup_steps = 10  # w(STEP) = w / 2: the step must reach the last stage
    return tiny_model_config(mtp, tie_embeddings=tie, num_layers=4, max_seq_len=SEQ)


def _model(cfg, savers: bool = False):
    from mtp_megatron import MTPTrainingConfig, build_model
    from mtp_megatron.train.apply import apply_mtp_training

    torch.manual_seed(0)  # every rank builds the PP=1 master weights, then keeps its pieces
    model = build_model(cfg)
    savings = MTPTrainingConfig(sequential_forward=savers, gradient_checkpointing=savers)
    apply_mtp_training(model, savings)
    randomize_norm_weights(model)
    return model


def _batches(cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (GRAD_ACCUM, MICRO_BATCH, SEQ + 1), generator=g)
    return [(x[:, :-1].contiguous(), x[:, 1:].contiguous()) for x in ids]


def _reference(variant) -> dict:
    """PP=1, TP=1 in this process: per-micro-batch losses and the gradient of their mean."""
    cfg = _config(variant)
    model = _model(cfg)
    losses, steps = [], []
    for input_ids, labels in _batches(cfg):
        out = model(input_ids, labels=labels, step=STEP)
        (out.loss / GRAD_ACCUM).backward()
        losses.append(out.loss.detach())
        steps.append(dict(out.mtp_step_losses))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"losses": losses, "steps": steps, "grads": grads}


def _pipeline_run(rank: int, world: int, tp: int, variants):
    """Each variant on the pipeline engine: losses, gathered gradients by MTPModel name, layout."""
    from deepspeed.runtime.pipe import schedule

    from mtp_megatron.config.train import TrainConfig
    from mtp_megatron.parallel import initialize_parallel, tensor_parallel_group
    from mtp_megatron.train.pipeline import layout_groups
    from mtp_megatron.train.pipeline_engine import build_pipeline_engine, micro_batches
    from mtp_megatron.train.pipeline_layout import module_key

    initialize_parallel(tensor_parallel_size=tp, pipeline_parallel_size=world // tp)
    tcfg = TrainConfig(micro_batch_size=MICRO_BATCH, grad_accum=GRAD_ACCUM, zero_stage=1)
    results = {}
    for variant in variants:
        cfg = _config(variant)
        model = _model(cfg, savers=variant[5])
        engine = build_pipeline_engine(model, tcfg, variant[4], torch.device("cpu"))
        module = engine.module
        captured = {}
        reduce_tied = engine._INSTRUCTION_MAP[schedule.ReduceTiedGrads]

        def capture(self, _reduce=reduce_tied, _out=captured, _layers=cfg.num_layers, **kwargs):
            _reduce(self, **kwargs)  # gradients of every micro-batch, tied copies summed
            for name, p in self.module.named_parameters():
                full = gather_full_tensor(p.grad, p, tensor_parallel_group())
                _out[module_key(name, _layers)] = full

        engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, schedule.ReduceTiedGrads: capture}
        final = module.final_stage
        if final is not None:  # the step runner's job: w(STEP) on the last stage
            final.step = STEP
        engine.train_batch(micro_batches(_batches(cfg), torch.device("cpu")))
        results[variant] = {
            "stage": engine.stage_id,
            "grads": captured,
            "records": torch.stack(final.records) if final is not None else None,
            "bounds": module.decoder_layer_bounds,
            "grad_norm": float(engine.get_global_grad_norm()),
        }
    results["layout"] = layout_groups(module.topology())
    return results


def _check_against_reference(ranks: list[dict], variants, stages: int) -> None:
    for variant in variants:
        ref = _reference(variant)
        names_by_stage: dict[int, set[str]] = {}
        for got in (r[variant] for r in ranks):
            names_by_stage.setdefault(got["stage"], set()).update(got["grads"])
            if got["records"] is not None:  # the last stage: [loss, main, mtp, w, active, CE_1..3]
                assert got["stage"] == stages - 1
                for micro, loss in enumerate(ref["losses"]):
                    # PP moves ops between processes; TP reorders fp32 sums: rounding only
                    assert_close_to_scale(got["records"][micro, 0], loss, VALUE_RTOL)
                    assert got["records"][micro, 3].item() == pytest.approx(0.25)  # w(5) = 0.5/2
                    assert got["records"][micro, 4].item() == 3  # every MTP step
                    for k in range(1, 4):
                        assert_close_to_scale(
                            got["records"][micro, 4 + k],
                            ref["steps"][micro][f"mtp_step_{k}"],
                            VALUE_RTOL,
                        )
            for name, g in got["grads"].items():
                assert_close_to_scale(g, ref["grads"][name], msg=f"{variant} grad {name}")
            # DeepSpeed's ZeRO-1 norm over stages and TP shards, the tied copy counted once
            ref_norm = torch.stack([g.norm() for g in ref["grads"].values()]).norm().item()
            assert got["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
        # every parameter is on some stage; the MTP heads (and the output layer, and the tied
        # embedding copy when the last stage reads it) only on the last
        assert set().union(*names_by_stage.values()) == set(ref["grads"])
        head, shared, arrangement, tie = variant[:4]
        has_heads = any(n.startswith("mtp.") for n in ref["grads"])
        for stage, names in names_by_stage.items():
            last = stage == stages - 1
            assert any(n.startswith("mtp.") for n in names) == (last and has_heads), stage
            assert ("trunk.output_layer.weight" in names) == (last and not tie)
            embedding_here = "trunk.embedding.weight" in names
            assert embedding_here == (not last or tie or arrangement == "chained"), stage


def test_pp2_matches_pp1(single_process):
    ranks = run_distributed(_pipeline_run, 2, 1, VARIANTS)
    _check_against_reference(ranks, VARIANTS, stages=2)
    # 'uniform' splits 4 layers 2 + 2; 'parameters' moves a layer away from the stage that also
    # holds the heads and the output layer
    assert ranks[0][VARIANTS[0]]["bounds"] == [0, 2, 4]
    assert ranks[0][VARIANTS[1]]["bounds"] == [0, 3, 4]


def test_pp2_tp2_matches_tp1_pp1(single_process):
    """4 processes: PP=2 x TP=2; the grid's TP / DP / PP groups are megatron's."""
    variants = [VARIANTS[0], VARIANTS[2]]
    ranks = run_distributed(_pipeline_run, 4, 2, variants)
    _check_against_reference(ranks, variants, stages=2)
    # megatron's order tp-cp-ep-dp-pp and DeepSpeed's [pipe, data, model]: rank = tp + 2 pp
    for rank, result in enumerate(ranks):
        for axis, groups in result["layout"].items():
            assert groups["deepspeed"] == groups["megatron"], (rank, axis, groups)
        assert result["layout"]["tensor"]["megatron"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert result["layout"]["pipeline"]["megatron"] == [rank % 2, rank % 2 + 2]


# -- training through the trainer: exact resume, TensorBoard, decoding in one process -----------


def _overrides(run_dir: Path, cache: Path, **extra) -> list[str]:
    base = {
        "data.tokenizer": "bpe:512",
        "model.hidden_size": 64,
        "model.num_layers": 3,
        "model.num_attention_heads": 4,
        "model.max_seq_len": 64,
        "model.mtp.num_predict_tokens": 2,
        "model.mtp.speculation_lookahead": 2,
        "model.mtp.warmup_steps": 4,
        # 0, 0, 1, 1, 2, 2 steps train: the resume at step 3 crosses a stage switch
        "train.mtp.curriculum": "forward",
        "parallel.pipeline_parallel_size": 2,
        "train.steps": 6,
        "train.micro_batch_size": 2,
        "train.grad_accum": 2,
        "train.zero_stage": 1,
        "train.lr_warmup_steps": 2,
        "train.eval_every": 0,
        "train.eval_batches": 2,
        "train.checkpoint_every": 0,
        "train.log_every": 1,
        "train.run_dir": str(run_dir),
        "data.max_files": 60,
        "data.cache_dir": str(cache),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


PROBE = torch.arange(2 * 24).view(2, 24) * 7 % 500  # a fixed batch for the greedy tokens


def _train_resume_probe(rank: int, world: int, full: list[str], part: list[str]):
    """Uninterrupted run, then a run stopped after 3 steps and resumed; the resumed model's
    greedy (argmax) tokens of every head on PROBE, from the last stage."""
    import mtp_megatron.train.pipeline_engine as pipeline_engine
    import mtp_megatron.train.trainer as trainer
    from mtp_megatron.model.loss import labels_from_input_ids
    from mtp_megatron.parallel import gather_last_dim, tensor_parallel_group
    from mtp_megatron.train.pipeline_engine import PipelineSteps

    demo = REPO / "recipes" / "demo.yaml"
    engines = []
    build = pipeline_engine.build_pipeline_engine  # apply_training imports it when it runs

    def keep(*args, **kwargs):
        engines.append(build(*args, **kwargs))
        return engines[-1]

    pipeline_engine.build_pipeline_engine = keep
    uninterrupted = trainer.train(load_recipe(demo, full))
    first = trainer.train(load_recipe(demo, part), stop_after_steps=3)
    second = trainer.train(load_recipe(demo, part))
    engine = engines[-1]
    PipelineSteps(engine, 2).evaluate([(PROBE, labels_from_input_ids(PROBE))])
    tokens = None
    final = engine.module.final_stage
    if final is not None:
        out = final.last_output
        group = tensor_parallel_group()
        logits = [out.logits, *out.mtp_logits]  # [b, s, V/p] each
        tokens = torch.stack([gather_last_dim(x, group).argmax(-1) for x in logits])
    return {
        "full": uninterrupted.losses,
        "first": first.losses,
        "second": second.losses,
        "eval": second.eval,
        "stage": engine.stage_id,
        "tokens": tokens,
    }


@pytest.fixture(scope="module")
def pp2_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp2")
    full = _overrides(tmp / "full", tmp / "cache")
    part = _overrides(tmp / "part", tmp / "cache")
    return tmp, run_distributed(_train_resume_probe, 2, full, part)


def test_pp2_training_resumes_exactly(pp2_runs):
    tmp, ranks = pp2_runs
    for out in ranks:  # every rank reports the last stage's losses
        assert sorted(out["first"]) == [0, 1, 2] and sorted(out["second"]) == [3, 4, 5]
        resumed = {**out["first"], **out["second"]}
        assert resumed == out["full"], (resumed, out["full"])  # bit for bit
    assert ranks[0]["eval"] == ranks[1]["eval"] and "val/acc_mtp_step_2" in ranks[0]["eval"]
    assert (tmp / "part" / "checkpoints" / "latest").read_text() == "step_000006"
    # the per-step MTP losses reached rank 0's TensorBoard, one value per step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb_dir,) = [p for p in (tmp / "full").iterdir() if p.is_dir() and p.name != "checkpoints"]
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    active = [e.value for e in events.Scalars("train/mtp_active_steps")]
    assert active == [0, 0, 1, 1, 2, 2]  # the forward curriculum, on the last stage
    assert [e.step for e in events.Scalars("train/mtp_step_1")] == [3, 4, 5, 6]
    assert [e.step for e in events.Scalars("train/mtp_step_2")] == [5, 6]
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([ranks[0]["full"][s] for s in range(6)])


def test_pp2_checkpoint_decodes_in_one_process(pp2_runs, single_process):
    from mtp_megatron.decoding.load import load_run

    tmp, ranks = pp2_runs
    ckpt = tmp / "part" / "checkpoints" / "step_000006"
    assert sorted(p.name for p in ckpt.glob("layer_*")) == [
        f"layer_{i:02d}-model_00-model_states.pt"
        for i in range(5)  # embed, 3 layers, heads
    ]
    run = load_run(tmp / "part")  # this process: PP=1, TP=1
    (pp_tokens,) = [r["tokens"] for r in ranks if r["tokens"] is not None]
    with torch.no_grad():
        out = run.model(PROBE, return_mtp_logits=True)
    tokens = torch.stack([x.argmax(-1) for x in [out.logits, *out.mtp_logits]])
    assert torch.equal(tokens, pp_tokens)  # the main head and both MTP heads, every position
    generated, stats = run.model.mtp_decoder.generate(PROBE[:1, :8], max_new_tokens=6)
    assert stats["new_tokens"] == 6
    # greedy: the first new token is the training-time model's argmax after the prompt
    assert generated[0, 8].item() == pp_tokens[0, 0, 7].item()


# -- layouts refused before launch -------------------------------------------------------------


def test_invalid_pipeline_layouts_fail_before_launch(capsys):
    from mtp_megatron.__main__ import main

    demo = REPO / "recipes" / "small.yaml"  # 4 decoder layers
    with pytest.raises(ConfigError, match="every pipeline stage needs at least one decoder layer"):
        load_recipe(demo, ["parallel.pipeline_parallel_size=5"])
    for zero in (2, 3):
        with pytest.raises(ConfigError, match="ZeRO 0 and 1 only"):
            load_recipe(demo, ["parallel.pipeline_parallel_size=2", f"train.zero_stage={zero}"])
    with pytest.raises(ConfigError, match="clipping norm over the wrong parameters"):
        load_recipe(demo, ["parallel.pipeline_parallel_size=2", "train.zero_stage=0"])
    load_recipe(
        demo, ["parallel.pipeline_parallel_size=2", "train.zero_stage=0", "train.grad_clip=0"]
    )
    with pytest.raises(ConfigError, match="pipeline_partition"):
        load_recipe(demo, ["parallel.pipeline_partition=greedy"])
    # PP x TP x DP must be the world: checked by `check --nproc` (launch/train.sh) and the trainer
    pp2_tp2 = ["parallel.pipeline_parallel_size=2", "parallel.tensor_parallel_size=2"]
    assert main(["check", str(demo), *pp2_tp2, "--nproc", "6"]) == 2
    assert (
        "6 processes cannot be split into tensor_parallel_size (2) x pipeline_parallel_size (2)"
        in capsys.readouterr().err
    )
    assert main(["check", str(demo), *pp2_tp2, "--nproc", "8"]) == 0
    recipe = load_recipe(REPO / "recipes" / "ablations" / "pp2.yaml")
    assert (recipe.parallel.pipeline_parallel_size, recipe.train.zero_stage) == (2, 1)


def test_partition_decoder_layers():
    assert partition_decoder_layers(4, 2, "uniform") == [0, 2, 4]
    assert partition_decoder_layers(5, 2, "uniform") == [0, 3, 5]  # DeepSpeed's: first takes more
    assert partition_decoder_layers(5, 5, "uniform") == [0, 1, 2, 3, 4, 5]
    # heads + output layer cost 3 layers: the last stage gets one decoder layer
    assert partition_decoder_layers(6, 2, "parameters", (1, 1, 3)) == [0, 4, 6]
    assert partition_decoder_layers(6, 3, "parameters", (0, 1, 0)) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="at least as many decoder layers"):
        partition_decoder_layers(2, 3)
