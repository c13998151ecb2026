"""The induction study's synthetic task and its metric (``research induction``); the acceptance
study's batch layout on any process count."""

from __future__ import annotations

import pytest
import torch

from mtp_megatron.research.induction import SEQ, SPAN, VOCAB, induction_accuracy, induction_batch


def test_induction_batches_repeat_one_span_and_mask_its_predictable_labels():
    ids, mask = induction_batch(64, torch.Generator().manual_seed(0))
    assert ids.shape == mask.shape == (64, SEQ)
    assert ids.max() < VOCAB
    for row in range(64):
        where = mask[row].nonzero().flatten()
        assert len(where) == SPAN - 1 and (where.diff() == 1).all()  # one contiguous run
        second = int(where[0])  # the second copy starts here; its labels follow it
        copy = ids[row, second : second + SPAN]
        earlier = [s for s in range(second - SPAN + 1) if torch.equal(ids[row, s : s + SPAN], copy)]
        assert earlier, row  # the span occurs before, whole


def test_induction_accuracy_counts_only_the_masked_next_tokens():
    ids, mask = induction_batch(8, torch.Generator().manual_seed(1))
    perfect = torch.full((8, SEQ, VOCAB), -1.0)
    perfect[:, :-1].scatter_(-1, ids[:, 1:, None], 1.0)  # predicts every next token
    assert induction_accuracy(perfect, ids, mask) == 1.0
    wrong = perfect.clone()
    wrong[mask] = -perfect[mask]  # wrong exactly where induction is scored
    assert induction_accuracy(wrong, ids, mask) == 0.0


def test_the_acceptance_study_keeps_its_global_batch_on_any_process_count():
    from mtp_megatron.research.acceptance import same_global_batch

    assert same_global_batch(2) == {}  # the reference's own layout: its runs stay reusable
    assert same_global_batch(1) == {"train.micro_batch_size": 8, "train.grad_accum": 1}
    assert same_global_batch(8) == {"train.micro_batch_size": 1, "train.grad_accum": 1}
    with pytest.raises(ValueError, match="cannot share 8 sequences"):
        same_global_batch(3)
