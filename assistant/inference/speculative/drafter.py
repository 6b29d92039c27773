"""What a drafter is: the :class:`Drafter` protocol, the :class:`Draft` it
proposes, the :class:`DraftContext` a factory builds one from, the errors,
and the checks of the settings every drafter shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from backends.base import Backend

from assistant.inference.sampling import SamplingParams

MAX_DRAFT_LIMIT = 64  # max_draft is 1..MAX_DRAFT_LIMIT
DEFAULT_MAX_DRAFT = 64  # the exact-batch limit (calibration) is what caps a verify batch
DEFAULT_NGRAM_MIN = 2
DEFAULT_NGRAM_MAX = 8
MODES = ("auto", "off")  # names that are not drafters


class DrafterError(ValueError):
    """A bad speculative-decoding setting (unknown drafter, max_draft out of range, ...)."""


class DraftModelError(DrafterError):
    """The draft model cannot be used: missing, failed to load, or not compatible with the target."""


@dataclass
class Draft:
    """Proposed tokens. ``q`` is None for a point-mass draft (each token is
    the drafter's single guess), else per token the drafter's distribution
    ``(candidate ids, probabilities)`` the token was sampled from."""

    tokens: list[int]
    cls: str
    q: list[tuple[np.ndarray, np.ndarray]] | None = None
    cost_s: float = 0.0  # time the drafter spent making it


# choose(cls, available) -> how many tokens to draft now (0: do not draft)
Chooser = Callable[[str, int], int]


class Drafter(Protocol):
    """What the engine needs from a drafter. One instance serves one request."""

    name: str

    def begin(self, tokens: list[int], params: SamplingParams) -> None:
        """A request starts; ``tokens`` is the prompt, and the engine appends
        every generated token to this same list (the drafter may keep it)."""

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        """Draft a continuation of ``tokens``. Call ``choose(cls, available)``
        once the class of this draft and the most tokens it could offer are
        known, and draft at most that many (0: return None)."""

    def close(self) -> None:
        """The request is over."""

    # Optional, for drafters that spend time drafting (a model):
    #   needs_costs: bool  -- the engine measures verify costs before the first proposal
    #   token_cost(cls, plain_step) -> float  -- seconds per drafted token of class cls
    # A drafter without token_cost drafts for free (prompt lookup).


@dataclass
class DraftContext:
    """What a drafter factory gets to build a drafter for one request.

    ``draft`` is a draft model the caller has already loaded (the daemon's
    model registry, with the target's backend class, context and threads);
    the ``draft`` drafter checks that it shares the target's tokenizer.
    ``draft_name`` is how the user named it (alias or path), for messages."""

    target: Backend
    max_draft: int = DEFAULT_MAX_DRAFT
    ngram_min: int = DEFAULT_NGRAM_MIN
    ngram_max: int = DEFAULT_NGRAM_MAX
    draft: Backend | None = None
    draft_name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


DrafterFactory = Callable[[DraftContext], Drafter]


def check_max_draft(value: Any) -> int:
    """``value`` if it is a valid ``max_draft`` (an int from 1 to MAX_DRAFT_LIMIT), else DrafterError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DRAFT_LIMIT:
        raise DrafterError(f"max_draft must be an integer from 1 to {MAX_DRAFT_LIMIT}, got {value!r}")
    return value


def check_ngram(nmin: Any, nmax: Any) -> tuple[int, int]:
    """``(nmin, nmax)`` if they are valid n-gram sizes for prompt lookup, else DrafterError."""
    for v in (nmin, nmax):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
            raise DrafterError(f"n-gram sizes must be integers from 1 to 32, got {v!r}")
    if nmin > nmax:
        raise DrafterError(f"ngram_min ({nmin}) is larger than ngram_max ({nmax})")
    return nmin, nmax


def ema(old: float | None, new: float) -> float:
    """A measured time that follows the recent ones (drafters' step times)."""
    return new if old is None else 0.8 * old + 0.2 * new
