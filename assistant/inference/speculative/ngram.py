"""Prompt lookup (the ``ngram`` drafter): drafts by copying what followed an
earlier occurrence of the text's last few tokens. No extra model; a few
microseconds per token."""

from __future__ import annotations

from assistant.inference.sampling import SamplingParams
from assistant.inference.speculative.drafter import (DEFAULT_NGRAM_MAX, DEFAULT_NGRAM_MIN, Chooser, Draft,
                                                     check_ngram)


def match_class(length: int) -> str:
    """The draft class of a match whose context is ``length`` tokens long
    (the controller measures acceptance per class: long matches are copies)."""
    if length >= 16:
        return "ngram:16+"
    if length >= 8:
        return "ngram:8+"
    if length >= 5:
        return "ngram:5+"
    return f"ngram:{length}"


class NgramDrafter:
    """Prompt lookup: continue the most recent earlier occurrence of the
    longest n-gram (``ngram_max`` down to ``ngram_min`` tokens) that ends the
    text so far. The class of a draft is the length of the matched context
    (extended backwards up to 32 tokens): long matches are copies.

    The index covers the prompt (the conversation history is part of it)
    and the text generated so far, and grows as the text does."""

    name = "ngram"

    def __init__(self, ngram_min: int = DEFAULT_NGRAM_MIN, ngram_max: int = DEFAULT_NGRAM_MAX):
        self.nmin, self.nmax = check_ngram(ngram_min, ngram_max)
        self.begin([])

    def begin(self, tokens: list[int], params: SamplingParams | None = None) -> None:
        self._tokens = tokens
        self._index: list[dict[tuple[int, ...], int]] = [dict() for _ in range(self.nmax + 1)]
        self._done = 0  # continuation positions e < _done are indexed

    def _update(self, toks: list[int]) -> None:
        # Index the n-grams that end at e (exclusive) for every e whose
        # continuation toks[e] exists; later occurrences overwrite earlier ones.
        end = len(toks) - 1
        index, nmin, nmax = self._index, self.nmin, self.nmax
        for e in range(max(self._done, nmin), end + 1):
            for n in range(nmin, min(nmax, e) + 1):
                index[n][tuple(toks[e - n : e])] = e
        if end + 1 > self._done:
            self._done = end + 1

    def lookup(self, toks: list[int]) -> tuple[int, int] | None:
        """(position the continuation starts at, matched context length) or None."""
        if len(toks) > self._done:
            self._update(toks)
        size = len(toks)
        index = self._index
        for n in range(min(self.nmax, size - 1), self.nmin - 1, -1):
            e = index[n].get(tuple(toks[size - n :]))
            if e is not None:
                j = n
                while j < 32 and e - j - 1 >= 0 and toks[e - j - 1] == toks[size - j - 1]:
                    j += 1
                return e, j
        return None

    def propose(self, tokens: list[int], choose: Chooser) -> Draft | None:
        hit = self.lookup(tokens)
        if hit is None:
            return None
        e, length = hit
        cls = match_class(length)
        k = choose(cls, len(tokens) - e)
        if k <= 0:
            return None
        return Draft(tokens[e : e + k], cls)

    def close(self) -> None:
        self.begin([])
