"""Self-speculative decoding: lossless greedy, exact sampling, KV cache, batches, errors."""

import math

import pytest
import torch

from mtp_megatron import build_model
from mtp_megatron.decoding import generate_plain
from mtp_megatron.testing.variants import tiny_model_config, valid_combinations
from tests.cases.decoding import random_prompts, tiny_mtp_model

VARIANTS = valid_combinations(k=3)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(map(str, v)))
def test_greedy_equals_plain_and_drafts_follow_the_heads(single_process, variant):
    model = tiny_mtp_model(variant)
    cfg = model.cfg
    for seed in range(3):
        prompts = random_prompts(cfg, 3, 5 + 2 * seed, seed)
        plain, pstats = generate_plain(model, prompts, 24)
        assert pstats["tokens_per_forward"] == 1.0
        for lookahead in (1, 2, 3):
            out, stats = model.mtp_decoder.generate(
                prompts, max_new_tokens=24, lookahead=lookahead, record_drafts=True
            )
            assert torch.equal(out, plain), (seed, lookahead)
            assert stats["new_tokens"] == 3 * 24
            # Every draft whose inputs were committed is exactly what the teacher-forced training
            # forward predicts at that position (so the cached head states are the right ones).
            with torch.no_grad():
                tf = model(out, return_mtp_logits=True)
            preds = [lg[..., : cfg.vocab_size].argmax(-1) for lg in tf.mtp_logits]
            checked = 0
            for p, drafts, accepted in stats["drafts"]:
                for r in range(3):
                    for k in range(1, lookahead + 1):
                        if (k > 1 and accepted[r] < k - 1) or p[r] + k >= out.shape[1]:
                            break  # input drafts rejected, or past the returned tokens
                        assert preds[k - 1][r, p[r]] == drafts[r, k - 1], (r, int(p[r]), k)
                        checked += 1
            assert checked >= 24


@pytest.mark.parametrize("variant", [VARIANTS[0], ("transformer", False, "independent")])
def test_reduced_draft_vocabulary_keeps_greedy_output(single_process, variant):
    """Drafts restricted to half the vocabulary: every draft is in it, output still plain."""
    model = tiny_mtp_model(variant)
    V = model.cfg.vocab_size
    allowed = torch.randperm(V, generator=torch.Generator().manual_seed(0))[: V // 2]
    prompts = random_prompts(model.cfg, 3, 6, 1)
    plain, _ = generate_plain(model, prompts, 24)
    out, stats = model.mtp_decoder.generate(
        prompts, max_new_tokens=24, lookahead=3, draft_vocab=allowed, record_drafts=True
    )
    assert torch.equal(out, plain)
    drafted = torch.cat([d.flatten() for _, d, _ in stats["drafts"]])
    assert torch.isin(drafted, allowed).all()
    # the full vocabulary as "reduced" one proposes exactly the unrestricted drafts
    _, full = model.mtp_decoder.generate(prompts, 24, lookahead=3, record_drafts=True)
    _, same = model.mtp_decoder.generate(
        prompts, 24, lookahead=3, record_drafts=True, draft_vocab=list(range(V))
    )
    for (_, a, _), (_, b, _) in zip(full["drafts"], same["drafts"]):
        assert torch.equal(a, b)


def test_frequent_token_ids_and_draft_vocab_errors(single_process):
    from mtp_megatron.decoding.draft_vocab import frequent_token_ids

    stream = torch.tensor([5, 5, 5, 1, 1, 7, 7, 7, 7, 2])
    assert frequent_token_ids(stream, 3, 10).tolist() == [1, 5, 7]  # sorted ids of the top 3
    with pytest.raises(ValueError, match="draft vocabulary size 11"):
        frequent_token_ids(stream, 11, 10)
    model = tiny_mtp_model(VARIANTS[0])
    prompts = random_prompts(model.cfg, 1, 4, 0)
    with pytest.raises(ValueError, match="outside 0"):
        model.mtp_decoder.generate(prompts, 4, draft_vocab=[0, model.cfg.vocab_size])
    with pytest.raises(ValueError, match="non-empty 1-D"):
        model.mtp_decoder.generate(prompts, 4, draft_vocab=[])


def test_kv_cache_decoding_equals_recomputation(single_process):
    model = tiny_mtp_model(VARIANTS[0])
    prompts = random_prompts(model.cfg, 2, 6, 0)
    cached, _ = generate_plain(model, prompts, 20)
    full, _ = generate_plain(model, prompts, 20, use_cache=False)
    assert torch.equal(cached, full)


@pytest.mark.parametrize("variant", [VARIANTS[0], ("mlp", False, "independent")])
def test_batch_equals_per_row(single_process, variant):
    model = tiny_mtp_model(variant, seed=1)
    prompts = random_prompts(model.cfg, 4, 6, 5)
    batched, _ = model.mtp_decoder.generate(prompts, max_new_tokens=20, lookahead=3)
    for r in range(4):
        single, _ = model.mtp_decoder.generate(prompts[r : r + 1], max_new_tokens=20, lookahead=3)
        assert torch.equal(batched[r : r + 1], single), r


@pytest.mark.parametrize("corrupt", [0.0, 0.3])
def test_accept_and_rollback_with_oracle_drafts(single_process, monkeypatch, corrupt):
    """Drafts taken from the true greedy continuation (some corrupted): every correct leading
    draft is accepted, the first wrong one and all after it are rejected, and the caches roll
    back so that the output is still exactly plain greedy decoding."""
    from mtp_megatron.decoding.drafters import HeadDrafter
    from mtp_megatron.decoding.rounds import Draft

    model = tiny_mtp_model(("transformer", True, "chained"), seed=2)
    prompts = random_prompts(model.cfg, 2, 5, 0)
    n_new, lookahead = 30, 3
    plain, _ = generate_plain(model, prompts, n_new + lookahead + 2)
    noise = torch.Generator().manual_seed(1)
    expected_m = []

    def oracle(self, state):
        p = state.p
        truth = torch.stack([plain[r, p[r] + 2 : p[r] + 2 + lookahead] for r in range(len(p))])
        wrong = torch.rand(truth.shape, generator=noise) < corrupt
        drafts = torch.where(wrong, (truth + 1) % model.cfg.vocab_size, truth)
        expected_m.append((~wrong).long().cumprod(-1).sum(-1))
        return Draft(drafts)

    monkeypatch.setattr(HeadDrafter, "draft", oracle)
    out, stats = model.mtp_decoder.generate(
        prompts, max_new_tokens=n_new, lookahead=lookahead, record_drafts=True
    )
    assert torch.equal(out, plain[:, : out.shape[1]])
    for (p, _drafts, accepted), m in zip(stats["drafts"], expected_m):
        active = (p + 2 - prompts.shape[1]) < n_new
        assert torch.equal(accepted[active], m[active])
    if corrupt == 0.0:
        assert stats["avg_acceptance_rate"] == 1.0
        assert stats["rounds"] == -(-(n_new - 1) // (lookahead + 1))  # ceil((n-1)/(L+1))
        assert stats["speedup"] == pytest.approx(n_new / (stats["rounds"] + 1))
    else:
        assert 0.2 < stats["avg_acceptance_rate"] < 0.9


def _sequence_probs(model, prompt, n, temperature, top_k):
    """Exact probability of every length-n continuation (small vocab), by enumeration."""
    from mtp_megatron.decoding.sampling import SamplingConfig, target_probs

    cfg = SamplingConfig(temperature=temperature, top_k=top_k)
    V = model.cfg.vocab_size
    probs = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in probs.items():
            ids = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long)], dim=1)
            with torch.no_grad():
                logits = model(ids).logits[0, -1, :V]
            dist = target_probs(logits[None], cfg)[0]
            for tok in dist.nonzero().flatten().tolist():
                nxt[prefix + (tok,)] = pr * float(dist[tok])
        probs = nxt
    return probs


@pytest.mark.parametrize(
    "spec_temp, draft_vocab",
    [(0.0, None), (1.0, None), (1.0, [0, 2, 3, 5, 8, 9, 11, 14])],
    ids=["greedy-drafts", "sampled-drafts", "sampled-drafts-reduced-vocab"],
)
def test_speculative_sampling_keeps_the_distribution(single_process, spec_temp, draft_vocab):
    """Chi-square goodness of fit of the first 3 sampled tokens against exact enumeration.

    top_k=3 keeps 27 possible continuations; N=3000 samples. The test fails when the p-value is
    below 1e-4: a correct sampler fails it once in 10,000 runs (and the seed is fixed). With a
    reduced draft vocabulary (half the tokens) q is zero elsewhere: still exact.
    """
    model = tiny_mtp_model(
        ("transformer", True, "chained"), seed=3, vocab_size=16, vocab_pad_multiple=16
    )
    prompt = torch.tensor([[1, 5, 7, 2]])
    exact = _sequence_probs(model, prompt, 3, temperature=1.0, top_k=3)
    n = 3000
    gen = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    prompts = prompt.expand(n, -1)
    out, _ = model.mtp_decoder.generate(
        prompts,
        max_new_tokens=3,
        temperature=1.0,
        top_k=3,
        lookahead=2,
        speculation_temperature=spec_temp,
        generator=gen,
        draft_vocab=draft_vocab,
    )
    for row in out[:, 4:7].tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert set(counts) <= set(exact), "sampled a continuation of probability 0"
    chi2 = sum((counts.get(s, 0) - n * p) ** 2 / (n * p) for s, p in exact.items())
    dof = len(exact) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(chi2 / 2.0)))
    assert p_value > 1e-4, (chi2, dof, p_value)
    # the plain sampler passes the same test (sanity check of the test itself)
    plain, _ = generate_plain(
        model, prompts, 3, sampling=_sampling(1.0, 3), generator=torch.Generator().manual_seed(1)
    )
    pc: dict[tuple, int] = {}
    for row in plain[:, 4:7].tolist():
        pc[tuple(row)] = pc.get(tuple(row), 0) + 1
    chi2p = sum((pc.get(s, 0) - n * p) ** 2 / (n * p) for s, p in exact.items())
    assert float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(chi2p / 2.0))) > 1e-4
    assert not math.isnan(chi2)


def _sampling(temperature, top_k):
    from mtp_megatron.decoding.sampling import SamplingConfig

    return SamplingConfig(temperature=temperature, top_k=top_k)


def test_bad_arguments_give_clear_errors(single_process):
    # an unshared chained variant: its heads cannot recurse, so lookahead is capped at K
    unshared = next(v for v in VARIANTS if not v[1] and v[2] == "chained")
    model = tiny_mtp_model(unshared)
    prompts = random_prompts(model.cfg, 1, 4, 0)
    dec = model.mtp_decoder
    with pytest.raises(ValueError, match="lookahead=4 is invalid: must be between 1 and 3"):
        dec.generate(prompts, max_new_tokens=5, lookahead=4)
    with pytest.raises(ValueError, match="lookahead=0 is invalid"):
        dec.generate(prompts, max_new_tokens=5, lookahead=0)
    with pytest.raises(ValueError, match=r"top_p=1.5 is invalid: must be in \(0, 1\]"):
        dec.generate(prompts, max_new_tokens=5, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="top_p=0"):
        dec.generate(prompts, max_new_tokens=5, temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="temperature=-1"):
        dec.generate(prompts, max_new_tokens=5, temperature=-1)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        dec.generate(prompts, max_new_tokens=500)
    ntp = build_model(tiny_model_config(None))
    with pytest.raises(ValueError, match="needs MTP heads"):
        _ = ntp.mtp_decoder
