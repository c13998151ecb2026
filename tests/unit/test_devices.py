"""The GPU path, checked on the CPU: backend choice, process counts, inputs moved to the model's
device, the bf16 DeepSpeed config, and decoding's host reads."""

import os

import pytest
import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.config.train import TrainConfig
from mtp_megatron.parallel import state
from mtp_megatron.testing.variants import mtp_config, tiny_model_config


@pytest.fixture
def fake_gpus(monkeypatch):
    """torch reports CUDA with 2 devices; set_device calls are recorded, not made."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    return calls


def test_the_backend_on_cuda_serves_cpu_and_cuda_tensors():
    assert state.process_group_backend(torch.device("cuda", 0)) == "cpu:gloo,cuda:nccl"
    assert state.process_group_backend(torch.device("cpu")) == "gloo"


def test_device_choice_and_the_forced_cpu_switch(fake_gpus, monkeypatch):
    assert os.environ.get("MTP_DEVICE") == "cpu"  # conftest: the suite runs on the CPU anywhere
    assert state.default_device() == torch.device("cpu") and fake_gpus == []
    monkeypatch.delenv("MTP_DEVICE")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert state.default_device() == torch.device("cuda", 1) and fake_gpus == [1]
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"LOCAL_RANK=2, but this node has 2 GPU\(s\).*NPROC=2"):
        state.default_device()
    monkeypatch.setenv("MTP_DEVICE", "tpu")
    with pytest.raises(ValueError, match="MTP_DEVICE='tpu' is invalid"):
        state.default_device()


def test_default_process_count_is_the_gpus_of_the_node(fake_gpus, monkeypatch):
    assert state.default_process_count() == 2  # forced CPU: the CPU default
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("MTP_DEVICE")
    assert state.default_process_count() == 8


def test_decoding_moves_inputs_and_generator_to_the_model_device(single_process, monkeypatch):
    from mtp_megatron.decoding import runner

    class _Model:  # a model on the meta device: a tensor can move there, a generator cannot
        class trunk:  # noqa: N801
            class embedding:  # noqa: N801
                weight = torch.empty(4, 4, device="meta")

    made = []

    class _Generator:
        def __init__(self, device):
            made.append(device)

        def manual_seed(self, seed):
            made.append(seed)
            return self

    ids = torch.tensor([[1, 2, 3]])
    cpu_gen = torch.Generator().manual_seed(7)
    monkeypatch.setattr(runner.torch, "Generator", _Generator)
    moved, gen = runner.on_model_device(_Model, ids, cpu_gen)
    assert moved.device.type == "meta" and isinstance(gen, _Generator)
    assert made[0] == torch.device("meta") and isinstance(made[1], int)  # seeded from cpu_gen
    same, kept = runner.on_model_device(
        type("M", (), {"trunk": type("T", (), {"embedding": torch.nn.Embedding(4, 4)})}),
        ids,
        cpu_gen,
    )
    assert same is not None and kept is cpu_gen  # already on the model's device: untouched


def test_bf16_accumulates_and_reduces_gradients_in_fp32():
    from mtp_megatron.train.engine import deepspeed_config

    cfg = TrainConfig(precision="bf16", zero_stage=1, grad_accum=4)
    config = deepspeed_config(cfg, 2, torch.device("cpu"))
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["communication_data_type"] == "fp32"
    auto = deepspeed_config(TrainConfig(precision="auto"), 2, torch.device("cuda", 0))
    assert auto["data_types"] == {"grad_accum_dtype": "fp32"}  # auto is bf16 on a GPU
    assert "data_types" not in deepspeed_config(TrainConfig(), 2, torch.device("cpu"))  # fp32
    # zero_stage 'auto': ZeRO-2 on a GPU, reduce-scattering while backward runs at DP > 1
    assert auto["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert deepspeed_config(TrainConfig(), 2, torch.device("cpu"))["zero_optimization"] == {
        "stage": 1  # the CPU
    }
    piped = deepspeed_config(TrainConfig(), 2, torch.device("cuda", 0), pipeline_parallel_size=2)
    assert piped["zero_optimization"] == {"stage": 1}  # DeepSpeed's pipeline engine: ZeRO <= 1
    # ZeRO-1 in bf16 all-reduces after backward (BF16_Optimizer): no overlap is claimed
    zero1 = deepspeed_config(cfg, 2, torch.device("cuda", 0))["zero_optimization"]
    assert zero1 == {"stage": 1}
    assert "overlap_comm" not in deepspeed_config(cfg, 2, torch.device("cpu"))["zero_optimization"]
    with pytest.raises(ConfigError, match="zero_stage=0 is invalid in bf16"):
        deepspeed_config(TrainConfig(precision="bf16", zero_stage=0), 1, torch.device("cpu"))


@pytest.mark.parametrize("eos", [None, 5])
def test_decoding_reads_the_device_at_most_twice_per_token_or_round(single_process, eos):
    from mtp_megatron import build_model
    from mtp_megatron.decoding import SamplingConfig, generate_plain
    from mtp_megatron.decoding.host import HostReads

    cfg = tiny_model_config(mtp_config("transformer", True, "chained", k=3), max_seq_len=96)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    # a vocabulary token never produced keeps EOS from ending the run early
    eos_id = None if eos is None else cfg.vocab_size + 1
    before = HostReads.count
    out, _ = generate_plain(model, ids, 64, eos_token_id=eos_id)
    plain_reads = HostReads.count - before
    assert plain_reads <= 2 * 64, plain_reads
    for sampling in (SamplingConfig(), SamplingConfig(temperature=0.8)):
        before = HostReads.count
        _, stats = model.mtp_decoder.generate(
            ids,
            max_new_tokens=64,
            temperature=sampling.temperature,
            eos_token_id=eos_id,
            generator=torch.Generator().manual_seed(1),
        )
        reads = HostReads.count - before
        assert reads <= 2 * (stats["rounds"] + 1), (reads, stats["rounds"])
    greedy, _ = model.mtp_decoder.generate(ids, max_new_tokens=64, eos_token_id=eos_id)
    assert torch.equal(greedy, out)  # the bookkeeping on the host changed no token


class _HostSyncs:
    """What would make the host wait for a GPU, counted on the CPU: device -> host reads
    (``aten._local_scalar_dense``: ``.item()``, ``int()``, ``float()`` of a tensor) and host
    numbers copied to a device (``torch.tensor(x, device=...)``)."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.reads = self.copies = 0
        counter = self

        class Reads(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.reads += 1
                return func(*args, **(kwargs or {}))

        self.mode = Reads
        real = torch.tensor

        def tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                counter.copies += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, "tensor", tensor)

    def count(self, fn) -> tuple[int, int]:
        reads, copies = self.reads, self.copies
        with self.mode():
            fn()
        return self.reads - reads, self.copies - copies


class _Batches:
    def __init__(self, vocab: int):
        self.vocab = vocab

    def batch(self, step: int, micro: int, grad_accum: int):
        g = torch.Generator().manual_seed(step * 10 + micro)
        ids = torch.randint(0, self.vocab, (2, 17), generator=g)
        return ids[:, :-1], ids[:, 1:]


def test_a_training_micro_batch_makes_the_host_wait_for_nothing(single_process, monkeypatch):
    """A step's micro-batches copy no host number to the device and read nothing back: 4
    micro-batches make the same host syncs as 1 (DeepSpeed's optimizer step and the step's
    metrics, read once, make the rest)."""
    from mtp_megatron import build_model
    from mtp_megatron.parallel.dims import ParallelConfig
    from mtp_megatron.train.apply import apply_training

    syncs = _HostSyncs(monkeypatch)
    counts = {}
    for accum in (1, 4):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(mtp_config("transformer", False, "chained", k=2)))
        tcfg = TrainConfig(zero_stage=1, grad_accum=accum, micro_batch_size=2)
        setup = apply_training(model, tcfg, ParallelConfig(), torch.device("cpu"))
        setup.runner.train_step(_Batches(200), 0, accum)  # DeepSpeed's first step allocates
        counts[accum] = syncs.count(
            lambda r=setup.runner, a=accum: r.train_step(_Batches(200), 1, a)
        )
    assert counts[4] == counts[1], counts


def test_the_last_pipeline_stage_reads_no_step_from_the_device(single_process, monkeypatch):
    from mtp_megatron import build_model
    from mtp_megatron.model.loss import labels_from_input_ids
    from mtp_megatron.train.pipeline import FinalStagePipe, _Source

    torch.manual_seed(0)
    model = build_model(tiny_model_config(mtp_config("transformer", False, "chained", k=2)))
    final = FinalStagePipe(_Source(model)).train()
    final.step = 3
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    hidden = model.trunk.run_layers(model.trunk.embed(ids), torch.arange(16))
    syncs = _HostSyncs(monkeypatch)
    assert syncs.count(lambda: final.loss(hidden, (labels_from_input_ids(ids), ids))) == (0, 0)
    assert len(final.records) == 1


def test_batches_reach_a_device_pinned_and_without_a_wait(monkeypatch):
    from mtp_megatron.parallel import to_device

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t)
    ids = torch.arange(6).view(2, 3)
    assert to_device(ids, torch.device("cpu")) is ids and not pinned  # nothing to copy
    moved = to_device(ids, torch.device("meta"))  # any device but the host's
    assert moved.device.type == "meta" and pinned == [ids]
