"""A chat turn on a remote model: the messages and sampling settings go to its server.

For a worker whose backend is a ``ChatBackend`` (``backend: remote``; see
``backends/remote.py``) the chat path calls :func:`generate` on the model's
thread where it would render, tokenize and run ``inference.generation``'s
token loop. What comes back is a ``GenerationResult`` like any other, so
sessions, tool rounds, plugins, automations, the TUI, stats and cancel work
as they do on a local model. Here:

- stop strings go to the server and are applied here too (OpenAI's API takes
  at most four; a server may ignore them), so a reply ends at one either way;
- tool calls a server returns in structured form (its ``tool_calls`` deltas,
  merged by ``backends.remote_stream``) are written into the reply as the
  ``<tool_call>`` text the daemon's tool loop reads (``daemon/tools.py``);
- ``response_format`` (structured output) goes to the server as the
  request gave it (the server constrains; nothing is constrained here);
- the stats: token counts from the server's ``usage``, else llama-server's
  ``timings``, else the pieces counted; time to first token, tokens/s and
  the total measured here, from the request's arrival (queue included);
  speculative decoding does not apply (a server that reports drafts shows as
  drafter ``server``). Their ``remote`` part says where each figure came from.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from backends.base import BackendError, ContextOverflowError
from backends.remote import SPECULATIVE_NOTE, ChatBackend
from backends.remote_stream import ChatReply, ChatRequest, ToolCall

from assistant.inference.generation import GenerationResult, StopMatcher
from assistant.inference.sampling import SamplingParams
from assistant.inference.stats import GenerationStats
from assistant.protocol import ErrorCode, RPCError


@dataclass(frozen=True)
class RemoteStats(GenerationStats):
    """A remote reply's stats: the usual figures, and where they came from (``remote``)."""

    remote: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "remote": self.remote}


class _Either:
    """Set when any flag is: the request's cancel (``outside``), or one set here
    (``inside``: a stop string found, too many pieces) while the backend hands over
    a piece, after which it looks anyway. Where every outside flag says when it is
    set (``listen``, the daemon's ``CancelFlag``), so does this one: the backend then
    listens instead of polling while the server is silent."""

    def __init__(self, outside: Any, *inside: Any):
        self.outside = [outside] if outside is not None else []
        self.flags = self.outside + list(inside)
        if all(callable(getattr(f, "listen", None)) for f in self.outside):
            self.listen = self._listen

    def is_set(self) -> bool:
        return any(f.is_set() for f in self.flags)

    def _listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` once the outside flag is set; returns what stops listening."""
        forgets = [f.listen(fn) for f in self.outside]

        def forget_all() -> None:
            for forget in forgets:
                forget()
        return forget_all


def request_for(messages: list[dict[str, Any]], sampling: SamplingParams, *, max_tokens: int,
                stop: Sequence[str] = (), ignore_eos: bool = False, raw: str | None = None) -> ChatRequest:
    """The ``ChatRequest`` for a turn: the conversation (or ``raw``, a prompt sent as it
    is) and the request's sampling settings, its ``response_format`` in OpenAI's shape."""
    fmt = getattr(sampling, "response_format", None)
    return ChatRequest(messages=[] if raw is not None else list(messages), prompt=raw, max_tokens=max_tokens,
                       temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                       min_p=sampling.min_p, repeat_penalty=sampling.repeat_penalty, seed=sampling.seed,
                       stop=[s for s in stop if s], ignore_eos=ignore_eos,
                       response_format=fmt.to_openai() if fmt is not None else None)


def generate(backend: ChatBackend, messages: list[dict[str, Any]], sampling: SamplingParams, *, max_tokens: int,
             stop: Sequence[str] = (), on_text: Callable[[str], None] | None = None, cancel: Any = None,
             started: float | None = None, ignore_eos: bool = False, label: str | None = None,
             raw: str | None = None) -> GenerationResult:
    """One reply from ``backend``'s server, streamed to ``on_text`` (see the module
    docstring). ``cancel`` is the request's flag; ``started`` its arrival
    (``time.perf_counter``). Raises ``ContextOverflowError`` where the conversation
    does not fit the server's window, and ``RPCError(BACKEND_UNAVAILABLE)`` where the
    server cannot be reached, refuses or breaks off (saying how far it got)."""
    t0 = time.perf_counter()
    started = t0 if started is None else started
    emit = on_text or (lambda _text: None)
    stopper, hit, over, pieces = StopMatcher(stop), threading.Event(), threading.Event(), []
    received = 0

    def take(text: str) -> None:
        nonlocal received
        received += 1
        if received > max_tokens:  # a piece is a token at most: a server ignoring max_tokens stops here
            over.set()
            return
        out, stopped = stopper.feed(text)
        if out:
            pieces.append(out)
            emit(out)
        if stopped:
            hit.set()  # the backend looks at it after each piece: the connection closes

    request = request_for(messages, sampling, max_tokens=max_tokens, stop=stop, ignore_eos=ignore_eos, raw=raw)
    try:
        reply = backend.chat(request, on_text=take, cancel=_Either(cancel, hit, over))
    except ContextOverflowError:
        raise
    except BackendError as exc:
        name = label or backend.info.name
        raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, f"model {name!r}: {exc}",
                       {"model": name, "url": backend.info.path, "status": getattr(exc, "status", None),
                        "received": getattr(exc, "received", 0)}) from None
    if not hit.is_set():
        tail = stopper.flush()
        if tail:
            pieces.append(tail)
            emit(tail)
    calls = "".join(_as_text(call) for call in reply.tool_calls) if not hit.is_set() else ""
    if calls:
        pieces.append(calls)
        emit(calls)
    finish = ("stop" if hit.is_set() else "length" if over.is_set()
              else "cancelled" if reply.cancelled else "length" if reply.finish_reason == "length" else "stop")
    return GenerationResult("".join(pieces), [], finish, _stats(backend, reply, finish, started, t0, label))


def _as_text(call: ToolCall) -> str:
    """A structured tool call as the Hermes text ``tools.parse_calls`` reads."""
    try:
        arguments: Any = json.loads(call.arguments) if call.arguments.strip() else {}
    except ValueError:
        arguments = call.arguments  # parse_calls reports what is wrong with it
    return "<tool_call>" + json.dumps({"name": call.name, "arguments": arguments}, ensure_ascii=False) + \
        "</tool_call>"


def _counts(reply: ChatReply) -> tuple[int, int, int, str]:
    """(prompt tokens, of them cached, completion tokens, where the counts came from)."""
    usage, timings = reply.usage or {}, reply.timings or {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    cached = _int(details.get("cached_tokens")) or _int(timings.get("cache_n"))
    if isinstance(usage.get("completion_tokens"), int):
        return _int(usage.get("prompt_tokens")), cached, usage["completion_tokens"], "server"
    if isinstance(timings.get("predicted_n"), int):
        return _int(timings.get("prompt_n")) + _int(timings.get("cache_n")), cached, timings["predicted_n"], \
            "timings"
    return 0, cached, reply.pieces, "counted"  # one piece per token on llama.cpp's servers; the prompt unknown


def _int(value: Any) -> int:
    return value if isinstance(value, int) and value >= 0 else 0


def _stats(backend: ChatBackend, reply: ChatReply, finish: str, started: float, t0: float,
           label: str | None) -> RemoteStats:
    info = backend.info
    prompt, cached, n, source = _counts(reply)
    timings = reply.timings or {}
    first, end = reply.t_first, reply.t_end or time.perf_counter()
    decode_s = end - first if first is not None else 0.0
    ctx = info.context_length
    used = prompt + n
    remote: dict[str, Any] = {"url": info.path, "model": reply.model, "counts": source,
                              "finish_reason": reply.finish_reason, "speculative": SPECULATIVE_NOTE}
    if reply.timings:
        remote["timings"] = reply.timings
    drafted, accepted = _int(timings.get("draft_n")), _int(timings.get("draft_n_accepted"))
    theirs = reply.server_stats or {}  # another daemon of ours says what its drafter did
    if theirs:
        remote["server"] = {k: theirs.get(k) for k in ("backend", "drafter", "drafted", "accepted")}
        if not drafted and _int(theirs.get("drafted")):
            drafted, accepted = _int(theirs.get("drafted")), _int(theirs.get("accepted"))
    return RemoteStats(
        backend=info.backend, model=info.name if label is None else label,
        prompt_tokens=prompt, cached_prompt_tokens=cached, completion_tokens=n,
        ttft_ms=round((first - started) * 1000, 2) if first is not None else None,
        # The server's own prefill time where it says (llama-server); else until the first piece.
        prefill_ms=round(float(timings["prompt_ms"]), 2) if isinstance(timings.get("prompt_ms"), (int, float))
        else round(((first or end) - t0) * 1000, 2),
        queue_ms=round((t0 - started) * 1000, 2),
        tokens_per_second=round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else None,
        total_ms=round((end - started) * 1000, 2),
        context_length=ctx, context_used=used,
        context_full=finish == "length" and bool(ctx) and used >= ctx,
        finish_reason=finish,
        drafter="server" if drafted else "off", drafted=drafted, accepted=accepted,
        remote=remote)
