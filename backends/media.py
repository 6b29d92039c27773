"""Media (images, audio) in a prompt: the types the backends and the generation loop share.

A model that takes a medium natively (``Backend.media_support``) reads it
into the same KV cache as the text. The daemon renders the conversation
with one ``Backend.media_marker()`` in the text where each media part was,
and hands the backend the rendered text and the parts, in order
(``Backend.tokenize_media``). The backend returns a :class:`MediaPrompt`:
the prompt's token list in which each medium occupies as many positions
as the model counts for it (mtmd's ``n_pos`` on llama.cpp), all holding one
*placeholder id*, a negative number derived from the medium's sha256.

Why placeholders in the token list: the generation loop reuses the cached
prefix by comparing token lists, so the same image in a session's next turn
compares equal (no second encode) and a different one differs at its first
position. Negative ids are never real tokens: drafters stop at them, the
sampler's repetition penalty skips them, and a cache is never cut inside a
medium (``MediaPrompt.safe_prefix``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

MEDIA_KINDS = ("image", "audio")


@dataclass(frozen=True)
class MediaInput:
    """One medium of a prompt, already checked and stored by the daemon.

    ``path`` is the file in the daemon's content-addressed media store (never
    a path a client named), ``sha256`` its content hash, ``kind`` "image" or
    "audio", ``mime`` its type as sniffed from the bytes ("image/png",
    "audio/wav", ...)."""

    kind: str
    path: str
    sha256: str
    mime: str


def placeholder_id(sha256: str) -> int:
    """The negative id a medium's positions hold in a token list: the same for
    the same content, different (but for a 2**-62 chance) for different content."""
    return -1 - (int(sha256[:16], 16) >> 2)


@dataclass
class MediaSpan:
    """Where one medium sits in a :class:`MediaPrompt`'s tokens.

    ``start``/``length``: the positions it occupies (``length`` is the model's
    position count, mtmd's ``n_pos``); ``n_tokens``: the embeddings it adds
    (mtmd's ``n_tokens``: equal to ``length`` except on M-RoPE models);
    ``handle``: whatever the backend needs to evaluate it (an mtmd chunk, a
    tensor of embeddings); ``encode_ms``: time spent encoding it (set by the
    backend when it evaluates the span)."""

    media: MediaInput
    start: int
    length: int
    n_tokens: int
    handle: Any = None
    encode_ms: float | None = None

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def placeholder(self) -> int:
        return placeholder_id(self.media.sha256)


@dataclass
class MediaPrompt:
    """A prompt with media: ``tokens`` (placeholders at each span's positions)
    and the ``spans`` in order. ``tokens`` is what the cache is compared with."""

    tokens: list[int]
    spans: list[MediaSpan] = field(default_factory=list)

    def safe_prefix(self, n: int) -> int:
        """The largest cut at or below ``n`` that is not inside a medium: a
        cache can keep a whole medium or none of it."""
        return _cut_point(((sp.start, sp.end) for sp in self.spans), n)

    def span_at(self, pos: int) -> MediaSpan | None:
        """The span starting at ``pos``, if any."""
        for span in self.spans:
            if span.start == pos:
                return span
        return None


class CachedMedia:
    """Where the media in a backend's KV cache are, one ``[start, end)`` per medium
    in order: the bookkeeping behind "a cache holds a whole medium or none of it"
    that every backend with ``forward_media`` keeps the same way."""

    def __init__(self) -> None:
        self._spans: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self._spans)

    def add(self, start: int, end: int) -> None:
        """A medium now takes positions ``start``..``end - 1`` of the cache."""
        self._spans.append((start, end))

    def cut_point(self, n: int) -> int:
        """Where a cut to ``n`` tokens must be made instead: a medium's start, if inside one."""
        return _cut_point(self._spans, n)

    def keep(self, n: int) -> None:
        """The cache was cut to ``n`` tokens: forget the media past it."""
        if self._spans and self._spans[-1][1] > n:
            self._spans = [(s, e) for s, e in self._spans if e <= n]

    def clear(self) -> None:
        self._spans = []


def _cut_point(spans: Iterable[tuple[int, int]], n: int) -> int:
    for start, end in spans:
        if start < n < end:
            return start
    return n


def text_only(tokens: Sequence[int]) -> list[int]:
    """``tokens`` without media placeholders (for a drafter model that sees only text)."""
    return [t for t in tokens if t >= 0]
