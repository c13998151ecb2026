"""Training data: corpus -> deterministic split -> byte-level BPE -> cached token streams ->
resumable, data-parallel batches.

    data = prepare_data(DataConfig(source="stdlib"), vocab_size=4096)
    batches = TokenBatches(data.train, seq_len=256, micro_batch_size=8, dp_rank=r, dp_size=d,
                           seed=cfg.shuffle_seed)
    input_ids, labels = batches.batch(step, micro_step, grad_accum)
"""

from mtp_megatron.data.config import DataConfig

# Everything else imports torch / datasets (seconds); recipe validation only needs DataConfig,
# so the rest is imported on first use (PEP 562).
_LAZY = {
    "EOT_TOKEN": "mtp_megatron.data.tokenizer",
    "load_tokenizer": "mtp_megatron.data.tokenizer",
    "TokenBatches": "mtp_megatron.data.loader",
    "eval_batches": "mtp_megatron.data.loader",
    "PreparedData": "mtp_megatron.data.prepare",
    "prepare_data": "mtp_megatron.data.prepare",
    "prepare_data_distributed": "mtp_megatron.data.prepare",
}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtp_megatron.data' has no attribute {name!r}")
