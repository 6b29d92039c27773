"""What decoding costs and what drafting earns on one loaded model:
:class:`CostModel`, the measured plain step and verify batches the controller
weighs drafts against, the largest verify batch that is bit-exact (found by
calibration), and its :class:`AcceptanceMemory`, the acceptance each drafter
class had in the model's earlier requests."""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import NamedTuple

MEMORY_ENTRIES = 64  # drafter classes an AcceptanceMemory keeps (the least recently used goes first)


class Evidence(NamedTuple):
    """What earlier requests measured of one drafter class."""

    accepted: float  # (accepted, tried): pseudo-counts, decayed and bounded by the controller
    tried: float
    token_s: float = 0.0  # seconds per drafted token when last drafted (0: free, as prompt lookup)
    probe_every: int = 0  # switched off: tokens between its probes (0: not switched off)
    probe_in: int = 0  # switched off: tokens until its next probe

    @property
    def costly(self) -> bool:
        """Drafting it costs time (a model): its probe schedule carries over to the next request."""
        return self.token_s > 0


class AcceptanceMemory:
    """Acceptance evidence per drafter class, carried from one request of a
    loaded model to the next, so that a request starts from what the earlier
    ones measured: a drafter that accepted nothing starts switched off (and is
    only probed), one that accepted well drafts at once.

    Keys are the controller's class names (``"mtp"``, ``"ngram:8+"``; a draft
    model's ``"draft"`` class with the draft model's file, see
    ``controller.evidence_key``), values :class:`Evidence`. At most
    ``max_entries`` keys are kept, the least recently written going first. Two
    requests of one model may run at once (background work on a second
    context): a lock keeps the table whole."""

    def __init__(self, max_entries: int = MEMORY_ENTRIES) -> None:
        self.max_entries = max_entries
        self._evidence: OrderedDict[str, Evidence] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Evidence | None:
        """What earlier requests measured of ``key``, None if nothing."""
        return self._evidence.get(key)

    def put(self, key: str, evidence: Evidence) -> None:
        """What is now known of ``key`` (it replaces what was kept)."""
        with self._lock:
            ev = self._evidence
            ev[key] = evidence
            ev.move_to_end(key)
            while len(ev) > self.max_entries:
                ev.popitem(last=False)

    def forget(self, key: str) -> None:
        """Nothing is known of ``key`` any more (the next request starts from the prior)."""
        with self._lock:
            self._evidence.pop(key, None)

    def __len__(self) -> int:
        return len(self._evidence)

    def __contains__(self, key: object) -> bool:
        return key in self._evidence


class CostModel:
    """Measured cost of a plain one-token step (seconds) and of verify batches
    (as a ratio to the plain step measured at the same time, so a machine
    whose load changes keeps sensible figures), and the largest batch whose
    logits equal one-token decoding bit for bit.

    One per loaded model, kept as long as the model is loaded (the daemon
    keeps it with the model; see ``SpeculativeEngine``'s ``costs``), so each
    request starts from what the earlier ones measured; ``acceptance`` is the
    drafters' acceptance in those requests (:class:`AcceptanceMemory`)."""

    def __init__(self) -> None:
        self.acceptance = AcceptanceMemory()
        self.step: float | None = None
        self.ratios: dict[int, list[float]] = {}  # batch size -> [ratio EMA, observations]
        self.exact_batch: int | None = None  # None: not calibrated
        self.calibrated_to = 0  # largest batch size calibration tested
        self._fit: tuple[float, float] | None = None

    def observe_step(self, dt: float) -> None:
        if self.step is None:
            self.step = dt
        else:  # one slow step (another process, a page fault) is not the new normal
            self.step = 0.8 * self.step + 0.2 * min(dt, 3 * self.step)

    def observe_verify(self, n: int, dt: float) -> None:
        r = min(max(dt / self.step_cost(), 0.5), 3.0 * n)
        have = self.ratios.get(n)
        if have is None:
            self.ratios[n] = [r, 1.0]
        else:
            # Geometric mean, each observation moving it by at most 25%: one
            # step that another process slowed down must not decide the next ones.
            move = min(max(0.3 * math.log(r / have[0]), -0.22), 0.22)
            have[0] *= math.exp(move)
            have[1] += 1
        self._fit = None

    def set_ratios(self, ratios: dict[int, float]) -> None:
        """Start from stored ratios (one observation each), as calibration saved them."""
        self.ratios = {n: [r, 1.0] for n, r in ratios.items()}
        self._fit = None

    def step_cost(self) -> float:
        return self.step if self.step is not None else 0.012

    @property
    def verify(self) -> dict[int, float]:
        """Estimated seconds per batch size that has been measured."""
        return {n: self.verify_cost(n) for n in sorted(self.ratios)}

    def line(self) -> tuple[float, float]:
        """(a, b): a verify batch of n tokens costs max(1, a + b (n - 1)) plain steps."""
        return self._fit if self._fit is not None else self._line()

    def _line(self) -> tuple[float, float]:
        """ratio(n) = 1 + b (n - 1): a batch of one token is a plain step; b is
        the least-squares slope over the measured sizes (a free intercept
        lets noise in the small sizes make short drafts look cheap)."""
        if self._fit is None:
            pts = [(n - 1, r, min(c, 10.0)) for n, (r, c) in self.ratios.items() if n > 1]
            if not pts:
                b = 0.55  # DESIGN.md's figures for this kind of CPU
            else:
                b = sum(w * x * (r - 1.0) for x, r, w in pts) / sum(w * x * x for x, _, w in pts)
            self._fit = (1.0, min(max(b, 0.05), 2.0))
        return self._fit

    def verify_cost(self, n: int) -> float:
        """Estimated seconds to verify a batch of ``n`` tokens (logits for all)."""
        if n <= 1:
            return self.step_cost()
        a, b = self._line()
        return self.step_cost() * max(1.0, a + b * (n - 1))
