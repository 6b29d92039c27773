"""Turning logits into a token: one sampler shared by every backend.

It works on the numpy rows that ``Backend.forward`` returns, so the
generation loop and the speculative engine sample identically whatever the
backend. ``distribution`` exposes the final probabilities (after penalties,
temperature and truncation) because rejection sampling needs them.

Tokens a request must never get (``banned``: the end-of-generation tokens
when the caller ignores them) are masked here, the one place every decode
loop samples through; so is a reply's grammar (``constraint``: structured
output, ``assistant.inference.constraints``), which is told every token the
sampler picks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from assistant.inference.constraints import Constraint, ResponseFormat


@dataclass
class SamplingParams:
    """Sampling settings of one request; defaults match config.example.yaml."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    # What the reply must be (JSON, a JSON Schema); None: free text. ``generate`` builds the
    # reply's constraint from it; a backend that forwards requests reads it as is.
    response_format: "ResponseFormat | None" = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamplingParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names and v is not None})


class Sampler:
    """Samples from logits with the llama.cpp order of operations:
    repeat penalty, then the grammar's mask, top-k, temperature, top-p, min-p.

    With a ``constraint`` the sampler is stateful: :meth:`sample` takes the
    token it returns (the grammar advances by it), and a caller that picks a
    token otherwise (rejection sampling from :meth:`distribution`) hands it
    to :meth:`take`. :meth:`distribution` changes nothing."""

    def __init__(self, params: SamplingParams, *, banned: Sequence[int] = (),
                 constraint: "Constraint | None" = None):
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self.banned = list(banned)  # token ids never sampled (their logits count as -inf)
        self.constraint = constraint

    @property
    def is_argmax(self) -> bool:
        """Whether ``sample(row, history)`` is ``argmax(row)`` whatever the
        history (greedy, no penalty, nothing banned, no grammar): the engine
        then picks a whole verify batch with one ``argmax``."""
        p = self.params
        return p.greedy and p.repeat_penalty == 1.0 and not self.banned and self.constraint is None

    def take(self, token: int) -> None:
        """``token`` comes next in the reply: the grammar (if any) advances by it."""
        if self.constraint is not None:
            self.constraint.take(token)

    def _masked(self, logits: np.ndarray) -> np.ndarray:
        out = logits.copy()  # the backend's row stays as it was
        out[self.banned] = -np.inf
        return out

    def _penalised(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The logits after the repeat penalty, the banned tokens' mask and the
        grammar's (a copy where any applies, else ``logits`` itself)."""
        out = self._penalty(logits, history)
        return out if self.constraint is None else self.constraint.mask(out)

    def _penalty(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        if p.repeat_penalty == 1.0 or not history or p.repeat_last_n == 0:
            return self._masked(logits) if self.banned else logits
        recent = np.unique(np.asarray(history[-p.repeat_last_n :], dtype=np.int64))
        if len(recent) and recent[0] < 0:  # media placeholders (backends/media.py) are no tokens
            recent = recent[recent >= 0]
        out = logits.astype(np.float32, copy=True)
        vals = out[recent]
        out[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if self.banned:
            out[self.banned] = -np.inf
        return out

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Candidate token ids and their probabilities (summing to 1).

        For greedy settings this is the single argmax token with probability 1.
        """
        p = self.params
        logits = self._penalised(logits, history)
        if p.greedy:
            return np.array([int(np.argmax(logits))]), np.array([1.0])
        vocab = logits.shape[-1]
        if 0 < p.top_k < vocab:
            # argpartition is O(V); only the k survivors get sorted below.
            cand = np.argpartition(logits, vocab - p.top_k)[vocab - p.top_k :]
        else:
            cand = np.arange(vocab)
        scaled = logits[cand].astype(np.float64) / p.temperature
        order = np.argsort(-scaled, kind="stable")
        cand, scaled = cand[order], scaled[order]
        probs = np.exp(scaled - scaled[0])
        probs /= probs.sum()
        keep = len(probs)
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (at least one token).
            keep = min(keep, int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1)
        if p.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(probs >= p.min_p * probs[0]))))
        cand, probs = cand[:keep], probs[:keep]
        return cand, probs / probs.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """One token drawn from ``logits`` (``history``: the text so far, for the repeat
        penalty); with a constraint, the grammar takes it."""
        token = self._draw(logits, history)
        self.take(token)
        return token

    def _draw(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        if p.greedy and (p.repeat_penalty == 1.0 or not history):
            # The hot path: no copies (one where tokens are banned, as the mask needs).
            token = int(np.argmax(self._masked(logits) if self.banned else logits))
            c = self.constraint
            # The grammar's mask only where the model's own pick is not allowed: argmax
            # over the allowed tokens is the same token either way, and checking one
            # token costs a fraction of computing the mask.
            if c is None or c.allows(token):
                return token
            return int(np.argmax(c.mask(self._masked(logits) if self.banned else logits)))
        cand, probs = self.distribution(logits, history)
        if len(cand) == 1:
            return int(cand[0])
        return int(cand[self.choice(probs)])

    def choice(self, probs: np.ndarray) -> int:
        """Index drawn from ``probs`` with this sampler's seeded generator."""
        idx = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), side="right"))
        return min(idx, len(probs) - 1)
