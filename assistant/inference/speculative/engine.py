"""The decode loop with a drafter: :class:`SpeculativeEngine`.

The engine is a token generator (as mlx-lm's ``generate_step``): it yields
the tokens it produced, one at a time and in order, and nothing else; the
caller (``assistant.inference.generation.generate``) detokenizes, applies
stops, emits, counts and decides when to stop, and then closes the
generator. Closing it mid-draft leaves the backend's cache holding exactly
the tokens taken (less the last one, as plain decoding does), so the next
request's prefill reuses it.
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from backends.base import Backend
from backends.media import text_only

from assistant.inference.sampling import Sampler
from assistant.inference.speculative.cache import rollback
from assistant.inference.speculative.calibration import CalibrationStore, calibrate
from assistant.inference.speculative.controller import Controller, evidence_key
from assistant.inference.speculative.costs import CostModel
from assistant.inference.speculative.drafter import (DEFAULT_MAX_DRAFT, MAX_DRAFT_LIMIT, Draft, Drafter,
                                                     check_max_draft)
from assistant.inference.stats import VerifyStats


class SpeculativeEngine:
    """Runs the decode loop of one request with a drafter (see the package doc).

    ``exact``: keep each verify batch within the size where the backend's
    batched logits equal one-token decoding (measured by ``calibrate``), so
    greedy output is identical to plain decoding. ``adaptive=False`` drafts
    ``max_draft`` tokens whenever the drafter has any (tests). ``costs``:
    the loaded model's :class:`CostModel`, which the caller keeps as long as
    the model is loaded (the daemon: one per loaded model) so that each
    request starts from what earlier ones measured (costs, and the drafters'
    acceptance: ``CostModel.acceptance``); None: a new one (this request
    measures from scratch). ``calibration``: where calibration
    results are kept across processes (None: measure, keep nothing).

    After :meth:`decode`, ``drafted``, ``accepted`` and ``verify`` hold the
    request's figures (``verify`` is None until a decode ran)."""

    def __init__(self, drafter: Drafter, *, max_draft: int = DEFAULT_MAX_DRAFT, exact: bool = True,
                 adaptive: bool = True, costs: CostModel | None = None,
                 calibration: CalibrationStore | None = None):
        self.drafter = drafter
        self.max_draft = check_max_draft(max_draft)
        self.exact = exact
        self.adaptive = adaptive
        self.costs = CostModel() if costs is None else costs
        self.calibration = calibration
        self.drafted = 0
        self.accepted = 0
        self.verify: VerifyStats | None = None

    @property
    def name(self) -> str:
        return self.drafter.name

    def decode(self, backend: Backend, logits: np.ndarray, sampler: Sampler, history: list[int], *,
               max_tokens: int) -> Iterator[int]:
        """Yield the reply's tokens after prefill, one at a time.

        ``logits`` is the last prompt position's row, ``history`` the prompt
        tokens (the engine appends each token the caller took to it: a
        token is taken when the caller asks for the next one). ``max_tokens``
        is the most tokens the caller will take: drafts never go past it, nor
        past the context window, but the caller must stop at both itself.
        The sampler's banned tokens are never produced, nor tokens its grammar
        (``sampler.constraint``) forbids: a draft ends before its first such token."""
        run = _Decode(self, backend, sampler, history, max_tokens)
        self.drafter.begin(history, sampler.params)
        tok = sampler.sample(logits, history)
        try:
            while True:
                yield tok
                history.append(tok)
                draft = run.propose()
                if draft is None:
                    tok = run.step(tok)
                    continue
                d, m, tok = run.verify(tok, draft)
                for j in range(m):
                    yield d[j]
                    history.append(d[j])
                run.drop_rejected(len(d), m)
        except GeneratorExit:  # the caller is done: keep the cache to what it took
            run.finish()
            raise
        finally:
            run.ctl.end(len(history))  # what the next request of this model starts from
            self.drafter.close()

    @staticmethod
    def _rejection(rows: np.ndarray, d: list[int], q: list[tuple[np.ndarray, np.ndarray]], sampler: Sampler,
                   history: list[int]) -> tuple[int, int]:
        """Accept d[j] with probability min(1, p/q); on rejection sample from
        norm(max(0, p - q)); after k acceptances sample from the last row.
        Returns (accepted count, next token)."""
        k = len(d)
        for j in range(k + 1):
            cand, p = sampler.distribution(rows[j], history + d[:j] if sampler.params.repeat_penalty != 1.0 else ())
            if j == k:
                nxt = int(cand[sampler.choice(p)]) if len(cand) > 1 else int(cand[0])
                sampler.take(nxt)  # a grammar advances by every token taken, and only by those
                return k, nxt
            qc, qp = q[j]
            tok = d[j]
            hit_p = np.flatnonzero(cand == tok)
            hit_q = np.flatnonzero(qc == tok)
            pd = float(p[hit_p[0]]) if len(hit_p) else 0.0
            qd = float(qp[hit_q[0]]) if len(hit_q) else 0.0
            if qd > 0 and sampler.rng.random() < min(1.0, pd / qd):
                sampler.take(tok)
                continue
            ids = np.union1d(cand, qc)
            pp = np.zeros(len(ids))
            qq = np.zeros(len(ids))
            pp[np.searchsorted(ids, cand)] = p
            qq[np.searchsorted(ids, qc)] = qp
            r = np.maximum(pp - qq, 0.0)
            total = r.sum()
            if total <= 0:  # p == q: nothing left over; p itself is the answer
                r, total = pp, pp.sum()
            nxt = int(ids[sampler.choice(r / total)])
            sampler.take(nxt)
            return j, nxt
        raise AssertionError("unreachable")


def _before_media(draft: Draft) -> Draft | None:
    """The draft up to its first media placeholder (a negative id, backends/media.py):
    a lookup drafter copying from a prompt with an image in it may reach one, and it is
    no token a model can evaluate. None when nothing is left."""
    tokens = draft.tokens
    if min(tokens) >= 0:
        return draft
    cut = next(i for i, t in enumerate(tokens) if t < 0)
    return Draft(tokens[:cut], draft.cls, draft.q[:cut] if draft.q is not None else None, draft.cost_s) if cut else None


def _within_grammar(draft: Draft, sampler: Sampler) -> Draft | None:
    """The draft up to the first token the reply's grammar (structured output) rejects:
    that token ends the draft, since verifying it could only fail. None when nothing is
    left. The grammar itself does not move: it advances as tokens are accepted
    (``Sampler.sample`` / ``take``), so a rejected draft leaves nothing to roll back."""
    constraint = sampler.constraint
    if constraint is None:
        return draft
    n = constraint.valid_prefix(draft.tokens)
    if n == len(draft.tokens):
        return draft
    if n == 0:
        return None
    return Draft(draft.tokens[:n], draft.cls, draft.q[:n] if draft.q is not None else None, draft.cost_s)


def _needs_calibration(cost: CostModel, room: int) -> bool:
    if cost.exact_batch is None:
        return True
    # Exact as far as calibration went, and this request may verify more at once.
    return cost.exact_batch >= cost.calibrated_to and room + 1 > cost.calibrated_to


class _Decode:
    """The state of one request's decode loop: the cache length, the
    controller and the figures (``SpeculativeEngine.decode`` drives it).

    Between steps the cache holds every token of ``history`` but the last
    (the one the next step evaluates); while a verify step's accepted tokens
    are handed out it runs ahead of ``history``, and ``finish`` cuts it back."""

    def __init__(self, engine: SpeculativeEngine, backend: Backend, sampler: Sampler, history: list[int],
                 max_tokens: int):
        self.engine, self.backend, self.sampler, self.history = engine, backend, sampler, history
        self.max_tokens = max_tokens
        self.n_prompt = len(history)
        self.n_ctx = backend.info.context_length
        self.cost = cost = engine.costs
        drafter = engine.drafter
        token_cost = getattr(drafter, "token_cost", None)
        self.needs_costs = getattr(drafter, "needs_costs", False)
        # Acceptance evidence is the loaded model's (cost.acceptance), kept across requests.
        self.ctl = ctl = Controller(cost, engine.max_draft,
                                    (lambda cls: token_cost(cls, cost.step_cost())) if token_cost
                                    else (lambda cls: 0.0),
                                    key=evidence_key(drafter), short_first=self.needs_costs)
        self.choose = ctl.choose if engine.adaptive else (
            lambda cls, available: min(available, ctl.room, engine.max_draft))
        self.fast = sampler.is_argmax  # a verify batch is picked with one argmax
        self.penalised = sampler.params.repeat_penalty != 1.0
        self.cache_len = len(backend.cached_tokens)
        self.room = 0  # tokens the current draft may verify
        self.drafted = self.accepted = self.verifies = 0
        self.draft_s = self.t_verify = 0.0

    def propose(self) -> Draft | None:
        """The drafter's proposal for a verify step (``self.room`` says how
        many of its tokens may be verified), or None for a plain step."""
        engine, cost, history = self.engine, self.cost, self.history
        n_out = len(history) - self.n_prompt
        room = min(self.n_ctx - self.cache_len - 1, self.max_tokens - n_out - 1, engine.max_draft)
        if engine.exact and cost.exact_batch is not None and not _needs_calibration(cost, room):
            room = min(room, cost.exact_batch - 1)
        draft = None
        if room > 0 and cost.exact_batch is None and self.needs_costs:
            # A drafter that costs time (a model) is judged against measured
            # verify costs from its first proposal: the prior's guess would
            # refuse a cheap draft model on a machine where batches are cheap.
            room = self._calibrated(room)
        if room > 0 and len(history) >= self.ctl.paused_until:
            self.ctl.room = room
            self.ctl.position = len(history)
            draft = engine.drafter.propose(history, self.choose)
            if draft and engine.exact and _needs_calibration(cost, room):
                room = self._calibrated(room)  # first draft on this model: find the largest exact batch
        if not draft or not draft.tokens or room <= 0:
            return None
        draft = _before_media(draft)
        if draft is None:
            return None
        draft = _within_grammar(draft, self.sampler)
        if draft is None:
            return None
        self.room = room
        return draft

    def _calibrated(self, room: int) -> int:
        """Measure the exact verify batch and the costs now; the room left to draft."""
        engine = self.engine
        # Calibrated to the largest batch any request may verify (MAX_DRAFT_LIMIT + 1),
        # not this request's: the limit found is the model's, kept for every later
        # request (and said by `assistant bench spec`), whatever its max_draft.
        # The probe is text only: a medium's placeholder ids are positions, not tokens to evaluate.
        calibrate(self.backend, text_only(self.history[-64:]), min(MAX_DRAFT_LIMIT + 1, self.n_ctx - self.cache_len),
                  costs=self.cost, store=engine.calibration)
        return min(room, (self.cost.exact_batch or 1) - 1) if engine.exact else room

    def step(self, tok: int) -> int:
        """A plain step: evaluate ``tok``, sample the next token."""
        t0 = time.perf_counter()
        row = self.backend.forward((tok,))[-1]
        self.cost.observe_step(time.perf_counter() - t0)
        self.cache_len += 1
        return self.sampler.sample(row, self.history)

    def verify(self, tok: int, draft: Draft) -> tuple[list[int], int, int]:
        """Evaluate ``tok`` and the draft in one batch; returns (the verified
        draft tokens, how many of them were accepted, the next token)."""
        d = draft.tokens[: self.room]
        k = len(d)
        t0 = time.perf_counter()
        rows = self.backend.forward([tok, *d], logits_at=list(range(k + 1)))
        dt = time.perf_counter() - t0
        self.cost.observe_verify(k + 1, dt)
        self.t_verify += dt
        self.draft_s += draft.cost_s
        self.cache_len += k + 1
        self.verifies += 1
        m, nxt = self._accept(rows, d, draft.q)
        self.drafted += k
        self.accepted += m
        self.ctl.record(draft.cls, k, m)
        self.ctl.verified(m + 1, dt + draft.cost_s, len(self.history) + m + 1)
        return d, m, nxt

    def _accept(self, rows: np.ndarray, d: list[int], q) -> tuple[int, int]:
        """(accepted draft tokens, the next token) by the request's rule."""
        k = len(d)
        if self.fast:
            preds = rows.argmax(axis=1).tolist()  # Python ints: no numpy scalar per comparison
            m = 0
            while m < k and preds[m] == d[m]:
                m += 1
            return m, preds[m]
        if q is None:
            # Point-mass draft: draw the token plain decoding would draw
            # (same sampler, same random stream) and keep d where they agree.
            history, sample, penalised = self.history, self.sampler.sample, self.penalised
            m = 0
            while True:
                x = sample(rows[m], history + d[:m] if penalised and m else history)
                if m < k and x == d[m]:
                    m += 1
                    continue
                return m, x
        return self.engine._rejection(rows, d, q, self.sampler, self.history)

    def drop_rejected(self, k: int, m: int) -> None:
        """After the accepted tokens were taken: cut the rejected ones from the cache."""
        if m < k:
            self.cache_len -= k - m
            rollback(self.backend, self.cache_len, self.history)

    def finish(self) -> None:
        """The caller stopped taking tokens: cut the cache back to what it
        took (drafts beyond a stop are not part of the text); the figures
        go to the engine."""
        if self.cache_len > len(self.history):
            rollback(self.backend, len(self.history), self.history)
        engine, ctl = self.engine, self.ctl
        engine.drafted, engine.accepted = self.drafted, self.accepted
        engine.verify = VerifyStats(
            verify_steps=self.verifies, verify_ms=round(self.t_verify * 1000, 1),
            draft_ms=round(self.draft_s * 1000, 1), paused=ctl.pauses, probes=ctl.probes,
            max_draft=engine.max_draft, exact_batch=self.cost.exact_batch if engine.exact else None)
