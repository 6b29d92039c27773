"""The remote backend: generation handed to an OpenAI-compatible server.

For when one machine is not enough: a model alias with ``backend: remote``
and ``url`` (the server's OpenAI-compatible base URL, ``.../v1``) names a
model that vLLM, Ray Serve LLM, llama-server, exo, Ollama, LM Studio or
another of our own daemons serves. Everything else stays here: sessions,
tools, plugins, automations, the TUI, stats, cancel.

Such a backend makes no logits: the server samples. So it is a
:class:`ChatBackend`, the kind of backend the daemon hands the request's
messages and sampling settings (a :class:`~backends.remote_stream.ChatRequest`)
instead of running its token loop; the token-level interface (tokenize,
``forward``, ``truncate``) refuses, and speculative decoding does not apply
(the server's own, where it reports one, shows in the stats).

The wire: ``POST {url}/chat/completions`` with ``stream: true`` and
``stream_options.include_usage``; the events are decoded and merged by
``backends.remote_stream``, the connection (retries, redirects, bounds) is
``backends.remote_http``'s. Here:

- cancel closes the connection (servers stop generating when the client
  goes): checked after every event and, while the server is silent, at
  once for a flag that tells when it is set (``listen``), else every
  ``CANCEL_POLL`` seconds;
- a server streaming faster than two pieces per ``READ_GATHER_S`` (a GPU
  server's hundreds a second) is read in gulps that far apart, not with a
  wakeup of the model's thread per piece (``_Gather``); the first piece is
  always read at once;
- a reply broken off (the server killed, the network gone) is an error
  that says how far it got; a stream that ends before its first event (how
  llama-cpp-python's server reports an error inside a stream) is asked
  again without streaming, with one token, to learn the server's reason;
- a context-length error that counts the reply's ``max_tokens`` (vLLM's)
  for a prompt that fits is asked again for the room that is left, so the
  reply stops at the window's end as it would on a local model.

The API key is read at load from the environment variable the alias names
(``api_key_env``), kept in memory and sent only as ``Authorization: Bearer``;
no message or log line carries it, nor a password written in the URL.

One event loop per backend instance, run on the model's thread (the only
thread that drives a backend), so aiohttp's session lives as long as the
loaded model and keeps its connection warm between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
import urllib.parse
from typing import Any, Callable, Sequence

import numpy as np

from . import base
from .base import Backend, BackendError, LoadOptions, ModelInfo, ModelLoadError
from .remote_http import RETRY_DELAYS, Connection, Never, check_url, display_url, drained, loopback, parse_json, \
    read_bounded, reason
from .remote_stream import (EXTRA_KEYS_REFUSED, ChatReply, ChatRequest, RemoteContextOverflow, RemoteError,
                            ReplyBuilder, SSEDecoder, ToolCall)

__all__ = ["ChatBackend", "RemoteBackend", "ChatRequest", "ChatReply", "ToolCall", "RemoteError",
           "RemoteContextOverflow", "RETRY_DELAYS", "SPECULATIVE_NOTE", "display_url", "server_models"]

log = logging.getLogger("backends.remote")

CANCEL_POLL = 0.01  # how often a silent stream looks at the cancel flag (s)
# While a server streams faster than this (a piece every 5 ms from a GPU server), what it
# sends is read in gulps this far apart instead of with a wakeup of the model's thread per
# piece: the daemon hands text on to its clients at most every 20 ms anyway (TextStream).
READ_GATHER_S = 0.02
SPECULATIVE_NOTE = ("does not apply: generation is the server's; configure speculative decoding there "
                    "(a server that reports its drafts shows as drafter 'server')")


class ChatBackend(Backend):
    """A backend whose model runs elsewhere: it takes a conversation and sampling
    settings (:meth:`chat`) and streams text back; it has no tokens or logits.

    The daemon sends such a backend's requests through :meth:`chat` rather
    than its generation loop; the token-level methods refuse, naming why."""

    @property
    def _why_not(self) -> str:
        return f"the {self.name} backend has no tokens or logits here: the server generates"

    def chat(self, request: ChatRequest, *, on_text: Callable[[str], None] | None = None,
             cancel: Any = None) -> ChatReply:
        """One reply to ``request``, ``on_text`` called with each piece as it streams.
        ``cancel`` (anything with ``is_set()``) stops it: the reply so far comes back
        with ``cancelled`` set. Raises ``ContextOverflowError`` where the conversation
        does not fit, ``BackendError`` where the server fails."""
        raise NotImplementedError

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        raise BackendError(self._why_not)

    def token_bytes(self, token: int) -> bytes:
        raise BackendError(self._why_not)

    def is_eog(self, token: int) -> bool:
        return False

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        raise BackendError(f"{self._why_not} (and applies its own chat template)")

    @property
    def cached_tokens(self) -> list[int]:
        return []

    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        raise BackendError(self._why_not)

    def truncate(self, n: int) -> None:
        pass  # nothing is cached here


def _api_key(env_name: str | None, alias: str) -> str | None:
    if not env_name:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ModelLoadError(f"model alias {alias!r}: api_key_env names {env_name}, which is not set (or empty) "
                             "in the environment")
    return key


class RemoteBackend(ChatBackend):
    """A model an OpenAI-compatible server serves (see the module docstring).

    ``load(url, options)``: ``options.extra`` carries ``model`` (its name on
    the server; None: the alias, or the one model a single-model server
    serves), ``alias`` and ``api_key_env``."""

    name = "remote"

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Connection | None = None
        self._shown = ""  # the URL without credentials
        self._model = ""
        self._openai_only = False  # the server refused the sampling keys beyond OpenAI's: leave them out
        self.embedding_tokens: int | None = None  # the last embed()'s token count, as the server said it

    def __repr__(self) -> str:  # never the headers: they hold the key
        return f"<RemoteBackend {self._model!r} at {self._shown or '(not loaded)'}>"

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        try:
            import aiohttp
        except ImportError as exc:
            return False, f"aiohttp is not installed ({exc}); pip install aiohttp"
        return True, (f"aiohttp {aiohttp.__version__}: a model alias with backend: remote and url runs on "
                      "that OpenAI-compatible server")

    @classmethod
    def check_model(cls, path: str) -> None:
        check_url(str(path))

    # -- lifecycle -------------------------------------------------------------------------

    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        options = options or LoadOptions()
        extra = options.extra
        alias = str(extra.get("alias") or extra.get("model") or "remote")
        key = _api_key(extra.get("api_key_env"), alias)
        self._conn = Connection(str(path), _headers(key))
        self._shown = self._conn.shown
        if key and urllib.parse.urlsplit(self._conn.url).scheme == "http" and not loopback(self._conn.url):
            log.warning("%s: the API key goes to %s over plain http", alias, self._shown)
        self._loop = asyncio.new_event_loop()
        try:
            listed = self._loop.run_until_complete(self._start())
            served, entry, why = _pick_model(listed, extra.get("model"), alias, self._shown)
        except BaseException:
            self.unload()
            raise
        self._model = served
        ctx, train = _context_of(entry, options.n_ctx)
        self._info = ModelInfo(
            name=alias, path=self._shown, backend=self.name, architecture="remote", context_length=ctx,
            train_context_length=train, vocab_size=0, chat_template=None, template_source="server",
            bos_token_id=None, eos_token_ids=[],
            choices={"server": why, "context": _context_why(entry, ctx, options.n_ctx),
                     "api_key": f"from ${extra['api_key_env']}" if key else "none sent",
                     "speculative": SPECULATIVE_NOTE})
        return self._info

    async def _start(self) -> list[dict[str, Any]] | None:
        await self._conn.open()
        return await self._conn.list_models(Never())

    def unload(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        try:
            if self._conn is not None:
                loop.run_until_complete(self._conn.close())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
            self._info = None

    # -- generation ---------------------------------------------------------------------------

    def chat(self, request: ChatRequest, *, on_text: Callable[[str], None] | None = None,
             cancel: Any = None) -> ChatReply:
        if self._loop is None:
            raise BackendError("no model is loaded")
        cancel = cancel if cancel is not None else Never()
        try:
            return self._loop.run_until_complete(self._chat(request, on_text or (lambda _t: None), cancel))
        except RemoteContextOverflow as exc:
            # vLLM counts max_tokens in: a prompt that fits is asked again for what room is left,
            # so the reply stops at the window's end ("length"), as it does on a local model.
            room = exc.available - exc.prompt_tokens if exc.prompt_tokens is not None else 0
            if room <= 0 or room >= request.max_tokens:
                raise
            log.info("%s: %d prompt tokens leave room for %d of the %d tokens asked; asking again",
                     self._model, exc.prompt_tokens, room, request.max_tokens)
            smaller = dataclasses.replace(request, max_tokens=room)
            return self._loop.run_until_complete(self._chat(smaller, on_text or (lambda _t: None), cancel))

    async def _chat(self, request: ChatRequest, on_text: Callable[[str], None], cancel: Any) -> ChatReply:
        builder = ReplyBuilder(self._shown, time.perf_counter())
        task = asyncio.current_task()
        unwatch = _watch(cancel, task)
        cancelled = False
        try:
            cancelled = await self._exchange(request, builder, on_text, cancel)
        except asyncio.CancelledError:
            if not cancel.is_set():
                raise
            if hasattr(task, "uncancel"):  # 3.11+: the cancel was ours, handled here
                task.uncancel()
            cancelled = True
        finally:
            await unwatch()
        return builder.finish(time.perf_counter(), cancelled=cancelled)

    async def _exchange(self, request: ChatRequest, builder: ReplyBuilder, on_text: Callable[[str], None],
                        cancel: Any) -> bool:
        """Send ``request`` and read its reply into ``builder``; True when cancelled."""
        try:
            resp = await self._conn.request("POST", request.endpoint, cancel,
                                            json=request.body(self._model, openai_only=self._openai_only))
        except RemoteError as exc:
            if self._openai_only or exc.status not in (400, 422) or not EXTRA_KEYS_REFUSED.search(str(exc)):
                raise
            log.info("%s: the server refuses top_k, min_p and repeat_penalty; sending OpenAI's keys only",
                     self._shown)
            self._openai_only = True
            resp = await self._conn.request("POST", request.endpoint, cancel,
                                            json=request.body(self._model, openai_only=True))
        if resp is None:
            return True
        whole = False
        try:
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                text = builder.whole(parse_json(await read_bounded(resp), self._shown), time.perf_counter())
                if text:
                    on_text(text)
                return False
            cancelled = await self._read_events(resp, builder, on_text, cancel)
            whole = not cancelled and await drained(resp)
        finally:
            if whole:
                resp.release()  # read to its end: the connection stays open for the next request
            else:
                resp.close()  # not read to its end: the connection goes, and the server stops
        if not cancelled and not builder.reply.done and builder.reply.finish_reason is None:
            await self._broken_off(request, builder)
        return cancelled

    async def _read_events(self, resp: Any, builder: ReplyBuilder, on_text: Callable[[str], None],
                           cancel: Any) -> bool:
        import aiohttp

        decoder, gather = SSEDecoder(), _Gather(resp)
        try:
            async for chunk in resp.content.iter_any():
                for event in decoder.feed(chunk):
                    if self._event(event.data, builder, on_text):
                        return False
                    if cancel.is_set():
                        return True
                if builder.reply.t_first is not None:  # never before the first text: it goes at once
                    await gather.after_read()
            tail = decoder.close()
            if tail is not None:
                self._event(tail.data, builder, on_text)
        except (aiohttp.ClientPayloadError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError,
                asyncio.TimeoutError, ConnectionError) as exc:
            raise RemoteError(f"the server at {self._shown} broke off the reply after {builder.reply.pieces} "
                              f"pieces ({reason(exc)})", received=builder.reply.pieces) from None
        return False

    def _event(self, data: str, builder: ReplyBuilder, on_text: Callable[[str], None]) -> bool:
        """Take one event; True at the stream's end ([DONE])."""
        if data.strip() == "[DONE]":
            builder.reply.done = True
            return True
        text = builder.add(parse_json(data, self._shown), time.perf_counter())
        if text:
            on_text(text)
        return False

    async def _broken_off(self, request: ChatRequest, builder: ReplyBuilder) -> None:
        """The stream ended without its end. With nothing received, ask again without
        streaming (one token) to learn why: llama-cpp-python's server reports an error
        that happens inside a stream only by ending it."""
        got = builder.reply.pieces
        if got or builder.reply.tool_calls:
            raise RemoteError(f"the server at {self._shown} ended the reply after {got} pieces, before it was "
                              "complete", received=got)
        probe = request.body(self._model, stream=False, openai_only=self._openai_only)
        probe["max_tokens"] = 1
        try:
            resp = await self._conn.request("POST", request.endpoint, Never(), json=probe)
        except RemoteError as exc:  # (its context-length error, RemoteContextOverflow, goes through)
            raise RemoteError(f"the server at {self._shown} ended the reply before it began, and then: {exc}",
                              status=exc.status) from None
        resp.close()
        raise RemoteError(f"the server at {self._shown} ended the reply before it began (it answers a one-token "
                          "request; see its log)")

    def server_models(self) -> list[dict[str, Any]] | None:
        """The loaded server's model list (doctor); None where it has none."""
        if self._loop is None:
            raise BackendError("no model is loaded")
        return self._loop.run_until_complete(self._conn.list_models(Never()))

    # -- embeddings -----------------------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """``POST {url}/embeddings``, each vector scaled to unit length (the interface's
        promise); a server that cannot embed says so as ``EmbeddingsUnsupported``."""
        if self._loop is None:
            raise BackendError("no model is loaded")
        return self._loop.run_until_complete(self._embed(list(texts)))

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        try:
            resp = await self._conn.request("POST", "embeddings", Never(), json={"model": self._model, "input": texts})
        except RemoteError as exc:  # (a text too long is RemoteContextOverflow, which goes through)
            unsupported = getattr(base, "EmbeddingsUnsupported", BackendError)
            raise unsupported(f"the server at {self._shown} computes no embeddings for {self._model!r}: {exc}") \
                from None
        try:
            body = parse_json(await read_bounded(resp), self._shown)
        finally:
            resp.release()
        data = body.get("data") if isinstance(body, dict) else None
        rows = sorted((d for d in data or [] if isinstance(d, dict)), key=lambda d: d.get("index", 0))
        if len(rows) != len(texts):
            raise RemoteError(f"the server at {self._shown} sent {len(rows)} embeddings for {len(texts)} texts")
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        # No tokenizer here: the texts' token count is the server's word (None where it gives none).
        self.embedding_tokens = usage.get("prompt_tokens") if isinstance(usage.get("prompt_tokens"), int) else None
        return [_unit(r.get("embedding")) for r in rows]


# -- helpers ------------------------------------------------------------------------------------


class _Gather:
    """Reads a fast stream in gulps: after a read that came less than half a
    ``window`` after the one before (or right when reading resumed: pieces
    were waiting), the connection is not read for ``window`` seconds, its
    pieces waiting in the socket; the loop is woken by that timer, not by
    every piece (measured against a server pacing 186 pieces a second: the
    daemon woken 115 times a second instead of 249). A slower stream is read
    as it comes, each piece worth its wakeup."""

    def __init__(self, resp: Any, window: float | None = None):
        self.resp = resp
        self.window = READ_GATHER_S if window is None else window
        self._last: float | None = None  # when the last read came (monotonic)
        self._resumed: float | None = None  # when reading resumed after a pause

    async def after_read(self) -> None:
        now = time.monotonic()
        waiting = self._resumed is not None and now - self._resumed < min(0.002, self.window / 4)
        # Two pieces a window or more: fewer wakeups. Slower, a timer's wakeup (dearer than the
        # socket's, measured) would replace the piece's own for no gain.
        fast = waiting or (self._last is not None and now - self._last < self.window / 2)
        self._last, self._resumed = now, None
        conn = self.resp.connection
        transport = conn.transport if conn is not None else None
        if not fast or self.window <= 0 or transport is None or transport.is_closing():
            return
        transport.pause_reading()  # below aiohttp, which reads nothing meanwhile, so its flow control is as it was
        try:
            await asyncio.sleep(self.window)
        finally:
            transport.resume_reading()
            self._resumed = time.monotonic()


def _watch(cancel: Any, task: asyncio.Task) -> Callable[[], Any]:
    """Cancel ``task`` (closing its connection) once ``cancel`` is set: a silent server
    (a long prefill) would otherwise keep the request waiting for its next event.
    A flag that says when it is set (``listen(fn)`` returning a function that stops
    listening, as the daemon's ``CancelFlag`` does) is listened to; any other is polled
    every ``CANCEL_POLL`` seconds (which wakes the loop a hundred times a second while
    tokens stream). Returns the coroutine function that stops watching."""
    loop = asyncio.get_running_loop()
    listen = getattr(cancel, "listen", None)
    if callable(listen):
        def told() -> None:  # on whichever thread set the flag
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to cancel any more
                loop.call_soon_threadsafe(task.cancel)
        forget = listen(told)

        async def stop_listening() -> None:
            forget()
        return stop_listening
    watcher = asyncio.ensure_future(_poll(cancel, task))

    async def stop_polling() -> None:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return stop_polling


async def _poll(cancel: Any, task: asyncio.Task) -> None:
    while not cancel.is_set():
        await asyncio.sleep(CANCEL_POLL)
    task.cancel()


def _pick_model(listed: list[dict[str, Any]] | None, wanted: str | None, alias: str,
                where: str) -> tuple[str, dict[str, Any], str]:
    """(the name to send, its /models entry, why) for an alias asking for ``wanted``
    (None: the alias itself, or the only model a single-model server serves)."""
    name = wanted or alias
    if listed is None:
        return name, {}, f"{where} (it lists no models; asking for {name!r})"
    ids = [str(m.get("id")) for m in listed if m.get("id") is not None]
    for m in listed:
        if m.get("id") == name:
            return name, m, f"{where} serves {name!r}"
    if wanted is None and len(ids) == 1:
        return ids[0], listed[0], f"{where} serves one model, {ids[0]!r}"
    shown = ", ".join(repr(i) for i in ids[:10]) or "none"
    raise ModelLoadError(f"model alias {alias!r}: the server at {where} does not serve {name!r}; it serves "
                         f"{shown} (set the alias's model: to one of them)")


def _context_of(entry: dict[str, Any], configured: int | None) -> tuple[int, int]:
    """(context window, training context) from a /models entry (vLLM's max_model_len,
    llama-server's meta), else the alias's ``context``; 0 where unknown."""
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    served = next((int(v) for v in (entry.get("max_model_len"), entry.get("context_length"),
                                     entry.get("context_window"), meta.get("n_ctx"))
                   if isinstance(v, int) and v > 0), None)
    train = meta.get("n_ctx_train") if isinstance(meta.get("n_ctx_train"), int) else None
    ctx = served or configured or train or 0
    return ctx, train or ctx


def _context_why(entry: dict[str, Any], ctx: int, configured: int | None) -> str:
    if not ctx:
        return "unknown: the server does not say, and the alias sets no context"
    if configured and ctx == configured and "max_model_len" not in entry:
        return f"{ctx} (the alias's context; the server decides)"
    return f"{ctx} (the server's)"


def _unit(vector: Any) -> list[float]:
    if not isinstance(vector, list) or not vector:
        raise RemoteError("the server sent an embedding that is not a list of numbers")
    norm = math.sqrt(sum(float(v) * float(v) for v in vector)) or 1.0
    return [float(v) / norm for v in vector]


def _headers(key: str | None) -> dict[str, str]:
    return {"User-Agent": "local-assistant", **({"Authorization": f"Bearer {key}"} if key else {})}


def server_models(url: str, api_key_env: str | None = None, *, alias: str = "remote",
                  timeout: float = 5.0) -> list[dict[str, Any]] | None:
    """``GET {url}/models`` once, without retries (``assistant doctor``): the entries,
    or None where the server lists none. Raises ``RemoteError`` where it cannot be
    reached, ``ModelLoadError`` for a bad url or a missing key variable."""
    conn = Connection(url, _headers(_api_key(api_key_env, alias)), total_timeout=timeout)

    async def ask() -> list[dict[str, Any]] | None:
        await conn.open()
        try:
            return await conn.list_models(Never(), retries=False)
        finally:
            await conn.close()

    return asyncio.run(ask())
