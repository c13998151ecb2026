"""Training data: corpus -> deterministic split -> byte-level BPE -> cached token streams ->
resumable, data-parallel batches.

    data = prepare_data(DataConfig(source="stdlib"), vocab_size=4096)
    batches = TokenBatches(data.train, seq_len=256, micro_batch_size=8, dp_rank=r, dp_size=d,
                           seed=cfg.shuffle_seed)
    input_ids, labels = batches.batch(step, micro_step, grad_accum)
"""

from mtp_megatron.data.config import DataConfig
from mtp_megatron.data.loader import TokenBatches, eval_batches
from mtp_megatron.data.prepare import PreparedData, prepare_data, prepare_data_distributed
from mtp_megatron.data.tokenizer import EOT_TOKEN, load_tokenizer

__all__ = [
    "EOT_TOKEN",
    "DataConfig",
    "PreparedData",
    "TokenBatches",
    "eval_batches",
    "load_tokenizer",
    "prepare_data",
    "prepare_data_distributed",
]
