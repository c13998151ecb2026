"""Self-speculative decoding with the MTP heads as drafts, and plain KV-cached decoding.

Notation: b batch, T prompt length, L lookahead (drafts per round), h hidden, V vocabulary.

State of a row between rounds: tokens x_0..x_{n-1} are committed; the trunk has processed
positions 0..p with p = n - 2 (its KV cache holds p + 1 slots); x_{n-1} (the "bonus") came from
the main head at p and has not been fed yet. A round:

1. Draft: head k (k = 1..L) at position p proposes x_{p+k+1}. A chained head's input at position
   j is (h^{k-1}_j, e(x_{j+k})), exactly as in training; positions whose inputs are all committed
   are computed once and cached (KV cache of an attention head, and h^k in a history buffer);
   the few positions that read this round's drafts are recomputed each round.
2. Verify: one trunk forward over [x_{n-1}, d_1..d_L] at positions p+1..p+L+1 gives the target
   distribution at every draft position and one more.
3. Accept the longest valid prefix m (greedy: drafts equal to the argmax; sampling: the
   speculative rule in ``sampling.py``), commit it and one token from the target, and roll the
   trunk cache back to the accepted length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.decoding.draft_vocab import DraftVocab
from mtp_megatron.decoding.host import host_read
from mtp_megatron.decoding.kv_cache import KVCacheSet
from mtp_megatron.decoding.sampling import (
    SamplingConfig,
    accept_drafts,
    draft_probs,
    greedy_accept,
    sample,
    target_probs,
)
from mtp_megatron.parallel import gather_last_dim


@dataclass
class _Forward:
    """A trunk (or head) forward's outputs over a block of positions."""

    z: torch.Tensor  # pre-norm trunk output [b, s, h] (independent heads read it)
    h: torch.Tensor  # normalised state [b, s, h]
    logits: torch.Tensor  # full-vocabulary logits [b, s, V] ([b, 1, V] with last_only)


class _Runner:
    """The model pieces decoding needs, with TP gathers and padded-vocab trimming."""

    def __init__(self, model):
        self.model = model
        self.trunk = model.trunk
        self.vocab = model.cfg.vocab_size
        self.tp_group = self.trunk.ctx.tp_group

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        full = gather_last_dim(self.trunk.logits(h), self.tp_group)  # [b, s, V_padded]
        return full[..., : self.vocab].float()

    def trunk_forward(
        self, tokens: torch.Tensor, caches: KVCacheSet, last_only: bool = False
    ) -> _Forward:
        """``last_only``: logits of the last position only (a prompt's other positions need
        none: at a 2k prompt and 128k vocabulary that is 1 GB of fp32 saved)."""
        positions = caches.positions(tokens.shape[1])  # [b, s]
        z = self.trunk.run_layers(self.trunk.embed(tokens), positions, kv_caches=caches.layers)
        caches.advance(tokens.shape[1])
        h = self.trunk.final_norm(z)
        return _Forward(z=z, h=h, logits=self.logits(h[:, -1:] if last_only else h))

    def new_caches(self, batch: int, capacity: int, num: int, ref: torch.Tensor) -> KVCacheSet:
        attn = self.trunk.layers[0].attention.inner
        return KVCacheSet(
            num, batch, attn.local_kv_heads, attn.head_dim, capacity, ref.device, ref.dtype
        )


def _validate_request(model, input_ids: torch.Tensor, max_new_tokens: int, extra: int) -> int:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, prompt_len>=1], got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    needed = input_ids.shape[1] + max_new_tokens + extra
    if needed > model.cfg.max_seq_len:
        raise ConfigError(
            f"prompt ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) + lookahead "
            f"slack ({extra}) = {needed} exceeds model.max_seq_len ({model.cfg.max_seq_len})"
        )
    return needed


def _finish(seq: torch.Tensor, n: torch.Tensor, start: int, max_new: int, eos: int | None):
    """Cut each row to max_new tokens (and its first EOS); pad with EOS (or 0)."""
    b = seq.shape[0]
    out = seq[:, : start + max_new].clone()
    lengths = torch.full((b,), max_new, dtype=torch.long)
    if eos is not None:
        for r in range(b):
            hits = (out[r, start:] == eos).nonzero()
            if len(hits):
                cut = int(hits[0]) + 1
                out[r, start + cut :] = eos
                lengths[r] = cut
    return out, lengths


def _on_model_device(model, input_ids: torch.Tensor, generator: torch.Generator | None):
    """The prompt and the sampling generator moved to the model's device (a CPU prompt or
    generator with a CUDA model is the common case: ids from a tokenizer, a seeded Generator()).
    A generator on another device is replaced by one there, seeded from it: reproducible."""
    device = model.trunk.embedding.weight.device
    input_ids = input_ids.to(device)
    if generator is not None and generator.device != device:
        seed = int(torch.randint(2**62, (1,), generator=generator))
        generator = torch.Generator(device=device).manual_seed(seed)
    return input_ids, generator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class NonFiniteLogitsError(ValueError):
    """Decoding refused: the model produced NaN / inf logits."""


def _require_finite(logits: torch.Tensor) -> None:
    """Refuse to decode from NaN / inf logits (argmax of NaN would 'accept' every draft)."""
    if not host_read(torch.isfinite(logits).all()):
        raise NonFiniteLogitsError(
            "the model's logits for the prompt are not finite (NaN or inf): its weights are "
            "broken (a diverged run?); decode from an earlier checkpoint"
        )


def _pick(logits: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None):
    """Next token [b] from logits [b, V] under the target distribution."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(target_probs(logits, sampling), gen)


@torch.no_grad()
def generate_plain(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Plain decoding, one trunk forward per token (``use_cache=False`` recomputes everything)."""
    sampling = sampling or SamplingConfig()
    sampling.validate()
    input_ids, generator = _on_model_device(model, input_ids, generator)
    capacity = _validate_request(model, input_ids, max_new_tokens, 1)
    runner = _Runner(model)
    b, T = input_ids.shape
    seq = torch.zeros(b, capacity, dtype=torch.long, device=input_ids.device)
    seq[:, :T] = input_ids
    t0 = time.perf_counter()
    trunk = runner.trunk
    caches = runner.new_caches(b, capacity, trunk.num_kv_caches, trunk.embedding.weight)
    calls = 0
    for i in range(max_new_tokens):
        n = T + i
        if use_cache:
            block = seq[:, :n] if i == 0 else seq[:, n - 1 : n]
            fwd = runner.trunk_forward(block, caches, last_only=True)
        else:
            caches.set_lengths(torch.zeros_like(caches.lengths), max_length=0)
            fwd = runner.trunk_forward(seq[:, :n], caches, last_only=True)
        calls += 1
        if i == 0:
            _require_finite(fwd.logits[:, -1])
        seq[:, n] = _pick(fwd.logits[:, -1], sampling, generator)
        if eos_token_id is not None and host_read(
            (seq[:, T : n + 1] == eos_token_id).any(-1).all()
        ):
            max_new_tokens = i + 1
            break
    _sync(seq.device)  # the device has finished what it was given
    wall = time.perf_counter() - t0
    out, lengths = _finish(seq, None, T, max_new_tokens, eos_token_id)
    new = int(lengths.sum())
    return out, {
        "new_tokens": new,
        "forward_calls": calls,
        "tokens_per_forward": new / (calls * b),
        "wall_time_s": wall,
        "tokens_per_s": new / wall,
    }


class SpeculativeDecoder:
    """``model.mtp_decoder``: drafts with the MTP heads, verifies with the trunk."""

    def __init__(self, model):
        if model.mtp is None:
            raise ConfigError(
                "speculative decoding needs MTP heads; this model has none (mtp=None)"
            )
        self.model = model
        self.runner = _Runner(model)
        self.mtp = model.mtp
        self.calibrations: dict = {}  # batch size -> calibrate.Calibration (lookahead="auto")
        self._vocab_cache: tuple | None = None  # (ids asked for, weight version, DraftVocab)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 100,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        lookahead: int | str | None = None,
        eos_token_id: int | None = None,
        speculation_temperature: float = 0.0,
        acceptance_threshold: float = 1.0,
        generator: torch.Generator | None = None,
        record_drafts: bool = False,
        draft_vocab: torch.Tensor | list[int] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Generate ``max_new_tokens`` per row; returns (tokens [b, T + max_new], stats).

        Greedy (temperature 0) output is token-for-token the plain greedy output; with sampling
        every token follows the model's (temperature / top-k / top-p) distribution exactly, unless
        ``acceptance_threshold`` < 1 (lossy, faster). stats["speedup"] is tokens per trunk
        forward (plain decoding makes one forward per token): the reduction in trunk calls, not
        wall-clock time.

        ``draft_vocab``: token ids the heads may propose (e.g. ``frequent_token_ids`` of the
        training data); cheaper draft steps, same output (see ``draft_vocab.py``). None: all.

        ``lookahead`` > K (one chained head module shared by every step, or K = 1): draft
        k > K applies that head again to its own state at k - 1 (FastMTP's "vanilla"
        recursion, vLLM's for one-layer MTP models).

        ``lookahead="auto"``: the fastest L in 0..K (never a recursive L > K) measured by
        ``calibrate.calibrate`` at this batch size (calibrated on this request's prompt first
        when it has not been); L = 0 (plain decoding won the calibration) decodes without
        drafts.
        """
        K = self.mtp.num_steps
        L = self.mtp.cfg.speculation_lookahead if lookahead is None else lookahead
        recursive = self.mtp.cfg.recursive_drafts
        if L != "auto" and (
            isinstance(L, bool) or not isinstance(L, int) or L < 1 or (L > K and not recursive)
        ):
            allowed = (
                f">= 1 (one chained head drafts past K={K} by recursion)"
                if recursive
                else (
                    f"between 1 and {K} (MTP steps: these heads are not one chained module shared "
                    "by every step, so none can draft past its own step)"
                )
            )
            raise ConfigError(f"lookahead={L!r} is invalid: must be {allowed} or 'auto'")
        sampling = SamplingConfig(
            temperature, top_p, top_k, speculation_temperature, acceptance_threshold
        )
        sampling.validate()
        if L == "auto":
            from mtp_megatron.decoding.calibrate import calibrate

            b = input_ids.shape[0]
            found = self.calibrations.get(b) or calibrate(
                self, [input_ids], draft_vocab=draft_vocab
            )
            L = found.lookahead
            if L == 0:
                out, stats = generate_plain(
                    self.model,
                    input_ids,
                    max_new_tokens,
                    SamplingConfig(temperature, top_p, top_k),
                    eos_token_id,
                    generator,
                )
                stats |= {"lookahead": 0, "rounds": 0, "acceptance_rate_per_position": []}
                return out, stats | {"speedup": 1.0, "avg_acceptance_rate": 0.0}
        input_ids, generator = _on_model_device(self.model, input_ids, generator)
        capacity = _validate_request(self.model, input_ids, max_new_tokens, 2 * L + 2)
        capacity = max(capacity, input_ids.shape[1] + max_new_tokens + 2 * L + 2)
        return self._run(
            input_ids,
            max_new_tokens,
            L,
            sampling,
            eos_token_id,
            generator,
            capacity,
            record_drafts,
            draft_vocab,
        )

    # -- internals -------------------------------------------------------------------------------
    def _run(self, input_ids, max_new, L, sampling, eos, gen, capacity, record_drafts, vocab):
        runner, mtp = self.runner, self.mtp
        trunk = runner.trunk
        b, T = input_ids.shape
        dev = input_ids.device
        ref = trunk.embedding.weight
        hidden = trunk.cfg.hidden_size
        rows = torch.arange(b, device=dev)
        t0 = time.perf_counter()
        if vocab is not None:  # token ids -> DraftVocab (inside the timed part)
            vocab = self._draft_vocab(vocab)

        seq = torch.zeros(b, capacity, dtype=torch.long, device=dev)  # committed + scratch
        seq[:, :T] = input_ids
        trunk_cache = runner.new_caches(b, capacity, trunk.num_kv_caches, ref)  # ETD: per iteration
        # hist[0] = h^0 (normalised trunk output), hist[k] = h^k; hist_z = pre-norm trunk output
        hist = [torch.zeros(b, capacity, hidden, dtype=ref.dtype, device=dev) for _ in range(L + 1)]
        hist_z = None if mtp.chained else torch.zeros_like(hist[0])
        head_caches = [
            runner.new_caches(b, capacity, 1, ref) if mtp.head(k).has_attention else None
            for k in range(1, L + 1)
        ]
        valid = torch.zeros(L + 1, b, dtype=torch.long, device=dev)  # committed-valid prefix

        fwd = runner.trunk_forward(input_ids, trunk_cache, last_only=True)  # prefill
        hist[0][:, :T] = fwd.h
        if hist_z is not None:
            hist_z[:, :T] = fwd.z
        p = torch.full((b,), T - 1, dtype=torch.long, device=dev)  # last processed position
        _require_finite(fwd.logits[:, -1])
        seq[rows, p + 1] = _pick(fwd.logits[:, -1], sampling, gen)
        calls, rounds = 1, 0
        draft_s = verify_s = 0.0  # host time of each phase (a GPU's, when it syncs)
        active_rounds = torch.zeros((), dtype=torch.long, device=dev)  # row-rounds that drafted
        accepted_at = torch.zeros(L, dtype=torch.long, device=dev)  # per draft position
        draft_slots = torch.arange(L, device=dev)
        slots = torch.arange(seq.shape[1], device=dev)
        draft_log = []
        # the host's copy of p and of each head's cached prefix: one device read per round
        valid_host = [[0] * b for _ in range(L + 1)]
        while True:
            if eos is None:
                p_host = host_read(p)
            else:  # the EOS flags (a row has committed EOS) in the same read
                committed = (slots[None] >= T) & (slots[None] <= (p + 1)[:, None])
                hit = ((seq == eos) & committed).any(-1)
                *p_host, all_hit = host_read(torch.cat([p, hit.all()[None].long()]))
                if rounds and all_hit:
                    break
            if min(p_host) + 2 - T >= max_new:  # tokens committed beyond the prompt
                break
            p_before = p
            t_draft = time.perf_counter()
            drafts, q = self._draft(
                p,
                p_host,
                seq,
                hist,
                hist_z,
                head_caches,
                valid,
                valid_host,
                L,
                sampling,
                gen,
                vocab,
            )
            t_verify = time.perf_counter()
            draft_s += t_verify - t_draft
            seq[rows[:, None], (p + 2)[:, None] + draft_slots] = drafts  # x_{p+2}..x_{p+1+L}
            block = torch.cat([seq[rows, p + 1][:, None], drafts], dim=1)  # [b, L+1]
            trunk_cache.set_lengths(p + 1, max_length=max(p_host) + 1)
            fwd = runner.trunk_forward(block, trunk_cache)
            calls += 1
            rounds += 1
            pos = (p + 1)[:, None] + torch.arange(L + 1, device=dev)  # [b, L+1]
            hist[0][rows[:, None], pos] = fwd.h
            if hist_z is not None:
                hist_z[rows[:, None], pos] = fwd.z
            m, nxt = self._verify(fwd.logits, drafts, q, sampling, gen)
            verify_s += time.perf_counter() - t_verify
            active = (p + 2 - T) < max_new  # finished rows ride along without advancing
            m = torch.where(active, m, torch.zeros_like(m))
            nxt = torch.where(active, nxt, seq[rows, p + 1])
            # drafts sit at x_{p+2}..x_{p+1+L} (scratch): committing d_1..d_m is moving p and
            # writing the next token over the first rejected draft
            p = torch.where(active, p + 1 + m, p)
            seq[rows, p + 1] = nxt
            valid[0] = p + 1
            active_rounds += active.sum()
            accepted_at += (m[:, None] > draft_slots).sum(0)
            if record_drafts:
                draft_log.append((p_before.clone(), drafts.clone(), m.clone()))
        _sync(seq.device)  # the device has finished what it was given
        wall = time.perf_counter() - t0
        max_new_done = min(max_new, min(host_read(p)) + 2 - T)
        out, lengths = _finish(seq, None, T, max_new if eos is None else max_new_done, eos)
        new = int(lengths.sum())  # lengths live on the host already
        active_total, *accepted_list = host_read(torch.cat([active_rounds[None], accepted_at]))
        drafted = max(1, active_total)  # every active row proposes L drafts per round
        accepted_total = sum(accepted_list)
        stats = {
            "new_tokens": new,
            "forward_calls": calls,
            "rounds": rounds,
            "lookahead": L,
            "avg_acceptance_rate": accepted_total / (drafted * L),
            "acceptance_rate_per_position": [a / drafted for a in accepted_list],
            "mean_accepted_per_step": accepted_total / drafted,
            "tokens_per_forward": new / (calls * b),
            "wall_time_s": wall,
            "tokens_per_s": new / wall,
            "draft_time_s": draft_s,
            "verify_time_s": verify_s,
        }
        stats["speedup"] = stats["tokens_per_forward"]
        if record_drafts:
            stats["drafts"] = draft_log  # (position p [b], drafts [b, L], accepted [b]) per round
        return out, stats

    def _draft_vocab(self, ids) -> DraftVocab:
        """The DraftVocab of ``ids``, built once: its [h, D] copy of the output rows cost a
        few ms per request (more than a draft step), so it is kept while the ids and the
        output weight stay the same."""
        trunk = self.runner.trunk
        weight = trunk.output_weight
        ids = torch.as_tensor(ids, dtype=torch.long, device=weight.device)
        version = (weight.data_ptr(), weight._version)
        cached = self._vocab_cache
        if cached is not None and cached[1] == version and torch.equal(cached[0], ids):
            return cached[2]
        vocab = DraftVocab.build(ids, weight, self.runner.vocab, trunk.ctx.tp_size)
        self._vocab_cache = (ids, version, vocab)
        return vocab

    def _draft(
        self, p, p_host, seq, hist, hist_z, head_caches, valid, valid_host, L, sampling, gen, vocab
    ):
        """Propose L drafts per row from position p; returns (drafts [b, L], q [b, L, V] | None).

        ``p_host`` / ``valid_host``: host copies of p and valid (kept in step here), so that no
        draft step reads the device. ``vocab``: the reduced draft vocabulary (None: all).
        """
        runner, mtp = self.runner, self.mtp
        trunk = runner.trunk
        b = p.shape[0]
        dev = p.device
        rows = torch.arange(b, device=dev)[:, None]
        drafts, qs = [], []
        for k in range(1, L + 1):
            # block of positions [start, p] whose head-k state is not cached yet
            start = torch.minimum(valid[k], p)  # a finished row (p frozen) recomputes p only
            start_host = [min(v, pp) for v, pp in zip(valid_host[k], p_host)]
            width = max(pp - st for pp, st in zip(p_host, start_host)) + 1
            pos = start[:, None] + torch.arange(width, device=dev)  # [b, w]; past p: padding
            pos = pos.clamp(max=seq.shape[1] - 1 - k)
            if mtp.chained:
                prev = hist[k - 1][rows, pos]  # h^{k-1} (this round's values past its valid part)
                emb = trunk.embed(seq[rows, pos + k])  # e(x_{j+k}): committed or this round's draft
            else:
                prev, emb = hist_z[rows, pos], None
            cache = head_caches[k - 1]
            if cache is not None:
                cache.set_lengths(start, max_length=max(start_host))
                kv = cache.layers[0]
            else:
                kv = None
            h = mtp.step(k, prev, emb, trunk.final_norm, trunk.rope, pos, kv)  # [b, w, h]
            hist[k][rows, pos] = h
            last = (p - start)[:, None, None].expand(b, 1, h.shape[-1])
            h_p = h.gather(1, last)  # at position p: [b, 1, h]
            if vocab is None:
                logits = runner.logits(h_p)[:, 0]  # [b, V]
            else:
                logits = vocab.logits(h_p, runner.logits)[:, 0]  # [b, D]
            q = draft_probs(logits, sampling)
            d = logits.argmax(-1) if q is None else sample(q, gen)
            if vocab is not None:
                d = vocab.ids[d]
                q = None if q is None else vocab.scatter(q)
            seq[rows[:, 0], p + 1 + k] = d  # scratch slot of draft k (x_{p+1+k})
            drafts.append(d)
            qs.append(q)
            # inputs of positions j <= p + 1 - k are committed: those states stay cached
            valid[k] = (p + 2 - k).clamp_min(0) if mtp.chained else p + 1
            valid_host[k] = [max(pp + 2 - k, 0) if mtp.chained else pp + 1 for pp in p_host]
        q = None if qs[0] is None else torch.stack(qs, dim=1)
        return torch.stack(drafts, dim=1), q

    def _verify(self, logits, drafts, q, sampling, gen):
        """logits [b, L+1, V] of the verification forward -> (accepted m [b], next token [b])."""
        if sampling.greedy:
            m, nxt = greedy_accept(logits.argmax(-1), drafts)
            if sampling.acceptance_threshold < 1.0:  # lossy: near-top drafts pass too
                probs = logits.softmax(-1)
                L = drafts.shape[1]
                p_d = probs[:, :L].gather(-1, drafts[..., None]).squeeze(-1)
                ok = p_d >= sampling.acceptance_threshold * probs[:, :L].amax(-1)
                m = ok.long().cumprod(-1).sum(-1)
                nxt = logits.argmax(-1).gather(1, m[:, None]).squeeze(1)
            return m, nxt
        return accept_drafts(target_probs(logits, sampling), drafts, q, sampling, gen)
