"""The figures of one generation, as a dataclass.

:func:`assistant.inference.generation.generate` fills a
:class:`GenerationStats` once, when the reply is done; the daemon adds what
only it knows with ``dataclasses.replace`` (the completion tokens of every
tool round, the tool call count) and sends :meth:`GenerationStats.as_dict`,
which is the wire format of a reply's ``stats`` (docs/protocol.md): its keys
and values must not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VerifyStats:
    """What the speculative engine reports about its verify steps (the
    ``speculative`` key of a reply's stats)."""

    verify_steps: int = 0
    verify_ms: float = 0.0  # time in the target's verify batches
    draft_ms: float = 0.0  # time the drafter spent drafting
    paused: int = 0  # times drafting was paused because it did not pay
    probes: int = 0  # times a switched-off draft class was tried again
    max_draft: int = 0
    exact_batch: int | None = None  # largest bit-exact verify batch (None: not limited, exact=False)

    def as_dict(self) -> dict[str, Any]:
        return {"verify_steps": self.verify_steps, "verify_ms": self.verify_ms, "draft_ms": self.draft_ms,
                "paused": self.paused, "probes": self.probes, "max_draft": self.max_draft,
                "exact_batch": self.exact_batch}


@dataclass(frozen=True)
class GenerationStats:
    """Every figure of one generation: timings, token counts, context use,
    why it ended, and what speculative decoding did.

    Times are milliseconds rounded to 0.01 (``ttft_ms``: from the request's
    arrival, queue included); ``tokens_per_second`` is the steady decode
    rate (tokens after the first over the time after the first), None for
    fewer than two tokens."""

    backend: str
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    ttft_ms: float | None
    prefill_ms: float
    queue_ms: float
    tokens_per_second: float | None
    total_ms: float
    context_length: int
    context_used: int
    context_full: bool
    finish_reason: str  # "stop" | "length" | "cancelled"
    drafter: str = "off"  # the drafter's name ("off": plain decoding)
    # Which kind of that drafter ran: for mtp, "nextn" (the model's own layers) or
    # "assistant" (a separate model such as Gemma 4's); None where it has no kinds.
    drafter_kind: str | None = None
    drafted: int = 0
    accepted: int = 0
    speculative: VerifyStats | None = None  # None where the engine did not decode (off, cancelled in prefill)
    tool_calls: int | None = None  # set by the daemon when the model called skills
    # Media in the prompt (None: none): how the daemon gave them to the model ("native",
    # "ocr", "transcript", several joined by "+"; set by the daemon), the positions the
    # native ones take (mtmd's n_pos), and the time spent encoding those this request
    # evaluated (None when every one was reused from the KV cache: nothing encoded).
    media: str | None = None
    media_tokens: int | None = None
    media_encode_ms: float | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted over drafted tokens (4 decimals), None when nothing was drafted."""
        return round(self.accepted / self.drafted, 4) if self.drafted else None

    def as_dict(self) -> dict[str, Any]:
        """The wire format: today's keys in today's order; ``speculative``,
        ``tool_calls`` and the media keys only where they have a value."""
        out: dict[str, Any] = {
            "backend": self.backend,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_ms": self.ttft_ms,
            "prefill_ms": self.prefill_ms,
            "queue_ms": self.queue_ms,
            "tokens_per_second": self.tokens_per_second,
            "total_ms": self.total_ms,
            "context_length": self.context_length,
            "context_used": self.context_used,
            "context_full": self.context_full,
            "finish_reason": self.finish_reason,
            "drafter": self.drafter,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
        }
        if self.drafter_kind is not None:
            out["drafter_kind"] = self.drafter_kind
        if self.speculative is not None:
            out["speculative"] = self.speculative.as_dict()
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        for key in ("media", "media_tokens", "media_encode_ms"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out
