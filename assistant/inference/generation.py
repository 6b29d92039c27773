"""The generation loop, shared by every backend.

Runs in a model's worker thread. It reuses the KV cache for the longest
prefix the new prompt shares with what is cached (so a session's second turn
does not re-read its history), checks for cancellation between decode steps,
streams UTF-8-safe text, honours stop strings and never truncates the context
silently: a prompt that does not fit is an error, and a reply that runs into
the end of the window stops with ``finish_reason: "length"`` and
``context_full: true`` in its stats.

Decoding is a token generator: :func:`plain_tokens` here, or
``SpeculativeEngine.decode`` with a drafter. :func:`generate` is their one
consumer: the only place that detokenizes, applies stop strings, emits
text, counts tokens, masks end-of-generation tokens (``ignore_eos``, through
the sampler every decoder draws with) and decides when the reply ends
(end-of-generation token, stop string, ``max_tokens``, full context,
cancel); then it closes the generator.

A prompt may carry media (a ``backends.media.MediaPrompt`` from
``Backend.tokenize_media``): its text goes through ``forward`` in chunks as
any prompt's, each medium through ``Backend.forward_media`` at its position,
and the cached prefix is reused up to the last whole medium it holds
(``MediaPrompt.safe_prefix``), so a session's next turn about the same image
does not encode it again. ``prompt_tokens`` counts the positions media take.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from backends.base import Backend, ContextOverflowError, IncrementalDecoder, MediaError
from backends.media import MediaPrompt, MediaSpan

from assistant.inference.sampling import Sampler, SamplingParams
from assistant.inference.stats import GenerationStats

if TYPE_CHECKING:
    from assistant.inference.speculative import SpeculativeEngine

# Prompt tokens are fed in chunks of this size so a cancel during a long
# prefill is seen within one chunk.
PREFILL_CHUNK = 256


@dataclass
class GenerationResult:
    """A finished reply: its text, its tokens (end-of-generation excluded),
    why it ended and its figures."""

    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: GenerationStats
    # Under a response_format: whether the text is a whole reply of its grammar (a reply
    # cut by max_tokens or a stop string is not); None without one.
    complete: bool | None = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class StopMatcher:
    """Finds stop strings in streamed text and holds back what might start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit now, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out = self.pending[: min(hits)]
            self.pending = ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def prefill(backend: Backend, prompt: Sequence[int] | MediaPrompt, cancel: threading.Event | None = None):
    """Bring the cache to ``prompt`` (token ids, or a MediaPrompt) and return the
    logits of its last position.

    Reuses the cached prefix (never a part of a medium); at least one token is
    always evaluated, since its logits are needed. Returns (logits row or None if
    cancelled, reused)."""
    logits, reused, _ = _prefill(backend, prompt, cancel)
    return logits, reused


def _prefill(backend: Backend, prompt: Sequence[int] | MediaPrompt,
             cancel: threading.Event | None) -> tuple[np.ndarray | None, int, list[MediaSpan]]:
    """:func:`prefill`, and the media it evaluated (those reused from the cache are not)."""
    media = prompt if isinstance(prompt, MediaPrompt) else None
    spans: list[MediaSpan] = []
    if media is not None:
        spans = sorted(media.spans, key=lambda sp: sp.start)
        prompt = media.tokens
        if spans and spans[-1].end >= len(prompt):
            raise MediaError("a prompt cannot end in a medium: the reply is prompted by text after it")
    n_ctx = backend.info.context_length
    if len(prompt) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt is {len(prompt)} tokens but the context window is {n_ctx}; "
            "shorten the conversation or load the model with a larger context",
            needed=len(prompt),
            available=n_ctx,
        )
    reused = min(common_prefix(backend.cached_tokens, prompt), len(prompt) - 1)
    if media is not None:  # a cache keeps a whole medium or none of it
        reused = media.safe_prefix(reused)
    backend.truncate(reused)
    reused = min(reused, len(backend.cached_tokens))  # a cache that could not be cut there was cleared
    pos = reused
    logits = None
    evaluated: list[MediaSpan] = []
    pending = [sp for sp in spans if sp.start >= pos]
    while pos < len(prompt):
        if cancel is not None and cancel.is_set():
            return None, reused, evaluated
        if pending and pending[0].start == pos:
            span = pending.pop(0)
            backend.forward_media(span)
            evaluated.append(span)
            pos = span.end
            continue
        end = min(pos + PREFILL_CHUNK, pending[0].start if pending else len(prompt))
        logits = backend.forward(prompt[pos:end])
        pos = end
    return logits[-1], reused, evaluated


def plain_tokens(backend: Backend, logits: np.ndarray, sampler: Sampler, history: list[int]) -> Iterator[int]:
    """Plain decoding as a token generator: sample from ``logits`` (the last
    prompt position's row), yield the token, and when the caller asks for the
    next one append it to ``history`` and evaluate it. Endless: the caller
    stops (it must, at the end of the context window)."""
    while True:
        token = sampler.sample(logits, history)
        yield token
        history.append(token)
        logits = backend.forward((token,))[-1]


class _Reply:
    """The text of a reply as it streams: detokenized UTF-8-safely, cut at
    a stop string, handed to ``on_text`` piece by piece."""

    def __init__(self, backend: Backend, stop: Sequence[str], on_text: Callable[[str], None] | None):
        self.decoder = IncrementalDecoder(backend)
        self.stopper = StopMatcher(stop)
        self.on_text = on_text
        self.tokens: list[int] = []
        self.pieces: list[str] = []
        self.stopped = False  # a stop string was hit

    def add(self, token: int) -> bool:
        """Take one token; True when it completed a stop string."""
        self.tokens.append(token)
        text, self.stopped = self.stopper.feed(self.decoder.push(token))
        if text:
            self._emit(text)
        return self.stopped

    def finish(self) -> None:
        if not self.stopped:  # text held back for a possible stop string is real output
            tail = self.stopper.flush() + self.decoder.flush()
            if tail:
                self._emit(tail)

    def _emit(self, text: str) -> None:
        self.pieces.append(text)
        if self.on_text is not None:
            self.on_text(text)


def _consume(tokens: Iterator[int], backend: Backend, reply: _Reply, *, n_prompt: int, max_tokens: int,
             cancel: threading.Event | None) -> tuple[str, bool, float | None]:
    """Take tokens from a decoding generator until the reply ends, then close
    it. Returns (finish reason, context full, time of the first token)."""
    is_eog = backend.is_eog
    n_ctx = backend.info.context_length
    t_first = None
    try:
        for token in tokens:
            if t_first is None:
                t_first = time.perf_counter()
            if is_eog(token):
                return "stop", False, t_first
            if reply.add(token):
                return "stop", False, t_first
            n = len(reply.tokens)
            if n >= max_tokens:
                return "length", False, t_first
            if n_prompt + n > n_ctx:  # the cache is full: this token cannot be evaluated
                return "length", True, t_first
            if cancel is not None and cancel.is_set():
                return "cancelled", False, t_first
        return "length", True, t_first  # a generator ends only where the window does
    finally:
        tokens.close()


def generate(
    backend: Backend,
    prompt: Sequence[int] | MediaPrompt,
    params: SamplingParams,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    started: float | None = None,
    ignore_eos: bool = False,
    speculative: "SpeculativeEngine | None" = None,
    label: str | None = None,
) -> GenerationResult:
    """Generate a reply to ``prompt`` (token ids, or a ``MediaPrompt`` with images
    or audio the backend reads natively), streaming text to ``on_text``.

    ``started`` is the ``time.perf_counter()`` at which the request arrived,
    so ``ttft_ms`` includes any time spent waiting in the model's queue.
    ``ignore_eos`` masks end-of-generation tokens (benchmarks, tests).
    ``params.response_format`` constrains the reply (structured output, see
    ``assistant.inference.constraints``): every token is one the grammar
    allows, so a reply that ends on its own (``finish_reason: "stop"`` at
    end-of-generation) is whole; one cut by ``max_tokens`` (``"length"``) or
    a stop string is only a prefix.
    ``speculative`` (an ``assistant.inference.speculative.SpeculativeEngine``)
    decodes with a drafter; without one decoding is plain. ``label`` is the
    model's name in the stats (default: ``backend.info.name``).
    """
    t0 = time.perf_counter()
    started = t0 if started is None else started
    sampler = _sampler(backend, params, ignore_eos)
    reply = _Reply(backend, stop, on_text)
    finish, context_full, t_first = "cancelled", False, None
    spans = list(prompt.spans) if isinstance(prompt, MediaPrompt) else []
    logits, reused, encoded = _prefill(backend, prompt, cancel)
    if isinstance(prompt, MediaPrompt):
        prompt = prompt.tokens
    t_prefill = time.perf_counter()
    if logits is not None:
        history = list(prompt)  # the decoder appends the tokens taken
        tokens = (plain_tokens(backend, logits, sampler, history) if speculative is None
                  else speculative.decode(backend, logits, sampler, history, max_tokens=max_tokens))
        finish, context_full, t_first = _consume(tokens, backend, reply, n_prompt=len(prompt),
                                                 max_tokens=max_tokens, cancel=cancel)
    reply.finish()
    t_end = time.perf_counter()
    n = len(reply.tokens)
    decode_s = (t_end - t_first) if t_first is not None else 0.0
    info = backend.info
    complete = _complete(sampler, finish, reply)
    return GenerationResult("".join(reply.pieces), reply.tokens, finish, complete=complete, stats=GenerationStats(
        backend=info.backend,
        model=info.name if label is None else label,
        prompt_tokens=len(prompt),
        cached_prompt_tokens=reused,
        completion_tokens=n,
        ttft_ms=round((t_first - started) * 1000, 2) if t_first is not None else None,
        prefill_ms=round((t_prefill - t0) * 1000, 2),
        queue_ms=round((t0 - started) * 1000, 2),
        # Tokens after the first over the time after the first: the steady
        # decode rate, not diluted by prefill (that is ttft_ms).
        tokens_per_second=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
        total_ms=round((t_end - started) * 1000, 2),
        context_length=info.context_length,
        context_used=len(backend.cached_tokens),
        context_full=context_full,
        finish_reason=finish,
        **_speculative_stats(speculative),
        **_media_stats(spans, encoded),
    ))


def _sampler(backend: Backend, params: SamplingParams, ignore_eos: bool) -> Sampler:
    """The reply's sampler: with the grammar of ``params.response_format`` if it has one.
    Under a grammar ``ignore_eos`` does nothing: the grammar says where the reply may end,
    and end-of-generation is the only token it allows there."""
    fmt = params.response_format
    if fmt is None:
        return Sampler(params, banned=backend.info.eos_token_ids if ignore_eos else ())
    from assistant.inference.constraints import constraint_for

    return Sampler(params, constraint=constraint_for(fmt, backend))


def _complete(sampler: Sampler, finish: str, reply: _Reply) -> bool | None:
    """Whether a constrained reply is whole: it ended at end-of-generation, where only a
    finished grammar lets it end (the grammar has also taken that token, which the
    reply leaves out), and not at a stop string."""
    if sampler.constraint is None:
        return None
    return finish == "stop" and not reply.stopped and sampler.constraint.complete


def _media_stats(spans: list[MediaSpan], encoded: list[MediaSpan]) -> dict:
    """The media part of the stats: the positions the prompt's media take, and the time
    spent encoding those this request evaluated (None, absent from the wire, where every
    one came from the KV cache: nothing was encoded)."""
    if not spans:
        return {}
    return {"media_tokens": sum(sp.length for sp in spans),
            "media_encode_ms": round(sum(sp.encode_ms or 0.0 for sp in encoded), 2) if encoded else None}


def _speculative_stats(engine: "SpeculativeEngine | None") -> dict:
    """The drafter's part of the stats (plain decoding: drafter "off", nothing drafted)."""
    if engine is None:
        return {}
    return {"drafter": engine.name, "drafter_kind": getattr(engine.drafter, "kind", None),
            "drafted": engine.drafted, "accepted": engine.accepted, "speculative": engine.verify}
