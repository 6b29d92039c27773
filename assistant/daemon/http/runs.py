"""Running the daemon's work for an HTTP request: chats (through the one chat path,
``methods.chat.respond``) and embeddings, each as the request's own client.

Scheduling identity: an HTTP client is its API key where keys are set, else
its address (every local program over loopback or the Unix socket is one
client, "http:local"). Within a priority the model's scheduler lets clients
take turns, one job each, so HTTP traffic, however much, gets one turn in
two when the TUI is waiting too. Each identity may have at most
``per_client`` requests queued or running (half the model queue's bound):
past it a request is refused with 503 and ``Retry-After``, which leaves the
rest of the queue to everyone else.

Loading: a request for a model that is not loaded waits for its load (as
over JSON-RPC) for up to ``load_wait_s`` seconds (``http.load_timeout``); past that it is answered
503 with ``Retry-After`` while the load goes on (OpenAI's clients retry a 503
by themselves), rather than hold a connection for as long as a big model
takes to read from disk.

Cancel: a request whose client goes away (aiohttp cancels the handler) or
stops reading (a write that does not drain within ``send_stall_timeout``, or
more than ``MAX_UNSENT`` characters of its reply waiting to be written: a
model can write faster than a stalled write is noticed) sets the chat's
cancel flag; the generation stops within one decode step and
the session keeps what was written, marked cancelled, as over JSON-RPC.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import types
from typing import Any, AsyncIterator, Callable

from backends.base import ContextOverflowError, EmbeddingsUnsupported

from assistant.daemon.http.deadline import within
from assistant.daemon.http.errors import HttpError, busy, from_rpc
from assistant.daemon.methods import chat
from assistant.daemon.params import Chat
from assistant.daemon.server import MAX_SEND_BUFFER, TextStream
from assistant.daemon.worker import INTERACTIVE, Busy, CancelFlag, Ticket, Withdrawn, WorkerClosed
from assistant.protocol import RPCError

log = logging.getLogger("assistant.daemon.http")

# Characters of a streamed reply that may wait for a client (as the JSON-RPC server's bound).
MAX_UNSENT = MAX_SEND_BUFFER
# Seconds a request waits for its model's load before it is answered 503 (the load goes on).
LOAD_WAIT_S = 60.0


class _Outlet:
    """What a ``server.TextStream`` needs of a connection (its loop, ``notify``), feeding a callback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, put: Callable[[str], None]):
        self.server = types.SimpleNamespace(loop=loop)
        self._put = put

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._put(params["text"])


class _NoText:
    """Deltas nobody reads (a reply that is not streamed)."""

    def push(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class Runs:
    """The HTTP requests' work in flight: admission per client, and stopping it all at shutdown."""

    def __init__(self, daemon: Any, per_client: int, load_wait_s: float = LOAD_WAIT_S):
        self.daemon = daemon
        self.per_client = max(1, per_client)
        self.load_wait_s = load_wait_s
        self.pending: collections.Counter[str] = collections.Counter()
        self.tasks: set[asyncio.Task] = set()
        self.flags: set[CancelFlag] = set()

    async def loaded(self, model: str | None) -> None:
        """Wait for ``model`` (None: the default) to be loaded, at most ``load_wait_s``: then 503
        while its load goes on; its load's error (404 unknown, 500 failed) as such."""
        try:
            # At the deadline the wait is cancelled, not the load: the registry runs (and
            # shields) that as a task of its own, which outlives a request that stopped waiting.
            await within(self.daemon.models.get(model), self.load_wait_s)
        except asyncio.TimeoutError:
            raise HttpError(503, f"the model {model or self.daemon.config.model!r} is still loading; try again "
                                 "shortly", code="model_loading", headers={"Retry-After": "5"}) from None
        except RPCError as exc:
            raise from_rpc(exc) from None

    def admit(self, client: str) -> None:
        """Count a request for ``client``; 503 past ``per_client``."""
        if self.pending[client] >= self.per_client:
            raise busy(f"this client has {self.pending[client]} requests queued or running (the limit is "
                       f"{self.per_client}); try again shortly")
        self.pending[client] += 1

    def in_flight(self) -> int:
        """Requests admitted (queued or running) and not finished: chats and embeddings."""
        return sum(self.pending.values())

    def done(self, client: str) -> None:
        self.pending[client] -= 1
        if self.pending[client] <= 0:
            del self.pending[client]

    def track(self, task: asyncio.Task, flag: CancelFlag, client: str) -> None:
        self.tasks.add(task)
        self.flags.add(flag)

        def finished(t: asyncio.Task) -> None:
            self.tasks.discard(t)
            self.flags.discard(flag)
            self.done(client)
            if not t.cancelled():
                t.exception()  # retrieved: the handler reports it, or its client is gone
        task.add_done_callback(finished)

    async def stop(self, timeout: float = 15) -> None:
        """Shutdown: cancel every run and give them ``timeout`` seconds to store what they have."""
        for flag in list(self.flags):
            flag.set()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)


class ChatRun:
    """One chat for one HTTP request, used with ``async with``: entering waits for the model
    (``Runs.loaded``), takes the client's place (``Runs.admit``) and starts the chat; its
    text (when streamed) is read with :meth:`pieces`, its reply with :meth:`result`. Leaving
    the block before the reply is done (the client went away) cancels the generation."""

    def __init__(self, runs: Runs, client: str, p: Chat, *, stream: bool, raw: str | None = None,
                 offered: dict[str, Any] | None = None):
        self.runs, self.client, self.p, self.raw, self.offered = runs, client, p, raw, offered
        self.cancel = CancelFlag()
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.unsent = 0  # characters queued for the client, not written yet
        self.too_slow = False  # over MAX_UNSENT: cancelled, and the client is to be dropped
        self._ended = False  # the end (None) was taken from the queue
        loop = asyncio.get_running_loop()
        deltas = TextStream(_Outlet(loop, self._queue_text), "delta", {}) if stream else _NoText()
        self.caller = chat.Caller(self.cancel, client, deltas, local=False)  # HTTP: media inline only, never a path
        self.task: asyncio.Task | None = None

    async def __aenter__(self) -> "ChatRun":
        await self.runs.loaded(self.p.model)
        self.runs.admit(self.client)
        self.task = asyncio.ensure_future(chat.respond(self.runs.daemon, self.p, self.caller, raw=self.raw,
                                                       offered=self.offered))
        self.runs.track(self.task, self.cancel, self.client)
        self.task.add_done_callback(lambda _t: self.queue.put_nowait(None))
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        if not self.task.done():
            self.cancel.set()  # the client is gone (or could not be written to)

    def _queue_text(self, text: str) -> None:
        self.queue.put_nowait(text)
        self.unsent += len(text)
        if self.unsent > MAX_UNSENT and not self.too_slow:
            log.warning("HTTP client %s is not reading: over %d characters of its reply unsent; cancelling "
                        "the reply and dropping the client", self.client, MAX_UNSENT)
            self.too_slow = True
            self.cancel.set()

    async def _next(self) -> str | None:
        """The text queued, joined: one write (one event) for pieces that came while the
        loop was busy elsewhere; None once the chat ended and all was taken."""
        if self._ended:
            return None
        parts = []
        piece = await self.queue.get()
        while piece is not None:
            parts.append(piece)
            if self.queue.empty():
                break
            piece = self.queue.get_nowait()
        self._ended = piece is None
        if not parts:
            return None
        text = "".join(parts)
        self.unsent -= len(text)
        return text

    async def pieces(self) -> AsyncIterator[str]:
        """The reply's text as it comes, until the chat ends."""
        while (piece := await self._next()) is not None:
            yield piece

    async def first(self) -> str | None:
        """The first piece of text, or None when the chat ended without any (then
        :meth:`result` says how: an error is best sent before any header)."""
        return await self._next()

    async def result(self) -> dict[str, Any]:
        """The reply (``chat.respond``'s result); HttpError for an error of the chat path."""
        try:
            return await asyncio.shield(self.task)
        except RPCError as exc:
            raise from_rpc(exc) from None


async def embed(runs: Runs, client: str, model: str | None, texts: list[str]) -> tuple[list[list[float]], int, str]:
    """Embeddings of ``texts`` on ``model`` (loaded if needed), as ``client``'s job on the model's
    thread: (vectors, tokens read, the model's alias). 501 where the backend has none."""
    d = runs.daemon
    await runs.loaded(model)
    runs.admit(client)
    flag = CancelFlag()
    runs.flags.add(flag)
    try:
        worker = await d.models.get(model, hold=True)
        try:
            return (*await worker.run(_embed_job, worker.backend, texts,
                                      ticket=Ticket(INTERACTIVE, client=client, cancel=flag)), worker.key)
        finally:
            d.models.release(worker)
    except RPCError as exc:
        raise from_rpc(exc) from None
    except EmbeddingsUnsupported as exc:
        raise HttpError(501, f"{exc}; embeddings need a llama.cpp model", code="embeddings_unsupported") from None
    except ContextOverflowError as exc:
        raise HttpError(400, str(exc), code="context_length_exceeded", param="input") from None
    except Busy as exc:
        raise busy(f"the model is busy: {exc}; try again shortly") from None
    except (WorkerClosed, Withdrawn):
        raise busy("the model was unloaded or the daemon is stopping; try again") from None
    except asyncio.CancelledError:
        flag.set()
        raise
    finally:
        runs.flags.discard(flag)
        runs.done(client)


def _embed_job(backend: Any, texts: list[str]) -> tuple[list[list[float]], int]:
    """On the model's thread: the vectors and how many tokens the texts are."""
    vectors = backend.embed(texts)
    return vectors, sum(len(backend.tokenize(t, special=False)) for t in texts)
