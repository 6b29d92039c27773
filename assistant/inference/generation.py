"""The generation loop, shared by every backend.

Runs in a model's worker thread. It reuses the KV cache for the longest
prefix the new prompt shares with what is cached (so a session's second turn
does not re-read its history), checks for cancellation between decode steps,
streams UTF-8-safe text, honours stop strings and never truncates the context
silently: a prompt that does not fit is an error, and a reply that runs into
the end of the window stops with ``finish_reason: "length"`` and
``context_full: true`` in its stats.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from backends.base import Backend, ContextOverflowError, IncrementalDecoder

from assistant.inference.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from assistant.inference.speculative import SpeculativeEngine

# Prompt tokens are fed in chunks of this size so a cancel during a long
# prefill is seen within one chunk.
PREFILL_CHUNK = 256


@dataclass
class GenerationResult:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    stats: dict[str, Any] = field(default_factory=dict)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
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


def prefill(backend: Backend, prompt: Sequence[int], cancel: threading.Event | None = None):
    """Bring the cache to ``prompt`` and return the logits of its last position.

    Reuses the cached prefix; at least one token is always evaluated, since
    its logits are needed. Returns (logits row or None if cancelled, reused).
    """
    n_ctx = backend.info.context_length
    if len(prompt) >= n_ctx:
        raise ContextOverflowError(
            f"the prompt is {len(prompt)} tokens but the context window is {n_ctx}; "
            "shorten the conversation or load the model with a larger context",
            needed=len(prompt),
            available=n_ctx,
        )
    reused = min(common_prefix(backend.cached_tokens, prompt), len(prompt) - 1)
    backend.truncate(reused)
    pos = reused
    logits = None
    while pos < len(prompt):
        if cancel is not None and cancel.is_set():
            return None, reused
        chunk = prompt[pos : pos + PREFILL_CHUNK]
        logits = backend.forward(chunk)
        pos += len(chunk)
    return logits[-1], reused


def generate(
    backend: Backend,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    max_tokens: int,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    cancel: threading.Event | None = None,
    started: float | None = None,
    ignore_eos: bool = False,
    speculative: "SpeculativeEngine | None" = None,
) -> GenerationResult:
    """Generate a reply to ``prompt`` (token ids), streaming text to ``on_text``.

    ``started`` is the ``time.perf_counter()`` at which the request arrived,
    so ``ttft_ms`` includes any time spent waiting in the model's queue.
    ``ignore_eos`` masks end-of-generation tokens (benchmarks, tests).
    ``speculative`` (an ``assistant.inference.speculative.SpeculativeEngine``) runs the
    decode loop with a drafter; without one the plain loop below runs.
    """
    t0 = time.perf_counter()
    started = t0 if started is None else started
    sampler = Sampler(params)
    decoder = IncrementalDecoder(backend)
    stopper = StopMatcher(stop)
    n_ctx = backend.info.context_length
    history = list(prompt)
    out_tokens: list[int] = []
    pieces: list[str] = []
    finish = "length"
    context_full = False
    stop_hit = False
    t_first = None

    logits, reused = prefill(backend, prompt, cancel)
    t_prefill = time.perf_counter()
    if logits is None:
        finish = "cancelled"
    eog = list(backend.info.eos_token_ids) if ignore_eos else []
    if speculative is not None and logits is not None:

        def push(token: int) -> str | None:
            """Emit one token as the plain loop does; a finish reason ends the reply."""
            nonlocal t_first, stop_hit
            if t_first is None:
                t_first = time.perf_counter()
            if backend.is_eog(token):
                return "stop"
            out_tokens.append(token)
            history.append(token)
            text, hit = stopper.feed(decoder.push(token))
            if text:
                pieces.append(text)
                if on_text is not None:
                    on_text(text)
            if hit:
                stop_hit = True
                return "stop"
            return "length" if len(out_tokens) >= max_tokens else None

        finish, context_full = speculative.decode(backend, logits, sampler, history, push, max_tokens=max_tokens,
                                                  cancel=cancel, eog=eog)
        logits = None
    while logits is not None:
        if eog:
            logits = logits.copy()
            logits[eog] = -float("inf")
        token = sampler.sample(logits, history)
        if t_first is None:
            t_first = time.perf_counter()
        if backend.is_eog(token):
            finish = "stop"
            break
        out_tokens.append(token)
        history.append(token)
        text, hit = stopper.feed(decoder.push(token))
        if text:
            pieces.append(text)
            if on_text is not None:
                on_text(text)
        if hit:
            finish, stop_hit = "stop", True
            break
        if len(out_tokens) >= max_tokens:
            finish = "length"
            break
        if len(backend.cached_tokens) + 1 > n_ctx:
            finish, context_full = "length", True
            break
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        logits = backend.forward((token,))[-1]

    if not stop_hit:  # text held back for a possible stop string is real output
        tail = stopper.flush() + decoder.flush()
        if tail:
            pieces.append(tail)
            if on_text is not None:
                on_text(tail)
    t_end = time.perf_counter()
    n = len(out_tokens)
    decode_s = (t_end - t_first) if t_first is not None else 0.0
    info = backend.info
    stats = {
        "backend": info.backend,
        "model": info.name,
        "prompt_tokens": len(prompt),
        "cached_prompt_tokens": reused,
        "completion_tokens": n,
        "ttft_ms": round((t_first - started) * 1000, 2) if t_first is not None else None,
        "prefill_ms": round((t_prefill - t0) * 1000, 2),
        "queue_ms": round((t0 - started) * 1000, 2),
        # Tokens after the first over the time after the first: the steady
        # decode rate, not diluted by prefill (that is ttft_ms).
        "tokens_per_second": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
        "total_ms": round((t_end - started) * 1000, 2),
        "context_length": n_ctx,
        "context_used": len(backend.cached_tokens),
        "context_full": context_full,
        "finish_reason": finish,
    }
    if speculative is not None:
        stats.update(speculative.stats or {"drafter": speculative.name, "drafted": 0, "accepted": 0,
                                           "acceptance_rate": None})
    else:
        stats.update(drafter="off", drafted=0, accepted=0, acceptance_rate=None)
    return GenerationResult("".join(pieces), out_tokens, finish, stats)
