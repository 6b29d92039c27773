"""Acceptance evidence carried across the requests of one loaded model
(``CostModel.acceptance``, an :class:`AcceptanceMemory`): a drafter class that
accepted nothing starts the next request switched off (and is still probed),
one that accepted well starts drafting at once, the memory is bounded, and two
models do not share it.

The controller tests set the costs by hand, so every decision is exact; the
engine tests run the real decode loop on the scripted table backend of
tests/test_speculative.py (its sleeps make a verify batch cost about what it
costs a small model), and one runs the real prompt-lookup drafter on SmolLM2.
"""

from __future__ import annotations

import pytest

from test_speculative import GREEDY, FixedDrafter, _chat, _lookup_hits, cycle_backend, smol  # noqa: F401

from assistant.inference import speculative as S
from assistant.inference.generation import generate
from assistant.inference.speculative.controller import _MEMORY, _MEMORY_LONG, evidence_key
from assistant.inference.speculative.costs import AcceptanceMemory, Evidence


def _costs(step=0.010, slope=0.5):
    """A cost model with a measured plain step and verify batches costing
    ``slope`` of a step per extra token."""
    cm = S.CostModel()
    cm.step = step
    for n in (2, 4, 8, 16, 32):
        cm.observe_verify(n, step * (1 + slope * (n - 1)))
    return cm


def _controller(cm, token_s=0.0, **kw):
    ctl = S.Controller(cm, 32, lambda cls: token_s, **kw)
    ctl.room = 32
    return ctl


def _switch_off(ctl, cls, position=50):
    """Draft ``cls`` and reject every token until the controller stops; the position it stopped at."""
    ctl.position = position
    for i in range(20):
        k = ctl.choose(cls, 32)
        if k == 0:
            assert i > 0, "the class was never drafted"
            return ctl.position
        ctl.record(cls, k, 0)
        ctl.position += 1
    raise AssertionError("the controller never stopped drafting a class that accepts nothing")


def _next_draft(ctl, cls, start, limit=2000):
    """The first position from ``start`` at which the controller drafts ``cls``, and how much."""
    for pos in range(start, start + limit):
        ctl.position = pos
        k = ctl.choose(cls, 32)
        if k:
            return pos, k
    return None, 0


# -- the controller ------------------------------------------------------------------


def test_a_model_drafter_that_accepted_nothing_starts_the_next_request_off_and_its_probes_run_on():
    cm = _costs(slope=0.1)  # verification cheap enough for the prior to draft
    first = _controller(cm, token_s=0.002)  # a model: every drafted token costs a fifth of a step
    off_at = _switch_off(first, "mtp")
    assert first.probe["mtp"] == [off_at + S.PAUSE_START, S.PAUSE_START]
    first.end(off_at + 10)  # the request ends 22 tokens before its next probe
    kept = cm.acceptance.get("mtp")
    assert kept.costly and kept.token_s == 0.002
    assert kept.probe_every == S.PAUSE_START and kept.probe_in == S.PAUSE_START - 10
    assert kept.accepted / kept.tried < 0.5

    second = _controller(cm, token_s=0.002)
    pos, k = _next_draft(second, "mtp", 100)
    assert (pos, k) == (100 + S.PAUSE_START - 10, S.PROBE_DRAFT)  # off from its first token; then a probe
    second.record("mtp", k, 0)
    assert second.probes == 1
    pos2, _ = _next_draft(second, "mtp", pos + 1)
    assert pos2 == pos + 2 * S.PAUSE_START  # the schedule goes on doubling
    second.end(pos2 + 1)
    third = _controller(cm, token_s=0.002)
    pos3, k3 = _next_draft(third, "mtp", 0)
    assert pos3 == 4 * S.PAUSE_START - 1 and k3 == S.PROBE_DRAFT  # and runs on across requests


def test_a_free_class_that_accepted_nothing_is_probed_again_early_in_each_request():
    """Prompt lookup costs nothing to draft and the next prompt may be one to copy:
    its probes start again with each request (after 32 tokens)."""
    cm = _costs()  # verification at half a step per token: the prior pays, 50% acceptance does not
    first = _controller(cm)
    off_at = _switch_off(first, "ngram:8+")
    for pos in (off_at + S.PAUSE_START, off_at + 3 * S.PAUSE_START, off_at + 7 * S.PAUSE_START):
        assert _next_draft(first, "ngram:8+", pos - 1)[0] == pos  # 32, 64, 128 tokens apart
        first.record("ngram:8+", S.PROBE_DRAFT, 0)
    first.end(off_at + 7 * S.PAUSE_START + 1)
    assert cm.acceptance.get("ngram:8+").probe_every == 0  # not carried: free to probe

    second = _controller(cm)
    assert second.choose("ngram:8+", 32) == 0  # measured useless: off from the start
    pos, k = _next_draft(second, "ngram:8+", 0)
    assert (pos, k) == (S.PAUSE_START, S.PROBE_DRAFT)
    second.record("ngram:8+", k, k)  # the text now copies: the probe is right
    assert "ngram:8+" not in cm.acceptance  # back to the prior, here and for the next request
    assert second.choose("ngram:8+", 32) > 0  # drafting at once again
    third = _controller(cm)
    assert third.choose("ngram:8+", 32) > 0


def test_a_drafter_dearer_than_a_plain_step_is_probed_with_one_token():
    """A drafted token that costs more than a plain step can never pay: its probes
    only re-measure the cost. The next request's new drafter has no figure of its
    own yet: the one measured before stands for it."""
    cm = _costs(slope=0.1)
    cost = {"s": 0.0}  # the drafter's own figure: none before it drafted
    first = _controller(cm)
    first.token_cost = lambda cls: cost["s"]
    first.position = 40
    k = first.choose("mtp", 32)
    assert k > 0  # nothing known: the prior drafts
    cost["s"] = 0.030  # it turns out to cost three plain steps a token
    first.record("mtp", k, 0)
    assert first.choose("mtp", 32) == 0
    assert _next_draft(first, "mtp", 41) == (40 + S.PAUSE_START, 1)  # a one-token probe
    first.record("mtp", 1, 1)  # guessed right: one token says too little to switch it back on
    assert "mtp" in first.probe and first.choose("mtp", 32) == 0
    first.end(100)
    assert cm.acceptance.get("mtp").token_s == 0.030
    second = _controller(cm)  # a new drafter: no figure of its own
    assert _next_draft(second, "mtp", 0) == (40 + 3 * S.PAUSE_START - 100, 1)


def test_a_class_that_accepted_well_starts_drafting_long_at_once():
    cm = _costs(slope=0.1)  # cheap verification: long drafts pay if they are accepted
    first = _controller(cm, token_s=0.0005, short_first=True)
    first.position = 40
    k = first.choose("mtp", 32)
    assert 0 < k <= S.PROBE_DRAFT
    for _ in range(6):
        first.record("mtp", k, k)
        k = first.choose("mtp", 32)
    long = k
    assert long > S.PROBE_DRAFT  # measured good: longer drafts
    first.end(100)
    second = _controller(cm, token_s=0.0005, short_first=True)
    assert second.alpha("mtp") == pytest.approx(0.6)  # the prior: nothing is read before the class is used
    second.position = 10
    assert second.choose("mtp", 32) == long  # from its first draft as long as the last request's
    assert second.alpha("mtp") > 0.9


def test_a_drafter_that_costs_time_drafts_short_until_something_is_measured():
    cm = _costs(slope=0.1)
    eager = _controller(cm, token_s=0.0001)
    careful = _controller(cm, token_s=0.0001, short_first=True)
    assert eager.choose("ngram:16+", 32) > S.PROBE_DRAFT  # a promising prior: a long draft
    assert careful.choose("ngram:16+", 32) == S.PROBE_DRAFT  # unless nothing is known and drafting costs
    careful.record("ngram:16+", S.PROBE_DRAFT, S.PROBE_DRAFT)
    assert careful.choose("ngram:16+", 32) > S.PROBE_DRAFT  # measured: as long as it pays
    again = _controller(cm, token_s=0.0001, short_first=True)
    assert again.choose("ngram:16+", 32) > S.PROBE_DRAFT  # and so from the next request's first draft


def test_the_memory_is_bounded():
    mem = AcceptanceMemory(max_entries=4)
    for i in range(10):
        mem.put(f"draft@model-{i}.gguf", Evidence(1.0, 2.0))
    assert len(mem) == 4 and all(f"draft@model-{i}.gguf" in mem for i in range(6, 10))
    mem.put("draft@model-6.gguf", Evidence(2.0, 2.0))  # written again: the newest
    mem.put("mtp", Evidence(0.0, 5.0))
    assert "draft@model-6.gguf" in mem and "draft@model-7.gguf" not in mem
    assert len(S.CostModel().acceptance) == 0 and S.CostModel().acceptance.max_entries >= 16

    cm = _costs()
    ctl = _controller(cm)
    for _ in range(50):  # a long run of accepted drafts: the evidence stays bounded
        ctl.record("ngram:16+", 32, 32)
    kept = cm.acceptance.get("ngram:16+")
    # long-copy classes (16+ tokens of context) remember longer, still bounded
    assert kept.tried <= _MEMORY_LONG and kept.accepted <= kept.tried
    ctl.record("ngram:16+", 32, 0)  # so one miss still counts
    assert cm.acceptance.get("ngram:16+").accepted / cm.acceptance.get("ngram:16+").tried < 0.99


def test_two_models_do_not_share_evidence_nor_two_draft_models():
    a, b = _costs(slope=0.1), _costs(slope=0.1)
    _switch_off(_controller(a, token_s=0.002), "mtp")
    assert "mtp" in a.acceptance and "mtp" not in b.acceptance
    fresh = _controller(b, token_s=0.002)
    fresh.position = 10
    assert fresh.choose("mtp", 32) > 0  # the other model's drafter is judged afresh

    target, d1, d2 = cycle_backend(), cycle_backend(), cycle_backend()
    k1 = evidence_key(S.ModelDrafter(d1, target))
    k2 = evidence_key(S.AutoDrafter(S.NgramDrafter(), S.ModelDrafter(d2, target)))
    assert k1("draft") != k2("draft") and d1.info.path in k1("draft")
    assert k1("ngram:4") == k2("ngram:4") == evidence_key(S.NgramDrafter())("ngram:4") == "ngram:4"
    assert evidence_key(S.AutoDrafter(S.NgramDrafter(), None))("mtp") == "mtp"


# -- the engine ----------------------------------------------------------------------


class ModelLikeDrafter(FixedDrafter):
    """A drafter that costs time as a model does (``needs_costs``, ``token_cost``)."""

    needs_costs = True

    def token_cost(self, cls, plain_step):
        return 0.2 * plain_step


def _wrong(toks, k):
    return [(toks[-1] + 7) % 40] * k, None


def _right(toks, k):
    return [(toks[-1] + 1 + i) % 40 for i in range(k)], None


def test_across_requests_a_useless_drafter_starts_off_and_a_useful_one_is_found_again():
    """Through the engine, with one cost model as the daemon keeps one per loaded
    model: the first request learns that the drafter accepts nothing; the next
    ones draft only their probes, and give the same text. When the drafter
    starts guessing right, a probe finds it and drafting resumes."""
    b = cycle_backend(vocab=40, delay=0.002, per_token=0.0002)  # cheap verification: a model may pay
    cm = S.CostModel()
    prompt = list(range(40))
    want = [(i % 40) for i in range(40, 240)]
    first_drafter = ModelLikeDrafter(_wrong, cls="mtp", k=8)
    b.truncate(0)
    first = generate(b, prompt, GREEDY, max_tokens=200, speculative=S.SpeculativeEngine(first_drafter, costs=cm))
    assert first.tokens == want and first.stats.drafted > 0 and first.stats.accepted == 0
    assert first.stats.speculative.verify_steps >= 1
    probes = 0
    for _ in range(3):
        d = ModelLikeDrafter(_wrong, cls="mtp", k=8)
        b.truncate(0)
        r = generate(b, prompt, GREEDY, max_tokens=200, speculative=S.SpeculativeEngine(d, costs=cm))
        assert r.tokens == want
        sp = r.stats.speculative
        assert d.proposed == sp.verify_steps == sp.probes  # nothing drafted but probes
        assert r.stats.drafted <= S.PROBE_DRAFT * sp.probes
        probes += sp.probes
    assert probes >= 1  # still probed now and then
    for _ in range(6):  # now it drafts right: a probe finds it within the schedule (<= 1024 tokens)
        good = ModelLikeDrafter(_right, cls="mtp", k=8)
        b.truncate(0)
        r = generate(b, prompt, GREEDY, max_tokens=200, speculative=S.SpeculativeEngine(good, costs=cm))
        assert r.tokens == want
        if r.stats.accepted > 100:
            break
    else:
        raise AssertionError(f"a drafter that became right was never found again: {r.stats}")


def test_prompt_lookup_still_wins_on_a_copy_request_after_open_text():
    """Open text: every lookup is wrong and the class switches off. The next
    request copies: its first probe (32 tokens in) is right and drafting resumes
    for the rest of the reply."""
    b = cycle_backend(vocab=40, delay=0.002, per_token=0.001)
    cm = S.CostModel()
    prompt = list(range(40))
    for _ in range(2):
        b.truncate(0)
        generate(b, prompt, GREEDY, max_tokens=200,
                 speculative=S.SpeculativeEngine(FixedDrafter(_wrong, cls="ngram:16+", k=8), costs=cm))
    kept = cm.acceptance.get("ngram:16+")
    assert kept.accepted / kept.tried < 0.5
    b.truncate(0)
    copy = generate(b, prompt, GREEDY, max_tokens=200,
                    speculative=S.SpeculativeEngine(FixedDrafter(_right, cls="ngram:16+", k=8), costs=cm))
    assert copy.tokens == [(i % 40) for i in range(40, 240)]
    assert copy.stats.accepted >= 200 - S.PAUSE_START - 30, copy.stats  # all but the first 32 tokens and a few


@pytest.mark.slow
def test_smollm2_prompt_lookup_on_a_copy_prompt_after_open_chat(smol):  # noqa: F811
    """The real lookup drafter on the real model, one cost model for both
    requests as the daemon keeps it: open chat first, then a text to fix (it
    copies); the copy request still finds most of what a lookup can find.
    (Greedy identity on these prompts: tests/test_speculative.py.)"""
    cm = S.CostModel()
    for name, n in (("open-chat", 120), ("text-fix", 200)):
        prompt = _chat(smol, name)
        smol.truncate(0)
        spec = generate(smol, prompt, GREEDY, max_tokens=n,
                        speculative=S.SpeculativeEngine(S.AutoDrafter(S.NgramDrafter(), None), costs=cm))
        if name == "open-chat":
            after_open = {k: cm.acceptance.get(k) for k in ("ngram:2", "ngram:3", "ngram:4", "ngram:5+", "ngram:8+")}
    findable = _lookup_hits(prompt, spec.tokens)
    print(f"text-fix after open-chat: {spec.stats.accepted} accepted, {findable} findable; "
          f"evidence after open chat: {after_open}")
    assert findable > 0.25 * len(spec.tokens)
    assert spec.stats.accepted >= 0.7 * findable, (findable, spec.stats)
