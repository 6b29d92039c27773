"""Streaming a reply over HTTP: server-sent events (OpenAI) or newline-delimited
JSON (Ollama), written by one loop for both.

The status line goes out with the first piece of text (or the whole reply,
if there is none), not before: an error that comes first (unknown model,
busy, a prompt that does not fit) still gets its own status code. An error
after that can only be written into the stream (an ``error`` object, which
both APIs' clients raise).

A client that does not take what is written (a write that has not drained
after ``stall_timeout`` seconds) or that went away is dropped, and its
generation cancelled (``runs``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from aiohttp import web

from assistant.daemon.http.deadline import within
from assistant.daemon.http.errors import HttpError
from assistant.daemon.http.runs import ChatRun


class Framing(Protocol):
    """How one API writes a streamed reply."""

    content_type: str

    def start(self) -> bytes:
        """What goes out first (b"" for nothing)."""

    def piece(self, text: str) -> bytes:
        """A piece of the reply's text (b"" for nothing yet)."""

    def end(self, reply: dict[str, Any]) -> bytes:
        """The end: the last chunks, the stats, and (SSE) ``[DONE]``."""

    def error(self, error: HttpError) -> bytes:
        """An error after the stream began."""


class ClientGone(Exception):
    """The client went away or stopped reading."""


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def ndjson(obj: Any) -> bytes:
    """One line of newline-delimited JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


async def _send(resp: web.StreamResponse, data: bytes, stall_timeout: float) -> None:
    if not data:
        return
    try:
        await within(resp.write(data), stall_timeout)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError) as exc:
        raise ClientGone(type(exc).__name__) from None


async def stream_reply(request: web.Request, run: ChatRun, framing: Framing,
                       stall_timeout: float) -> web.StreamResponse:
    """Write ``run``'s reply as it comes, framed by ``framing``."""
    first = await run.first()
    reply = await run.result() if first is None else None  # an error before any text: its own status
    resp = web.StreamResponse(headers={"Content-Type": framing.content_type, "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    try:
        # The start and the first text in one write (one segment, one wakeup of the client).
        await _send(resp, framing.start() + (framing.piece(first) if first is not None else b""), stall_timeout)
        if first is not None:
            async for piece in run.pieces():
                if run.too_slow:  # far behind: dropped, as the JSON-RPC server drops such a client
                    raise ClientGone("not reading")
                await _send(resp, framing.piece(piece), stall_timeout)
            try:
                reply = await run.result()
            except HttpError as err:
                await _send(resp, framing.error(err), stall_timeout)
                reply = None
        if reply is not None:
            await _send(resp, framing.end(reply), stall_timeout)
        await resp.write_eof()
    except (ClientGone, ConnectionError):
        run.cancel.set()
        if request.transport is not None:
            request.transport.abort()
    return resp
