"""MTPConfig / ModelConfig: the guide's defaults and worked example, and clear errors."""

import pytest

from mtp_megatron import ConfigError, ModelConfig, MTPConfig
from mtp_megatron.config import from_dict


def test_guide_defaults():
    cfg = MTPConfig()
    assert (cfg.num_predict_tokens, cfg.mtp_head_type, cfg.share_weights_across_steps) == (
        4,
        "transformer",
        True,
    )
    assert (cfg.loss_weight_decay, cfg.mtp_loss_weight, cfg.speculation_lookahead) == (0.5, 0.5, 3)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_predict_tokens=0), "mtp.num_predict_tokens=0"),
        (dict(mtp_head_type="lstm"), "mtp.mtp_head_type='lstm'"),
        (dict(loss_weight_decay=0.0), "mtp.loss_weight_decay=0.0"),
        (dict(loss_weight_decay=-1), "mtp.loss_weight_decay=-1"),
        (dict(mtp_loss_weight=-0.1), "mtp.mtp_loss_weight=-0.1"),
        (
            dict(num_predict_tokens=2, speculation_lookahead=3, share_weights_across_steps=False),
            "mtp.speculation_lookahead=3",
        ),
        (dict(head_arrangement="parallel"), "mtp.head_arrangement='parallel'"),
        (dict(warmup_steps=-5), "mtp.warmup_steps=-5"),
    ],
)
def test_invalid_mtp_config_names_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        MTPConfig(**kwargs).validate()
    assert field in str(err.value)


def test_tp_must_divide_heads_and_padded_vocab():
    with pytest.raises(
        ConfigError, match=r"model.num_attention_heads=4 .*tensor_parallel_size \(8\)"
    ):
        ModelConfig(num_attention_heads=4, hidden_size=256).validate(tensor_parallel_size=8)
    with pytest.raises(ConfigError, match="padded vocabulary"):
        ModelConfig(
            vocab_size=100,
            vocab_pad_multiple=1,
            hidden_size=96,
            num_attention_heads=3,
            ffn_hidden_size=96,
            num_kv_heads=3,
        ).validate(tensor_parallel_size=3)
    with pytest.raises(ConfigError, match="num_kv_heads"):
        ModelConfig(num_attention_heads=4, num_kv_heads=3).validate()
    ModelConfig().validate(tensor_parallel_size=4)


def test_from_dict_rejects_unknown_and_mistyped_keys():
    cfg = from_dict(ModelConfig, {"hidden_size": 128, "mtp": {"num_predict_tokens": 2}})
    assert cfg.hidden_size == 128 and cfg.mtp.num_predict_tokens == 2
    assert from_dict(ModelConfig, {"mtp": None}).mtp is None
    assert from_dict(ModelConfig, {"norm_eps": "1e-5"}).norm_eps == 1e-5  # YAML's 1e-5 string
    with pytest.raises(ConfigError, match="unknown key 'mtp.num_heads'.*num_predict_tokens"):
        from_dict(ModelConfig, {"mtp": {"num_heads": 2}})
    with pytest.raises(ConfigError, match="hidden_size='big'.*integer"):
        from_dict(ModelConfig, {"hidden_size": "big"})
    with pytest.raises(ConfigError, match="mtp_head_type='rnn'"):
        from_dict(ModelConfig, {"mtp": {"mtp_head_type": "rnn"}})


def test_parallel_dims_validates_the_layout_once():
    from mtp_megatron.config import ETDConfig
    from mtp_megatron.parallel.dims import ParallelConfig, ParallelDims, check_model_layout

    dims = ParallelDims(world=16, tp=2, pp=2)
    assert (dims.dp, dims.describe()) == (4, "world=16 = PP 2 x TP 2 x DP 4")
    with pytest.raises(ConfigError) as err:
        ParallelDims(world=6, tp=2, pp=2)
    message = str(err.value)  # the arithmetic, and the process counts that would work
    assert "needs a multiple of 2 x 2 = 4 (6 / 4 = 1.5)" in message and "launch 4 or 8" in message
    with pytest.raises(ConfigError, match="at least one process"):
        ParallelDims(world=0, tp=1, pp=1)
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        ParallelDims(world=4, tp=0, pp=1)
    parallel = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=5)
    with pytest.raises(ConfigError, match="every pipeline stage needs at least one decoder layer"):
        check_model_layout(ModelConfig(num_layers=4), parallel)
    with pytest.raises(ConfigError, match="model.num_attention_heads=3 .*tensor_parallel_size"):
        check_model_layout(ModelConfig(num_attention_heads=3, hidden_size=192), parallel)
    etd = ModelConfig(
        num_layers=4, etd=ETDConfig(n_encoder_layers=1, n_think_layers=2, n_decoder_layers=1)
    )
    with pytest.raises(
        ConfigError, match="model.etd with parallel.pipeline_parallel_size=2 is not"
    ):
        check_model_layout(etd, ParallelConfig(pipeline_parallel_size=2))
    check_model_layout(
        ModelConfig(num_layers=4), ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=4)
    )
