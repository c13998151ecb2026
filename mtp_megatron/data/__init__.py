"""Training data: a source (the stdlib, local files, ``hf:NAME``) or blends of prepared Megatron
indexed datasets, read through megatron-core's GPTDataset in resumable, data-parallel batches.

    python -m mtp_megatron prepare corpus/ --tokenizer tok.json --output data/c   # or: on first use
    data = prepare_training_data(recipe.data, recipe.model.vocab_size, seq_len=256,
                                 train_samples=steps * global_batch, validation_samples=64, seed=0)
    batches = Batches(data, seq_len=256, micro_batch_size=8, dp_rank=r, dp_size=d)
    input_ids, labels = batches.batch(step, micro_step, grad_accum)
"""

from mtp_megatron.config.data import DataConfig

# Everything else imports torch / megatron (seconds); recipe validation only needs DataConfig,
# so the rest is imported on first use (PEP 562).
_LAZY = {
    "load_tokenizer": "mtp_megatron.data.tokenizer",
    "Batches": "mtp_megatron.data.loader",
    "eval_batches": "mtp_megatron.data.loader",
    "prefix_tokens": "mtp_megatron.data.loader",
    "prepare_training_data": "mtp_megatron.data.loader",
    "resolve_data": "mtp_megatron.data.loader",
    "TrainingData": "mtp_megatron.data.loader",
}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtp_megatron.data' has no attribute {name!r}")
