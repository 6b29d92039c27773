"""JSON-RPC 2.0 over a Unix socket: framing, dispatch, and one object per client.

This module knows nothing about models. The daemon registers methods with
``RPCServer.method``; each handler is ``async def handler(req: Request)`` and
returns the result (or raises ``RPCError``). A handler may stream by calling
``req.conn.notify`` with the request id in its params before it returns, and
should stop early once ``req.cancel`` is set.

Robustness rules (DESIGN "Protocol"): a line that is not JSON, is too long,
or names an unknown method gets an error and the connection goes on; every
request with an id gets exactly one reply, and only standard UTF-8 JSON is
sent (a reply that cannot be encoded becomes an error reply). Batches (a JSON
array of requests) are answered with one array. Writes never block the
daemon: a client that stops reading is disconnected, and all its requests
(notifications too) cancelled, once its unsent output passes 8 MiB or has not
drained below a low mark for ``send_stall_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import fcntl
import fnmatch
import json
import logging
import os
import re
import struct
import sys
import termios
import threading
from typing import Any, Awaitable, Callable

from assistant.peer import peer_uid
from assistant.protocol import (DEFAULT_MAX_LINE_BYTES, MAX_DEPTH, ErrorCode, RPCError, content_problem, encode,
                                error, id_problem, notification, result)

log = logging.getLogger("assistant.daemon.server")


class Request:
    """One call: its id (None for a notification), params, cancel flag and connection.

    ``has_id`` tells a notification (no id: never answered) from a request
    whose id is ``null`` (answered with ``"id": null``)."""

    __slots__ = ("conn", "id", "has_id", "method", "params", "cancel")

    def __init__(self, conn: "Connection", rid: Any, method: str, params: dict[str, Any], *, has_id: bool = True):
        self.conn = conn
        self.id = rid
        self.has_id = has_id
        self.method = method
        self.params = params
        # Set by `cancel`, a disconnect or shutdown; worker threads poll it between steps.
        self.cancel = threading.Event()


Handler = Callable[[Request], Awaitable[Any]]
Deliver = Callable[[dict[str, Any] | None], None]

# Above this many unsent bytes a client is too slow and is disconnected.
MAX_SEND_BUFFER = 8 * 1024 * 1024
# A client whose unsent output stays above SEND_LOW_MARK for this long is not
# reading: its requests are cancelled and it is disconnected. A few seconds:
# a client that reads drains everything whenever it runs.
DEFAULT_SEND_STALL_TIMEOUT = 5.0
# Unsent bytes, counting what the kernel holds for the peer where it says
# (Linux counts each queued message with its overhead, about 768 bytes for a
# short one, so this is about 20 unread notifications). Small, so that a slow
# generation's client that stopped reading is found out soon; a client that
# reads is below it nearly always, and the timeout rides out its pauses.
SEND_LOW_MARK = 16 * 1024

# An escape that may be half of a surrogate pair: only a line with one can hold a lone surrogate.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def kernel_unread(fd: int | None) -> int:
    """Bytes the kernel holds on a Unix socket that its peer has not read (Linux's
    SIOCOUTQ, which is TIOCOUTQ's number); 0 where the system does not say."""
    if fd is None or not sys.platform.startswith("linux"):
        return 0
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _parse_error(exc: BaseException) -> str:
    """A person's words for why a line did not parse."""
    if isinstance(exc, UnicodeDecodeError):
        return f"the line is not UTF-8: {exc.reason} at byte {exc.start}"
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc}"
    # int() refusing a number of more than sys.get_int_max_str_digits() digits.
    return f"invalid JSON: {str(exc).split(';')[0]}"


def check_request(msg: Any, check_surrogates: bool = True) -> tuple[Request | None, dict[str, Any] | None]:
    """A request object taken apart: ``(request, None)`` to run (its ``conn`` unset), or
    ``(None, reply)`` for a refusal (``reply`` None: a refused notification, not
    answered). The id is checked first, so that no refusal echoes an id that is not JSON."""
    if not isinstance(msg, dict):
        return None, error(None, RPCError(ErrorCode.INVALID_REQUEST, "expected a JSON-RPC 2.0 request object"))
    has_id, rid = "id" in msg, msg.get("id")
    problem = id_problem(rid) if has_id else None
    if problem is not None:
        return None, error(None, RPCError(ErrorCode.INVALID_REQUEST, problem))
    method, params = msg.get("method"), msg.get("params", {})
    if msg.get("jsonrpc") != "2.0" or not isinstance(method, str):
        return None, error(rid, RPCError(ErrorCode.INVALID_REQUEST,
                                         "expected a JSON-RPC 2.0 request object with a 'method'"))
    if check_surrogates and content_problem(method) is not None:
        return None, _refuse(has_id, rid, ErrorCode.INVALID_REQUEST, "method: not valid Unicode")
    params = {} if params is None else params
    if not isinstance(params, dict):
        return None, _refuse(has_id, rid, ErrorCode.INVALID_PARAMS, "params must be an object")
    for key, value in params.items():
        problem = content_problem({key: value}, MAX_DEPTH - 1, surrogates=check_surrogates)
        if problem is not None:
            return None, _refuse(has_id, rid, ErrorCode.INVALID_PARAMS, f"parameter {key!r}: {problem}")
    return Request(None, rid, method, params, has_id=has_id), None  # type: ignore[arg-type]


def _refuse(has_id: bool, rid: Any, code: int, message: str) -> dict[str, Any] | None:
    return error(rid, RPCError(code, message)) if has_id else None


class _Batch:
    """The responses of one batch, sent as one array once every request has answered."""

    def __init__(self, conn: "Connection", size: int):
        self.conn = conn
        self.waiting = size
        self.replies: list[dict[str, Any]] = []

    def deliver(self, reply: dict[str, Any] | None) -> None:
        if reply is not None:
            self.replies.append(reply)
        self.waiting -= 1
        if self.waiting == 0 and self.replies:  # a batch of notifications only: nothing
            self.conn.send(self.replies)


class Connection:
    """One connected client: its writer, its in-flight requests, its state."""

    _ids = 0

    def __init__(self, server: "RPCServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        Connection._ids += 1
        self.id = Connection._ids
        self.server = server
        self.reader = reader
        self.writer = writer
        self.initialized = False
        self.client_name = "?"
        self.closed = False
        self.requests: dict[Any, Request] = {}  # in flight, by id
        # In flight without an id: no `cancel` reaches them, a disconnect does.
        self.notifications: set[Request] = set()
        self.tasks: set[asyncio.Task] = set()
        self.subscriptions: set[str] = set()
        sock = writer.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None else None
        self._stalled_since: float | None = None  # loop time the unsent output went over the low mark
        self._stall_timer: asyncio.TimerHandle | None = None

    # -- sending -------------------------------------------------------------

    def send(self, message: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Queue one message, or a batch's array of responses, as one line."""
        if self.closed:
            return
        data = self._encode(message)
        if data is None:
            return
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            self.abort("write failed")
            return
        self._watch_output()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send(notification(method, params))

    def _encode(self, message: dict[str, Any] | list[dict[str, Any]]) -> bytes | None:
        """``message`` as a line of JSON; a response that JSON cannot carry (NaN, a lone
        surrogate, a Python object) becomes an error response with its id, a
        notification is dropped. Either way the log says so."""
        try:
            return encode(message)
        except (ValueError, TypeError, RecursionError) as exc:
            if isinstance(message, list):
                return b"[" + b",".join(self._encode(m)[:-1] for m in message) + b"]\n"  # type: ignore[index]
            what = message.get("method") or f"the reply to request {message.get('id')!r}"
            log.warning("%s cannot be sent as JSON (%s: %.200r)", what, type(exc).__name__, str(exc))
            if "method" in message:
                return None
            # The id came in as JSON and passed id_problem, so it encodes.
            return encode(error(message.get("id"), RPCError(
                ErrorCode.INTERNAL_ERROR, f"the reply cannot be encoded as JSON ({type(exc).__name__})")))

    # -- flow control ----------------------------------------------------------

    def unsent(self) -> int:
        """Bytes written for this client that it has not read: ours, and the kernel's."""
        transport = self.writer.transport
        if transport is None or transport.is_closing():
            return 0  # its socket may be closed already, and its number taken by another
        return transport.get_write_buffer_size() + kernel_unread(self._fd)

    def _watch_output(self) -> None:
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            log.warning("client %s (%s) is not reading: over %d bytes unsent; cancelling its requests "
                        "and disconnecting it", self.id, self.client_name, MAX_SEND_BUFFER)
            self.abort("send buffer full")
        elif self._stall_timer is None and self.unsent() > self.server.send_low_mark:
            self._stalled_since = self.server.loop.time()
            self._stall_timer = self.server.loop.call_later(self._poll_interval(), self._poll_output)

    def _poll_interval(self) -> float:
        return min(0.25, self.server.send_stall_timeout / 10)

    def _poll_output(self) -> None:
        """While the output is over the low mark: disconnect once it has stayed there for
        ``send_stall_timeout`` seconds; stop watching once it drains."""
        self._stall_timer = None
        if self.closed or self._stalled_since is None:
            return
        unsent = self.unsent()
        if unsent <= self.server.send_low_mark:
            self._stalled_since = None
            return
        waited = self.server.loop.time() - self._stalled_since
        if waited >= self.server.send_stall_timeout:
            log.warning("client %s (%s) has not read its replies for %.1f s (%d bytes unsent); cancelling its %d "
                        "requests and disconnecting it", self.id, self.client_name, waited, unsent,
                        len(self.requests) + len(self.notifications))
            self.abort("not reading")
            return
        self._stall_timer = self.server.loop.call_later(self._poll_interval(), self._poll_output)

    # -- closing ---------------------------------------------------------------

    def abort(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("connection %s closed: %s", self.id, why)
        self._stop_watching()
        self.cancel_all()
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _stop_watching(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def cancel_all(self) -> None:
        """Cancel everything in flight on this connection, notifications included."""
        for req in [*self.requests.values(), *self.notifications]:
            req.cancel.set()

    def in_flight(self) -> list[Request]:
        """The requests being served on this connection, notifications included."""
        return [*self.requests.values(), *self.notifications]

    # -- reading -------------------------------------------------------------

    async def run(self) -> None:
        limit = self.server.max_line_bytes
        buf = bytearray()
        discarding = False  # inside an over-long line: drop bytes up to its newline
        try:
            while not self.closed:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > limit:
                            if not discarding:
                                self._line_too_long(limit)
                            discarding = True
                            buf.clear()
                        break
                    line = bytes(buf[:nl])
                    del buf[: nl + 1]
                    if discarding or len(line) > limit:
                        if not discarding:
                            self._line_too_long(limit)
                        discarding = False
                        continue
                    if line.strip():
                        self._dispatch_guarded(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # A client that goes away mid-stream stops its generations, notifications' too.
            self.cancel_all()
            self.closed = True
            self._stop_watching()
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _line_too_long(self, limit: int) -> None:
        self.send(error(None, RPCError(ErrorCode.LINE_TOO_LONG, f"line longer than {limit} bytes; message dropped")))

    def _dispatch_guarded(self, line: bytes) -> None:
        # A bug here must cost one line, not the connection (and what is in flight on it).
        try:
            self._dispatch_line(line)
        except Exception as exc:  # noqa: BLE001
            log.exception("could not dispatch a line from client %s", self.id)
            self.send(error(None, RPCError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__} reading the request")))

    def _dispatch_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, too deep, a 5,000-digit integer
            self.send(error(None, RPCError(ErrorCode.PARSE_ERROR, _parse_error(exc))))
            return
        check_surrogates = _SURROGATE_ESCAPE.search(line) is not None
        if not isinstance(msg, list):
            self._submit(msg, self._deliver, check_surrogates)
        elif not msg:
            self.send(error(None, RPCError(ErrorCode.INVALID_REQUEST, "an empty batch")))
        else:
            batch = _Batch(self, len(msg))
            for item in msg:
                self._submit(item, batch.deliver, check_surrogates)

    def _deliver(self, reply: dict[str, Any] | None) -> None:
        if reply is not None:
            self.send(reply)

    def _submit(self, msg: Any, deliver: Deliver, check_surrogates: bool) -> None:
        """Check one request object and start it; ``deliver`` gets its response (None:
        a notification, nothing to answer) exactly once."""
        req, refusal = check_request(msg, check_surrogates)
        if req is None:
            deliver(refusal)
            return
        if req.has_id and req.id in self.requests:
            deliver(error(req.id, RPCError(ErrorCode.INVALID_REQUEST, f"request id {req.id!r} is already in flight")))
            return
        req.conn = self
        if req.has_id:
            self.requests[req.id] = req
        else:
            self.notifications.add(req)
        task = asyncio.ensure_future(self._call(req, deliver))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, req: Request, deliver: Deliver) -> None:
        reply: dict[str, Any] | None = None
        try:
            reply = await self._answer(req)
        except asyncio.CancelledError:
            reply = error(req.id, RPCError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down"))
            raise
        finally:
            if req.has_id:
                self.requests.pop(req.id, None)
            else:
                self.notifications.discard(req)
            deliver(reply if req.has_id else None)

    async def _answer(self, req: Request) -> dict[str, Any]:
        """The response to ``req``: its handler's result, or the error it raised."""
        handler = self.server.methods.get(req.method)
        try:
            if handler is None:
                raise RPCError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {req.method!r}")
            if not self.initialized and req.method != "initialize":
                raise RPCError(ErrorCode.NOT_INITIALIZED, "call 'initialize' first")
            return result(req.id, await handler(req))
        except RPCError as exc:
            return error(req.id, exc)
        except Exception as exc:  # noqa: BLE001 - a bug in a handler must not take the daemon down
            log.exception("method %s failed", req.method)
            return error(req.id, RPCError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))


class TextStream:
    """Streams text from a worker thread as notifications, joining what
    arrives close together: the first piece goes out at once, later ones at
    most every ``interval`` seconds. One notification per token would wake
    the event loop and the client for every token, CPU that on a small
    machine the model's own threads need; 20 ms (50 updates a second) still
    looks continuous. While text comes faster than that, the loop sends it
    on a timer of its own and the worker thread does not wake the loop at
    all (one wakeup per notification, not two); after a pause the next
    piece wakes it and goes out at once. ``flush()`` (on the loop) sends
    what is left: call it before the final response so that every delta
    precedes it."""

    def __init__(self, conn: "Connection", method: str, params: dict[str, Any], *, key: str = "text",
                 interval: float = 0.02):
        self.conn, self.method, self.params, self.key, self.interval = conn, method, params, key, interval
        self.loop = conn.server.loop
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._scheduled = False  # the loop will look at _parts without being woken: queued, armed or ticking
        self._timer: asyncio.TimerHandle | None = None
        self._last = float("-inf")  # loop time of the last notification

    def push(self, text: str) -> None:
        """Any thread: queue ``text``."""
        with self._lock:
            self._parts.append(text)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._arm)

    def _arm(self) -> None:
        if self._timer is not None:
            return
        wait = self._last + self.interval - self.loop.time()
        if wait > 0:
            self._timer = self.loop.call_later(wait, self._tick)
        else:  # a pause before this text: it goes out now
            self._emit(self._take(ticking=False))

    def _tick(self) -> None:
        """The timer: send what came meanwhile. Text that had to wait means it comes
        faster than ``interval``: look again then, the worker leaving the loop asleep."""
        self._timer = None
        text = self._take(ticking=True)
        if text:
            self._timer = self.loop.call_later(self.interval, self._tick)
            self._emit(text)

    def _take(self, ticking: bool) -> str:
        with self._lock:
            text = "".join(self._parts)
            self._parts.clear()
            self._scheduled = ticking and bool(text)  # the timer goes on: pushes need not wake the loop
        return text

    def _emit(self, text: str) -> None:
        if text:
            self._last = self.loop.time()
            self.conn.notify(self.method, {**self.params, self.key: text})

    def flush(self) -> None:
        """On the loop: send what is queued now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._emit(self._take(ticking=False))


class RPCServer:
    """Accepts connections on a Unix socket and routes their requests to handlers."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
                 send_stall_timeout: float = DEFAULT_SEND_STALL_TIMEOUT, send_low_mark: int = SEND_LOW_MARK):
        """``send_stall_timeout``: seconds a client's unsent output may stay above
        ``send_low_mark`` bytes before the client counts as not reading (its requests are
        cancelled and it is disconnected)."""
        self.methods: dict[str, Handler] = {}
        self.connections: set[Connection] = set()
        self.max_line_bytes = max_line_bytes
        self.send_stall_timeout = send_stall_timeout
        self.send_low_mark = send_low_mark
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None

    def method(self, name: str, handler: Handler) -> None:
        if name in self.methods:
            raise ValueError(f"method {name!r} is already registered")
        self.methods[name] = handler

    async def listen(self, path: str) -> None:
        self.loop = asyncio.get_running_loop()
        # umask makes the socket 0600 from the moment it exists (no chmod race).
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._accept, path=path, limit=2**16)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is not None and uid != os.getuid():
            log.warning("refused a connection from uid %s", uid)
            writer.write(encode(error(None, RPCError(ErrorCode.INVALID_REQUEST, "permission denied: wrong user"))))
            writer.close()
            return
        conn = Connection(self, reader, writer)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    def broadcast(self, topic: str, method: str, params: dict[str, Any]) -> None:
        """Send a notification to every client with a subscription pattern matching ``topic``."""
        for conn in list(self.connections):
            if any(fnmatch.fnmatchcase(topic, pattern) for pattern in conn.subscriptions):
                conn.notify(method, params)

    def in_flight(self, exclude: Request | None = None) -> int:
        """Requests being served (not counting ``exclude``, typically the caller)."""
        return sum(1 for c in self.connections for r in c.in_flight() if r is not exclude)

    async def drain_and_close(self, timeout: float = 15) -> None:
        """Shutdown: stop accepting, cancel every in-flight request and give them
        ``timeout`` seconds to answer (they see their cancel flag within one
        decode step), flush what clients have not read yet, then close."""
        if self._server is not None:
            self._server.close()  # no new connections
        tasks = [t for c in self.connections for t in c.tasks]
        for conn in self.connections:
            conn.cancel_all()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        for conn in list(self.connections):
            try:
                await asyncio.wait_for(conn.writer.drain(), 2)
            except Exception:  # noqa: BLE001 - the client may be gone
                pass
        await self.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.abort("daemon stopping")
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2)
            except asyncio.TimeoutError:
                pass
