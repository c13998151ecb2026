"""An exported run evaluates under lm-eval's own ``hf`` model, and the scores it reports are the
ones our model's log-likelihoods give on the same items (a tiny local task made here: no
download)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from mtp_megatron.hf.export import export_hf
from tests.cases.hf import consolidated_run, twin_config

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

VOCAB = 400
MC = [
    {"question": f"def f{i}(x):", "choices": [" return x", " pass", " yield x"], "answer": i % 3}
    for i in range(6)
]
DOCS = [f"def g{i}(y):\n    return y * {i}  # scaled\n" for i in range(4)]


def _tasks(tmp: Path) -> Path:
    """A multiple-choice and a perplexity task over local jsonl files, as lm-eval YAML."""
    (tmp / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    (tmp / "ppl.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    folder = tmp / "tasks"
    folder.mkdir()
    common = "test_split: test\ndataset_path: json\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files: {{test: {tmp / 'mc.jsonl'}}}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )
    (folder / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\n{common}dataset_kwargs:\n  data_files: {{test: {tmp / 'ppl.jsonl'}}}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n    aggregation: bits_per_byte\n"
        "    higher_is_better: false\n"
    )
    return folder


def _loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    """log P(continuation | context) under our model (softmax over the real vocabulary: the
    export drops the padding rows)."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits[0, :, :VOCAB]  # [s-1, V]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    positions = range(len(context) - 1, ids.shape[1] - 1)
    return sum(logprobs[p, ids[0, p + 1]].item() for p in positions)


def test_lm_eval_scores_the_export_as_our_model_does(tmp_path, single_process):
    from lm_eval.tasks import TaskManager

    cfg = dataclasses.replace(twin_config("exaone4"), max_seq_len=64)  # one window per document
    folder, model = consolidated_run(tmp_path, cfg)
    out = export_hf(folder, tmp_path / "hf", log=lambda _: None)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={out},dtype=float32",
        tasks=["tiny_mc", "tiny_ppl"],
        task_manager=TaskManager(include_path=str(_tasks(tmp_path))),
        log_samples=True,
        batch_size=1,
        device="cpu",
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    # multiple choice: every choice's log-likelihood, and the accuracy they give
    correct = []
    for sample in results["samples"]["tiny_mc"]:
        ours = []
        for (context, continuation), ((theirs, _),) in zip(sample["arguments"], sample["resps"]):
            context_ids = encode(context)  # lm-eval splits the encoded whole after the context
            whole = encode(context + continuation)
            ll = _loglikelihood(model, context_ids, whole[len(context_ids) :])
            # fp32 forwards on both sides (theirs in transformers), summed over a few tokens
            assert ll == pytest.approx(theirs, abs=1e-3)
            ours.append(ll)
        correct.append(float(max(range(len(ours)), key=ours.__getitem__) == sample["target"]))
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(MC))
    # perplexity: each document scored after the end-of-document token, as lm-eval's prefix
    total_ll = 0.0
    for sample, doc in zip(results["samples"]["tiny_ppl"], DOCS):
        ll = _loglikelihood(model, [tok.eos_token_id], encode(doc))
        assert ll == pytest.approx(sample["resps"][0][0], abs=1e-3)
        total_ll += ll
    bits = -total_ll / sum(len(d.encode()) for d in DOCS) / math.log(2)
    assert results["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bits, rel=1e-5)
