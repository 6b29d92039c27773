"""Adaptive control of drafting (:class:`Controller`).

Every drafted token belongs to a class (for ``ngram`` the length of the
matched context, for a model "draft" or "mtp"); acceptance is measured per
class and the cost of verify batches and plain steps per loaded model
(:class:`~assistant.inference.speculative.costs.CostModel`). The draft length
is the one with the best expected tokens per second, and 0 (a plain step)
when no length beats plain decoding. If the realised speed of the recent
verify steps falls below plain decoding anyway, drafting pauses for the
request (32 tokens, doubling each time) and then probes again.

Acceptance is a property of the model and its drafter more than of one
request, so the evidence lives with the loaded model (the cost model's
:class:`~assistant.inference.speculative.costs.AcceptanceMemory`): a request
starts from what the earlier ones measured, a class they found useless is
switched off from its first token, and a class that paid drafts at once.
Probes go on (a drafter that starts to pay is found again): prompt lookup
costs nothing to draft and a new prompt may be one to copy, so its probes
start again with each request (after 32 tokens, 64, ...); a model's drafts
cost time, so its schedule runs on across requests (a drafter with random
weights then costs one short probe per 1024 tokens). A drafter that costs
time and has no evidence yet tries a short draft first, and one whose drafted
token costs a plain step or more (it cannot pay, whatever it accepts) is
probed with one token: enough to see whether its cost has changed.
"""

from __future__ import annotations

from typing import Callable

from assistant.inference.speculative.auto import AutoDrafter
from assistant.inference.speculative.costs import AcceptanceMemory, CostModel, Evidence
from assistant.inference.speculative.model import ModelDrafter

# Prior acceptance per class: (accepted, tried) pseudo-counts.
_PRIORS = {
    "ngram:64+": (4.95, 5.0),
    "ngram:32+": (4.92, 5.0),
    "ngram:16+": (4.9, 5.0),
    "ngram:8+": (4.5, 5.0),
    "ngram:5+": (3.0, 5.0),
    "ngram:4": (2.5, 5.0),
    "ngram:3": (2.0, 5.0),
    "ngram:2": (1.5, 5.0),
    "ngram:1": (1.0, 5.0),
    "draft": (3.0, 5.0),
    "mtp": (3.0, 5.0),
}
_DECAY = 0.9  # old evidence fades: recent drafts count most
_MEMORY = 20.0  # at most this many tried tokens of evidence per class
# Long copies (a context of 16+ tokens matched): misses are rare and come at the
# edits, so one miss must not cut the next drafts to a few tokens (with the short
# memory above one miss in 40 reads as 94% acceptance, which drafts 8 tokens where
# the copy goes on for 100): they remember longer.
_LONG = frozenset({"ngram:16+", "ngram:32+", "ngram:64+"})
_DECAY_LONG = 0.98
_MEMORY_LONG = 60.0
PAUSE_START, PAUSE_MAX = 32, 1024
PROBE_DRAFT = 4  # tokens drafted to probe a switched-off class


def evidence_key(drafter: object) -> Callable[[str], str]:
    """How ``drafter``'s classes are named in the model's AcceptanceMemory: by
    the class, except a draft model's ("draft"), which is named with the draft
    model's file too (two draft models of one target accept differently)."""
    model = drafter.model if isinstance(drafter, AutoDrafter) else drafter
    if not isinstance(model, ModelDrafter):
        return str
    info = model.model.info
    where = f"draft@{info.path or info.name}"
    return lambda cls: where if cls == "draft" else cls


class Controller:
    """Picks the draft length from measured acceptance and cost; pauses
    drafting for the request when recent verify steps did not pay.

    ``memory``: the acceptance of earlier requests, read as each class is
    first used and kept up to date as drafts are verified (default: the cost
    model's, i.e. the loaded model's); ``key`` names a class there
    (:func:`evidence_key`). ``short_first``: the drafter costs time, so a class
    with no evidence at all drafts at most ``PROBE_DRAFT`` tokens first."""

    def __init__(self, cost: CostModel, max_draft: int, token_cost: Callable[[str], float], *,
                 memory: AcceptanceMemory | None = None, key: Callable[[str], str] = str,
                 short_first: bool = False):
        self.cost = cost
        self.max_draft = max_draft
        self.token_cost = token_cost  # class -> seconds per drafted token (0: free, as prompt lookup)
        self.memory = cost.acceptance if memory is None else memory
        self.key = key
        self.short_first = short_first
        self.recalled: set[str] = set()  # classes whose earlier evidence this request has read
        self.known_cost: dict[str, float] = {}  # class -> seconds per drafted token, as last measured
        self.drafting: set[str] = set()  # classes whose last choice was a draft that pays (not a probe)
        self.cost_probes: set[str] = set()  # classes whose last draft was a one-token probe of their cost
        self.stats: dict[str, list[float]] = {}
        self.room = 0  # set by the engine before each proposal
        self.window: list[tuple[float, float]] = []  # (tokens gained * plain step, seconds)
        self.paused_until = -1
        self.pause = PAUSE_START
        self.pauses = 0
        self.position = 0  # tokens so far (set by the engine with room)
        self.probe: dict[str, list[int]] = {}  # switched-off class -> [next probe position, interval]
        self.probes = 0

    def alpha(self, cls: str) -> float:
        """The expected chance that a drafted token of class ``cls`` is accepted."""
        s = self.stats.get(cls)
        if s is None:
            a, n = _PRIORS.get(cls, (2.0, 5.0))
        else:
            a, n = s
        return min(a / n, 0.995)

    def record(self, cls: str, drafted: int, accepted: int) -> None:
        """A draft of class ``cls`` had ``accepted`` of its ``drafted`` tokens accepted."""
        if cls not in self.recalled:
            self._recall(cls)
        s = self.stats.get(cls)
        if s is None:
            s = list(_PRIORS.get(cls, (2.0, 5.0)))
            self.stats[cls] = s
        tried = accepted + (1 if accepted < drafted else 0)
        decay, memory = (_DECAY_LONG, _MEMORY_LONG) if cls in _LONG else (_DECAY, _MEMORY)
        s[0] = s[0] * decay ** tried + accepted
        s[1] = s[1] * decay ** tried + tried
        if s[1] > memory:  # a long accepted draft must not outweigh the next miss
            s[0] *= memory / s[1]
            s[1] = memory
        cost_probe = cls in self.cost_probes
        self.cost_probes.discard(cls)
        if cls in self.probe and accepted == drafted and not cost_probe:
            # A switched-off class drafted right again: start it afresh from the
            # prior, here and in the next requests. (One token of a cost probe
            # says too little: a random drafter guesses one right now and then.)
            del self.probe[cls]
            del self.stats[cls]
            self.memory.forget(self.key(cls))
            return
        key = self.key(cls)
        kept = self.memory.get(key)
        self.memory.put(key, Evidence(s[0], s[1], self._token_cost(cls),
                                      kept.probe_every if kept else 0, kept.probe_in if kept else 0))

    def _token_cost(self, cls: str) -> float:
        """Seconds per drafted token of ``cls``: the drafter's figure, or before it has
        one in this request (a new drafter per request) the one measured before."""
        return self.token_cost(cls) or self.known_cost.get(cls, 0.0)

    def _recall(self, cls: str) -> None:
        """On a class's first use in this request: start from what earlier requests
        measured, and where its probes were due (a model drafter switched off)."""
        self.recalled.add(cls)
        if cls in self.stats:
            return
        kept = self.memory.get(self.key(cls))
        if kept is None:
            return
        self.stats[cls] = [kept.accepted, kept.tried]
        if kept.token_s:
            self.known_cost[cls] = kept.token_s
        if kept.probe_every:
            self.probe[cls] = [self.position + kept.probe_in, kept.probe_every]

    def end(self, position: int) -> None:
        """The request is over at ``position`` (tokens): the probe schedules of the
        switched-off classes that cost time to draft run on in the next request."""
        for cls in self.recalled:
            key = self.key(cls)
            kept = self.memory.get(key)
            if kept is None:
                continue
            probe = self.probe.get(cls)
            if kept.costly and probe is not None and cls not in self.drafting:  # off: a probe to come
                self.memory.put(key, kept._replace(probe_every=probe[1], probe_in=max(0, probe[0] - position)))
            elif kept.probe_every:
                self.memory.put(key, kept._replace(probe_every=0, probe_in=0))

    def choose(self, cls: str, available: int) -> int:
        """How many tokens of class ``cls`` to draft now (0: none), of the
        ``available`` the drafter offers (the drafter's ``Chooser``)."""
        k_max = min(available, self.room, self.max_draft)
        if k_max <= 0:
            return 0
        if cls not in self.recalled:
            self._recall(cls)
        probe = self.probe.get(cls)
        if probe is not None and self.position < probe[0]:
            # Switched off until its next probe: its acceptance cannot have changed
            # meanwhile (it only changes when it drafts), so skip the cost sums. This
            # is every step of a request whose drafter does not pay: keep it cheap.
            return 0
        k = self._best(cls, k_max)
        if k > 0:
            self.drafting.add(cls)
            if self.short_first and cls not in self.stats:
                # Nothing measured on this model yet, and drafting costs time: a short
                # draft says enough to judge it (a useless drafter wastes little).
                return min(k, PROBE_DRAFT)
            return k
        self.drafting.discard(cls)
        if cls not in self.stats and self.alpha(cls) < 0.8:
            return 0  # never drafted and not promising: nothing to learn
        # This class drafted before and stopped paying (or should pay but the
        # measured costs say no: they may be stale): probe it now and then
        # (after 32 tokens, then 64, 128, ... up to 1024).
        if probe is None:
            self.probe[cls] = [self.position + PAUSE_START, PAUSE_START]
            return 0
        probe[1] = min(2 * probe[1], PAUSE_MAX)
        probe[0] = self.position + probe[1]
        self.probes += 1
        if self._token_cost(cls) >= self.cost.step_cost():
            self.cost_probes.add(cls)
            return 1  # it cannot pay at any acceptance: one token re-measures its cost
        self.cost_probes.discard(cls)
        return min(k_max, PROBE_DRAFT)

    def _best(self, cls: str, k_max: int) -> int:
        a = self.alpha(cls)
        extra = self._token_cost(cls) / self.cost.step_cost()  # in plain steps
        # verify_cost(n) / step = max(1, a0 + b (n - 1)), inlined: this runs before
        # every step that may draft, so no calls per candidate length.
        a0, b = self.cost.line()
        best_k, best = 0, 1.03  # drafting must beat plain decoding by a margin
        expected = 1.0
        power = 1.0
        for k in range(1, k_max + 1):
            power *= a
            expected += power  # 1 + a + ... + a^k: tokens per verify step
            steps = a0 + b * k
            gain = expected / ((steps if steps > 1.0 else 1.0) + k * extra)
            if gain >= best * 0.995 and (best_k or gain > best):  # near-ties go to the longer draft
                best_k, best = k, max(gain, best)
            if power < 0.02:
                break
        return best_k

    def verified(self, produced: int, seconds: float, position: int) -> None:
        """One verify step produced ``produced`` tokens in ``seconds`` (drafting included)."""
        w = self.window
        w.append((produced * self.cost.step_cost(), seconds))
        if len(w) > 8:
            del w[0]
        if len(w) >= 6:
            gained = sum(x for x, _ in w) / sum(s for _, s in w)
            if gained < 0.9:
                self.paused_until = position + self.pause
                self.pause = min(2 * self.pause, PAUSE_MAX)
                self.pauses += 1
                w.clear()
            elif gained > 1.2:
                self.pause = PAUSE_START
