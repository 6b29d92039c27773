"""Prompt lookup (the ``ngram`` drafter): drafts by copying what followed an
earlier occurrence of the text's last few tokens. No extra model; a few
microseconds per token.

What makes it draft well where a reply copies (quotes, edits, rewrites):

- The match is judged by its *context*: how far back the text before the
  candidate equals the text before the reply's end, measured up to
  ``CONTEXT_MAX`` (64) tokens, not just the ``ngram_max`` tokens that were
  looked up. A reply 64 tokens into a verbatim copy drafts in the class
  ``ngram:64+``, whose acceptance the controller learns separately from short
  matches; the draft then runs to the end of the source's continuation (up to
  what the controller allows: the exact-batch limit), not a few tokens at a
  time. (llama.cpp's ``ngram-mod`` gets the same effect by hashing 24 tokens
  and drafting 48-64 on a hit.)
- Several earlier occurrences compete (the most recent ``CANDIDATES`` of the
  looked-up n-gram): the longest context wins; on a tie, the one that continues
  the copy the reply was following (its offset between source and reply within
  ``SYNC_WINDOW`` of the last draft's: a short insertion or deletion, like an
  added type hint, then re-synchronises at once), then
  the source (the prompt, the conversation before it, or the reply so far)
  whose recent drafts were accepted most, then the most recent.
"""

from __future__ import annotations

from typing import Iterable

from assistant.inference.sampling import SamplingParams
from assistant.inference.speculative.drafter import (DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, Chooser, Draft,
                                                     check_ngram)

CONTEXT_MAX = 64  # how far back a match's context is measured
CANDIDATES = 4  # earlier occurrences of the looked-up n-gram that compete
SYNC_WINDOW = 32  # a source offset this close to the last draft's continues the same copy
SOURCES = ("history", "prompt", "reply")
DRAFT_MIN_REACH = 8  # the most a match with a short context drafts is twice its context, at least this


def match_class(length: int) -> str:
    """The draft class of a match whose context is ``length`` tokens long
    (the controller measures acceptance per class: long matches are copies)."""
    if length >= 64:
        return "ngram:64+"
    if length >= 32:
        return "ngram:32+"
    if length >= 16:
        return "ngram:16+"
    if length >= 8:
        return "ngram:8+"
    if length >= 5:
        return "ngram:5+"
    return f"ngram:{length}"


def _context(toks: list[int], e: int, size: int, cap: int) -> int:
    """How many tokens before ``e`` equal those before ``size`` (at most ``cap``)."""
    cap = min(cap, e)
    if toks[e - cap : e] == toks[size - cap : size]:  # a copy: one C-level comparison
        return cap
    j = 0
    while j < cap and toks[e - j - 1] == toks[size - j - 1]:
        j += 1
    return j


class NgramDrafter:
    """Prompt lookup: continue an earlier occurrence of the longest n-gram
    (``ngram_max`` down to ``ngram_min`` tokens) that ends the text so far,
    chosen among the recent occurrences by context, by the copy being
    followed and by the acceptance of its source (see the module doc).

    The index covers the prompt (the conversation history is part of it)
    and the text generated so far, and grows as the text does. ``history``
    (tokens) may say where the conversation before the current message ends,
    so that it ranks as a source of its own. ``stop_ids`` (the model's
    end-of-generation tokens) end a draft: the source's stretch ends there (the
    end of a message), and what follows it is another message's text."""

    name = "ngram"

    def __init__(self, ngram_min: int = DEFAULT_NGRAM_MIN, ngram_max: int = DEFAULT_NGRAM_MAX, *,
                 stop_ids: Iterable[int] = ()):
        self.nmin, self.nmax = check_ngram(ngram_min, ngram_max)
        self.stop_ids = frozenset(int(t) for t in stop_ids)
        self.history = 0
        self.begin([])

    def begin(self, tokens: list[int], params: SamplingParams | None = None) -> None:
        self._tokens = tokens
        self._n_prompt = len(tokens)
        # n-gram -> the latest continuation position; _prev chains each position
        # to the previous occurrence of the same n-gram (-1: none).
        self._index: list[dict[tuple[int, ...], int]] = [dict() for _ in range(self.nmax + 1)]
        self._prev: list[dict[int, int]] = [dict() for _ in range(self.nmax + 1)]
        self._done = 0  # continuation positions e < _done are indexed
        # source -> [accepted, drafted], decayed: the recent acceptance of its drafts
        self._source: dict[str, list[float]] = {s: [1.0, 2.0] for s in SOURCES}
        self._last: tuple[int, int, int, str] | None = None  # (at, source start, tokens, source) of the last draft
        self._offset: int | None = None  # source position - reply position of the copy being followed
        self._follow: str | None = None  # and its source

    def _update(self, toks: list[int]) -> None:
        # Index the n-grams that end at e (exclusive) for every e whose
        # continuation toks[e] exists; later occurrences are found first.
        end = len(toks) - 1
        index, prev, nmin, nmax = self._index, self._prev, self.nmin, self.nmax
        for e in range(max(self._done, nmin), end + 1):
            for n in range(nmin, min(nmax, e) + 1):
                key = tuple(toks[e - n : e])
                idx = index[n]
                prev[n][e] = idx.get(key, -1)
                idx[key] = e
        if end + 1 > self._done:
            self._done = end + 1

    def source_of(self, e: int) -> str:
        """Which source position ``e`` lies in: "history", "prompt" or "reply"."""
        if e >= self._n_prompt:
            return "reply"
        return "history" if e < self.history else "prompt"

    def _feedback(self, toks: list[int]) -> None:
        """How much of the last draft the text took: its source's acceptance."""
        at, e, k, src = self._last
        self._last = None
        m = 0
        end = min(k, len(toks) - at)
        while m < end and toks[at + m] == toks[e + m]:
            m += 1
        s = self._source[src]
        s[0] = 0.8 * s[0] + m
        s[1] = 0.8 * s[1] + min(k, m + 1)

    def _rank(self, e: int, size: int, length: int) -> tuple:
        src = self.source_of(e)
        a, n = self._source[src]
        off = self._offset
        sync = off is not None and src == self._follow and abs((e - size) - off) <= SYNC_WINDOW
        # Continuing the followed copy counts as 16 tokens of context: after a short
        # edit the copy goes on from there, not from a look-alike elsewhere.
        return (min(length + 16 * sync, CONTEXT_MAX), sync, a / n, e)

    def lookup(self, toks: list[int]) -> tuple[int, int] | None:
        """(position the continuation starts at, matched context length) or None."""
        hit = self._find(toks)
        return None if hit is None else hit[:2]

    def _find(self, toks: list[int]) -> tuple[int, int, bool] | None:
        """(continuation position, context length, whether it continues the followed copy)."""
        if len(toks) > self._done:
            self._update(toks)
        size = len(toks)
        index, prev = self._index, self._prev
        for n in range(min(self.nmax, size - 1), self.nmin - 1, -1):
            e = index[n].get(tuple(toks[size - n :]))
            if e is None:
                continue
            chain = prev[n]
            best = None
            for _ in range(CANDIDATES):
                length = _context(toks, e, size, CONTEXT_MAX)
                rank = self._rank(e, size, length)
                if best is None or rank > best[0]:
                    best = (rank, e, length)
                if length >= CONTEXT_MAX:
                    break  # nothing beats a full context but a later one, which came first
                e = chain.get(e, -1)
                if e < 0:
                    break
            rank, e, length = best
            return e, length, rank[1]
        return None

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        if self._last is not None:
            self._feedback(tokens)
        hit = self._find(tokens)
        if hit is None:
            return None
        e, length, sync = hit
        cls = match_class(length)  # (a class of its own for re-synchronised matches measured worse)
        size = len(tokens)
        # The draft's length is set by the match: a copy that has gone on for c tokens
        # is drafted up to 2c further (a short, chance match risks little; a long
        # copy drafts to the end of its source, up to the controller's limit).
        reach = max(DRAFT_MIN_REACH, 2 * length + 8 * sync)
        # A continuation that runs into the end of the text (the reply repeating its
        # last d tokens: a list, a loop) goes on as the same period, as following the
        # n-gram chain through the draft itself would.
        period = size - e
        k = choose(cls, reach if period < reach and e >= self._n_prompt else min(period, reach))
        if k <= 0:
            return None
        draft = tokens[e : e + k] if k <= period else [tokens[e + i % period] for i in range(k)]
        if self.stop_ids and not self.stop_ids.isdisjoint(draft):
            k = next(i for i, t in enumerate(draft) if t in self.stop_ids) + 1
            del draft[k:]
        self._last = (size, e, k, self.source_of(e))
        self._offset = e - size
        self._follow = self._last[3]
        return Draft(draft, cls)

    def close(self) -> None:
        self.begin([])
