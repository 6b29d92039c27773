"""The wire side of the remote backend: requests, server-sent events, deltas, errors.

Pure functions and small state machines, no network (``backends.remote``
owns the connection), so each piece is tested on its own:

- :class:`ChatRequest` is what the daemon hands over (messages and sampling
  settings) and :meth:`ChatRequest.body` the OpenAI request body it becomes;
- :class:`SSEDecoder` turns the response's bytes into events, whatever the
  chunking: comment lines (``: ping``, sse-starlette's and others' keep-alive),
  blank lines, CRLF or LF endings, ``event:`` / ``id:`` fields, multi-line
  ``data``, a last event without its blank line; lines are bounded;
- :class:`ReplyBuilder` merges the chunks of a chat (or completions) stream:
  content deltas, tool-call deltas by index (a name and its arguments arrive
  in pieces), the finish reason, ``usage`` (the last chunk under
  ``stream_options.include_usage``) and llama-server's ``timings``;
- :func:`classify_error` maps an error answer (status and body, or an
  ``error`` object in the stream) onto :class:`RemoteContextOverflow` where
  the server says the conversation does not fit (OpenAI's and
  llama-cpp-python's ``context_length_exceeded``, llama-server's
  ``exceed_context_size_error``, vLLM's messages, our own daemon's), else a
  :class:`RemoteError` that quotes the server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .base import BackendError, ContextOverflowError

# One SSE line (a chunk's JSON) at most; a server sending more is refused rather than
# buffered without bound.
MAX_LINE_BYTES = 8 * 1024 * 1024
# An error body quoted in a message at most (characters).
MAX_QUOTE = 300


class RemoteError(BackendError):
    """The remote server could not be reached, refused the request or broke off the reply.

    ``status``: the HTTP status (None where none came); ``received``: how
    many content pieces had already streamed when it broke off."""

    def __init__(self, message: str, *, status: int | None = None, received: int = 0):
        super().__init__(message)
        self.status = status
        self.received = received


class RemoteContextOverflow(ContextOverflowError):
    """The server says the conversation does not fit its context window.

    ``prompt_tokens``: the prompt's length where the server said it (vLLM
    counts the reply's ``max_tokens`` in ``needed``; a prompt that fits can
    be asked again with fewer)."""

    def __init__(self, message: str, *, needed: int, available: int, prompt_tokens: int | None = None):
        super().__init__(message, needed=needed, available=available)
        self.prompt_tokens = prompt_tokens


# -- the request ----------------------------------------------------------------------


@dataclass
class ChatRequest:
    """One reply asked of the server: the conversation and how to sample it.

    ``prompt`` (instead of ``messages``) is a raw prompt for ``/completions``.
    ``response_format``, ``tools`` and ``tool_choice`` are OpenAI's shapes,
    passed through as they are."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str | None = None
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None

    @property
    def endpoint(self) -> str:
        return "completions" if self.prompt is not None else "chat/completions"

    def body(self, model: str, *, stream: bool = True, openai_only: bool = False) -> dict[str, Any]:
        """The JSON body for ``model``. Sampling keys beyond OpenAI's (``top_k``,
        ``min_p``, ``repeat_penalty``, ``ignore_eos``) are the ones llama.cpp's
        servers and vLLM read; most others ignore them, and ``openai_only``
        leaves them out for a server that refuses them (OpenAI's own).
        ``repeat_penalty`` is always sent otherwise, because llama-cpp-python's
        server would apply its own 1.1."""
        body: dict[str, Any] = {"model": model, "stream": stream, "max_tokens": self.max_tokens,
                                "temperature": self.temperature, "top_p": self.top_p}
        if self.prompt is not None:
            body["prompt"] = self.prompt
        else:
            body["messages"] = self.messages
        if stream:
            body["stream_options"] = {"include_usage": True}
        for key in ("seed", "response_format", "tools", "tool_choice"):
            if getattr(self, key) is not None:
                body[key] = getattr(self, key)
        if self.stop:
            body["stop"] = list(self.stop)
        if not openai_only:
            body.update(min_p=self.min_p, repeat_penalty=self.repeat_penalty)
            if self.top_k:  # 0 is "off" here; vLLM takes -1 for that and refuses 0 in older releases
                body["top_k"] = self.top_k
            if self.repeat_penalty != 1.0:
                body["repetition_penalty"] = self.repeat_penalty  # vLLM's name for it
            if self.ignore_eos:
                body["ignore_eos"] = True
        return body


# -- server-sent events -----------------------------------------------------------------


@dataclass
class SSEEvent:
    data: str
    event: str = "message"


class SSEDecoder:
    """Bytes of a ``text/event-stream`` in, complete events out (the WHATWG rules).

    Feed it whatever the network delivers; :meth:`close` returns an event the
    stream ended inside (its data given, the blank line missing)."""

    def __init__(self, max_line: int = MAX_LINE_BYTES):
        self.max_line = max_line
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                break
            end, after = cut
            line, self._buf = self._buf[:end], self._buf[after:]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        if len(self._buf) > self.max_line:
            raise RemoteError(f"the server sent a line of over {self.max_line:,} bytes in its event stream")
        return events

    def close(self) -> SSEEvent | None:
        if self._buf:
            self._line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
        return self._dispatch()

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):  # a comment: keep-alive pings
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        # id and retry concern reconnecting, which a reply's stream never does
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent("\n".join(self._data), self._event or "message")
        self._data, self._event = [], ""
        return event


def _line_end(buf: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) in ``buf``; None while no line is
    complete. A CR at the very end waits for the next chunk: it may be half a CRLF."""
    n, cr = buf.find(b"\n"), buf.find(b"\r")
    if cr == -1 or (n != -1 and n < cr):
        return None if n == -1 else (n, n + 1)
    if cr + 1 == len(buf):
        return None
    return (cr, cr + 2) if buf[cr + 1:cr + 2] == b"\n" else (cr, cr + 1)


# -- merging a reply's chunks ----------------------------------------------------------------


@dataclass
class ToolCall:
    """One tool call as its deltas built it up."""

    index: int
    id: str | None = None
    type: str = "function"
    name: str = ""
    arguments: str = ""

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ChatReply:
    """A finished (or broken-off) reply: the text, the merged tool calls, what the
    server said about it, and when things happened (``time.perf_counter``)."""

    text: str = ""
    finish_reason: str | None = None  # the server's own word ("stop", "length", "tool_calls", ...)
    cancelled: bool = False
    tool_calls: list[ToolCall] = field(default_factory=list)
    reasoning: str = ""  # reasoning_content deltas (vLLM's reasoning parsers), kept apart from the text
    pieces: int = 0  # content deltas received (a token each, on llama.cpp's servers)
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    server_stats: dict[str, Any] | None = None  # another daemon of ours: its stats (``x_assistant``)
    model: str | None = None
    done: bool = False  # the stream's [DONE] came
    t_sent: float = 0.0
    t_first: float | None = None
    t_end: float = 0.0


class ReplyBuilder:
    """Takes the decoded chunks of one streamed reply and builds a :class:`ChatReply`.

    :meth:`add` returns the text the chunk adds (to stream on); an ``error``
    object in the stream raises what :func:`classify_error` makes of it."""

    def __init__(self, url: str, t_sent: float):
        self.url = url
        self.reply = ChatReply(t_sent=t_sent)
        self._text: list[str] = []
        self._calls: dict[int, ToolCall] = {}

    def add(self, chunk: Any, now: float) -> str:
        if not isinstance(chunk, dict):
            raise RemoteError(f"the server at {self.url} sent a stream chunk that is not a JSON object")
        if chunk.get("error") is not None:
            raise classify_error(None, chunk, self.url, received=self.reply.pieces)
        r = self.reply
        r.model = chunk.get("model") or r.model
        if isinstance(chunk.get("usage"), dict):
            r.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            r.timings = chunk["timings"]
        extra = chunk.get("x_assistant")
        if isinstance(extra, dict) and isinstance(extra.get("stats"), dict):
            r.server_stats = extra["stats"]
        choices = chunk.get("choices") or []
        choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
        if choice is None:
            return ""
        if choice.get("finish_reason"):
            r.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        text = delta.get("content") if "delta" in choice else choice.get("text")  # chat, or completions
        if isinstance(delta.get("reasoning_content"), str):
            r.reasoning += delta["reasoning_content"]
        got_call = self._tool_deltas(delta.get("tool_calls"))
        if not isinstance(text, str):
            text = ""
        if (text or got_call) and r.t_first is None:
            r.t_first = now
        if text:
            r.pieces += 1
            self._text.append(text)
        return text

    def _tool_deltas(self, deltas: Any) -> bool:
        if not isinstance(deltas, list):
            return False
        for d in deltas:
            if not isinstance(d, dict):
                continue
            index = d.get("index")
            if not isinstance(index, int):  # a server that sends each call whole, without an index
                index = len(self._calls)
            call = self._calls.setdefault(index, ToolCall(index))
            call.id = d.get("id") or call.id
            call.type = d.get("type") or call.type
            fn = d.get("function") if isinstance(d.get("function"), dict) else {}
            if isinstance(fn.get("name"), str):
                call.name += fn["name"]
            args = fn.get("arguments")
            if isinstance(args, str):
                call.arguments += args
            elif isinstance(args, dict):  # a server that sends them whole, as an object
                call.arguments += json.dumps(args, ensure_ascii=False)
        return bool(deltas)

    def whole(self, body: Any, now: float) -> str:
        """A server that answered a streamed request with one JSON reply (some do):
        take it as a single chunk, ``message`` read as a delta."""
        if isinstance(body, dict):
            for choice in body.get("choices") or []:
                if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
                    choice["delta"] = choice.pop("message")
        text = self.add(body, now)
        self.reply.done = True
        return text

    def finish(self, now: float, *, cancelled: bool = False) -> ChatReply:
        r = self.reply
        r.text = "".join(self._text)
        r.tool_calls = [self._calls[i] for i in sorted(self._calls)]
        r.cancelled = cancelled
        r.t_end = now
        return r


# -- errors ------------------------------------------------------------------------------------

_NUM = r"([0-9][0-9,]*)"
# (pattern, what its groups are) for the context-length messages of the servers we know.
_OVERFLOW_PATTERNS: list[tuple[re.Pattern[str], tuple[str, ...]]] = [
    # OpenAI, vLLM, llama-cpp-python: "maximum context length is 2048 tokens. However, you requested
    # 2100 tokens (1588 in the messages, 512 in the completion)"
    (re.compile(rf"maximum context length is {_NUM} tokens.*?requested {_NUM} tokens \({_NUM} in the",
                re.S | re.I), ("available", "needed", "prompt")),
    # vLLM (newer): "... maximum context length is 2048 tokens and your request has 1600 input tokens"
    (re.compile(rf"maximum context length is {_NUM} tokens and your request has {_NUM} input tokens", re.I),
     ("available", "prompt")),
    (re.compile(rf"prompt \(length {_NUM}\) is longer than the maximum model length of {_NUM}", re.I),
     ("needed", "available")),
    # our own daemon: "the prompt is 3000 tokens but the context window is 2048"
    (re.compile(rf"prompt is {_NUM} tokens but the context window is {_NUM}", re.I), ("needed", "available")),
    (re.compile(rf"maximum context length is {_NUM}", re.I), ("available",)),
]
_OVERFLOW_WORDS = re.compile(r"context[ _-]?(length|size|window)|maximum model length|exceeds? the available context",
                             re.I)
# A server refusing the sampling keys beyond OpenAI's (OpenAI itself, strict proxies).
EXTRA_KEYS_REFUSED = re.compile(r"unrecognized request argument|extra (inputs|fields) (are )?not permitted|"
                                r"unknown (field|parameter|argument)", re.I)
_OVERFLOW_CODES = {"context_length_exceeded", "exceed_context_size_error", "context_overflow"}


def classify_error(status: int | None, body: Any, url: str, *, received: int = 0) -> BackendError:
    """What an error answer means: :class:`RemoteContextOverflow` for a conversation
    that does not fit, else :class:`RemoteError` quoting the server (bounded)."""
    err = body.get("error", body) if isinstance(body, dict) else body
    message = (err.get("message") if isinstance(err, dict) else None) or _text(body)
    message = str(message)[:MAX_QUOTE] or "(no message)"
    marks = {str(err.get(k)) for k in ("code", "type") if err.get(k) is not None} if isinstance(err, dict) else set()
    if marks & _OVERFLOW_CODES or (status in (None, 400, 413, 422) and _OVERFLOW_WORDS.search(message)):
        return _overflow(message, err if isinstance(err, dict) else {}, url)
    where = f"the server at {url}"
    said = f"{status}: {message}" if status else message
    if status in (401, 403):
        return RemoteError(f"{where} refused the request ({said}); check the API key (the alias's api_key_env)",
                           status=status, received=received)
    if status == 404:
        return RemoteError(f"{where} has no such endpoint or model ({said}); check the alias's url and model",
                           status=status, received=received)
    return RemoteError(f"{where} answered with an error ({said})", status=status, received=received)


def _overflow(message: str, err: dict[str, Any], url: str) -> RemoteContextOverflow:
    found: dict[str, int] = {}
    for pattern, names in _OVERFLOW_PATTERNS:
        m = pattern.search(message)
        if m:
            found = {n: int(g.replace(",", "")) for n, g in zip(names, m.groups())}
            break
    for key, name in (("n_prompt_tokens", "prompt"), ("n_ctx", "available")):  # llama-server's fields
        if isinstance(err.get(key), int):
            found.setdefault(name, err[key])
    prompt = found.get("prompt")
    needed = prompt or found.get("needed", 0)  # the prompt's length, as a local model's overflow says
    return RemoteContextOverflow(f"the conversation does not fit the context window of the server at {url}: "
                                 f"{message}", needed=needed, available=found.get("available", 0),
                                 prompt_tokens=prompt)


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if isinstance(body, str):
        return " ".join(body.split())
    return json.dumps(body, ensure_ascii=False, default=str) if body is not None else ""
