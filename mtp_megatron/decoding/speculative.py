"""Self-speculative decoding: rounds of draft, verify and accept, with the MTP heads as drafts.

Notation: b batch, T prompt length, L lookahead (drafts per round), V vocabulary.

A round (``rounds.py``: the state between rounds):

1. Draft: a ``Drafter`` (``drafters.py``; the MTP heads) proposes d_1 .. d_L per row.
2. Verify: one trunk forward over [x_{p+1}, d_1 .. d_L] at positions p+1 .. p+L+1 gives the target
   distribution at every draft position and one more.
3. Accept (``verify.py``) the longest valid prefix m (greedy: drafts equal to the argmax;
   sampling: the exact speculative rule), commit it and one token from the target; the trunk
   cache rolls back to the accepted length at the next round's ``set_lengths``.

``lookahead="auto"`` is a policy object (``calibrate.AutoLookahead``) that picks L per batch size
(L = 0: plain decoding, ``plain.py``).
"""

from __future__ import annotations

import time

import torch

from mtp_megatron.config import ConfigError
from mtp_megatron.config.base import is_int
from mtp_megatron.decoding.calibrate import AutoLookahead
from mtp_megatron.decoding.draft_vocab import DraftVocab
from mtp_megatron.decoding.drafters import Drafter, HeadDrafter
from mtp_megatron.decoding.host import host_read
from mtp_megatron.decoding.plain import generate_plain
from mtp_megatron.decoding.rounds import Draft, RoundState
from mtp_megatron.decoding.runner import (
    TrunkRunner,
    finish,
    on_model_device,
    require_finite,
    sync,
    validate_request,
)
from mtp_megatron.decoding.sampling import SamplingConfig
from mtp_megatron.decoding.verify import Verifier


class SpeculativeDecoder:
    """``model.mtp_decoder``: drafts with the MTP heads, verifies with the trunk."""

    def __init__(self, model, auto: AutoLookahead | None = None):
        if model.mtp is None:
            raise ConfigError(
                "speculative decoding needs MTP heads; this model has none (mtp=None)"
            )
        self.model = model
        self.runner = TrunkRunner(model)
        self.mtp = model.mtp
        self.auto = auto or AutoLookahead()
        """``lookahead="auto"``: the L it measured per batch size (kept with the decoder)."""
        self._vocab_cache: tuple | None = None  # (ids asked for, weight version, DraftVocab)

    @property
    def calibrations(self) -> dict:
        """Batch size -> what ``lookahead="auto"`` measured (``calibrate.Calibration``)."""
        return self.auto.calibrations

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
        requested = self._check_lookahead(lookahead)
        sampling = SamplingConfig(
            temperature, top_p, top_k, speculation_temperature, acceptance_threshold
        )
        sampling.validate()
        if isinstance(requested, int):
            L = requested
        else:  # 'auto'
            L = self.auto.choose(self, input_ids, draft_vocab)
            if L == 0:
                plain = SamplingConfig(temperature, top_p, top_k)
                out, stats = generate_plain(
                    self.model, input_ids, max_new_tokens, plain, eos_token_id, generator
                )
                stats |= {"lookahead": 0, "rounds": 0, "acceptance_rate_per_position": []}
                return out, stats | {"speedup": 1.0, "avg_acceptance_rate": 0.0}
        input_ids, generator = on_model_device(self.model, input_ids, generator)
        capacity = validate_request(self.model, input_ids, max_new_tokens, 2 * L + 2)
        t0 = time.perf_counter()  # the request's buffers and the draft vocabulary are timed too
        state = RoundState.start(input_ids, capacity, max_new_tokens, eos_token_id)
        return self._run(state, L, sampling, generator, record_drafts, draft_vocab, t0)

    def _check_lookahead(self, lookahead: int | str | None) -> int | str:
        """The request's L (default: the config's ``speculation_lookahead``) or 'auto'."""
        K = self.mtp.num_steps
        L = self.mtp.cfg.speculation_lookahead if lookahead is None else lookahead
        if L == "auto":
            return L
        recursive = self.mtp.cfg.recursive_drafts
        if not is_int(L) or L < 1 or (L > K and not recursive):
            allowed = (
                f">= 1 (one chained head drafts past K={K} by recursion)"
                if recursive
                else (
                    f"between 1 and {K} (MTP steps: these heads are not one chained module shared "
                    "by every step, so none can draft past its own step)"
                )
            )
            raise ConfigError(f"lookahead={L!r} is invalid: must be {allowed} or 'auto'")
        return L

    def _run(
        self, state, L, sampling, generator, record_drafts, vocab, t0: float
    ) -> tuple[torch.Tensor, dict]:
        """Prefill, then rounds until every row has its tokens (module doc)."""
        runner, seq = self.runner, state.seq
        vocab = self._draft_vocab(vocab) if vocab is not None else None  # inside the timed part
        caches = runner.trunk_caches(*seq.shape)  # ETD: one per think iteration
        drafter: Drafter = HeadDrafter(runner, L, state, sampling, generator, vocab)
        verify = Verifier(sampling, generator)
        prompt = seq[:, : state.prompt_len]
        fwd = runner.forward(prompt, caches, last_only=True)  # prefill
        drafter.observe(state, fwd, None)
        require_finite(fwd.logits[:, -1])
        seq[state.rows, state.p + 1] = verify.first(fwd.logits[:, -1])
        tally = _Tally(L, seq.device, record_drafts)
        offsets = torch.arange(L + 1, device=seq.device)
        while state.next_round():
            t_draft = time.perf_counter()
            draft = drafter.draft(state)
            t_verify = time.perf_counter()
            p = state.p
            pos = (p + 1)[:, None] + offsets  # [b, L+1]: x_{p+1}, d_1 .. d_L
            seq[state.rows[:, None], pos[:, 1:]] = draft.tokens
            block = torch.cat([state.bonus()[:, None], draft.tokens], dim=1)  # [b, L+1]
            caches.set_lengths(p + 1, max_length=max(state.p_host) + 1)
            fwd = runner.forward(block, caches)
            drafter.observe(state, fwd, pos)
            m, nxt = verify(fwd.logits, draft)
            t_done = time.perf_counter()
            accepted, active = state.commit(m, nxt)
            tally.add(p, draft, accepted, active, t_verify - t_draft, t_done - t_verify)
        sync(seq.device)  # the device has finished what it was given
        wall = time.perf_counter() - t0
        done = min(state.max_new, state.committed_new())
        cut = state.max_new if state.eos is None else done
        out, lengths = finish(seq, state.prompt_len, cut, state.eos)
        return out, tally.stats(int(lengths.sum()), state, wall)

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


class _Tally:
    """A request's counters: kept on the device through the rounds, read once at the end."""

    def __init__(self, lookahead: int, device: torch.device, record_drafts: bool):
        self.L = lookahead
        self.active_rounds = torch.zeros((), dtype=torch.long, device=device)  # rows x rounds
        self.accepted_at = torch.zeros(lookahead, dtype=torch.long, device=device)  # per position
        self.slots = torch.arange(lookahead, device=device)
        self.draft_s = self.verify_s = 0.0  # host time of each phase (a GPU's, when it syncs)
        self.drafts: list | None = [] if record_drafts else None

    def add(self, p, draft: Draft, accepted, active, draft_s: float, verify_s: float) -> None:
        self.active_rounds += active.sum()
        self.accepted_at += (accepted[:, None] > self.slots).sum(0)
        self.draft_s += draft_s
        self.verify_s += verify_s
        if self.drafts is not None:
            self.drafts.append((p.clone(), draft.tokens.clone(), accepted.clone()))

    def stats(self, new: int, state: RoundState, wall: float) -> dict:
        b = state.seq.shape[0]
        active_total, *accepted = host_read(torch.cat([self.active_rounds[None], self.accepted_at]))
        drafted = max(1, active_total)  # every active row proposes L drafts per round
        calls = state.rounds + 1  # the prefill and one verification per round
        stats = {
            "new_tokens": new,
            "forward_calls": calls,
            "rounds": state.rounds,
            "lookahead": self.L,
            "avg_acceptance_rate": sum(accepted) / (drafted * self.L),
            "acceptance_rate_per_position": [a / drafted for a in accepted],
            "mean_accepted_per_step": sum(accepted) / drafted,
            "tokens_per_forward": new / (calls * b),
            "wall_time_s": wall,
            "tokens_per_s": new / wall,
            "draft_time_s": self.draft_s,
            "verify_time_s": self.verify_s,
        }
        stats["speedup"] = stats["tokens_per_forward"]
        if self.drafts is not None:
            stats["drafts"] = self.drafts  # (position p [b], drafts [b, L], accepted [b]) a round
        return stats
