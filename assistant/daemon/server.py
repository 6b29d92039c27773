"""JSON-RPC 2.0 over a Unix socket: framing, dispatch, and one object per client.

This module knows nothing about models. The daemon registers methods with
``RPCServer.method``; each handler is ``async def handler(req: Request)`` and
returns the result (or raises ``RPCError``). A handler may stream by calling
``req.conn.notify`` with the request id in its params before it returns, and
should stop early once ``req.cancel`` is set.

Robustness rules (DESIGN "Protocol"): a line that is not JSON, is too long,
or names an unknown method gets an error and the connection goes on. Writes
never block the daemon: a client that stops reading is disconnected once its
send buffer passes a bound, and its requests are cancelled.
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import socket
import struct
import sys
import threading
from typing import Any, Awaitable, Callable

from assistant.protocol import DEFAULT_MAX_LINE_BYTES, ErrorCode, RPCError, encode, error, notification, result

log = logging.getLogger("assistant.daemon.server")


class Request:
    """One call: its id (None for a notification), params, cancel flag and connection."""

    __slots__ = ("conn", "id", "method", "params", "cancel")

    def __init__(self, conn: "Connection", rid: Any, method: str, params: dict[str, Any]):
        self.conn = conn
        self.id = rid
        self.method = method
        self.params = params
        # Set by `cancel`, a disconnect or shutdown; worker threads poll it between steps.
        self.cancel = threading.Event()


Handler = Callable[[Request], Awaitable[Any]]

# Above this many unsent bytes a client is too slow and is disconnected.
MAX_SEND_BUFFER = 8 * 1024 * 1024


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if unknown."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if sys.platform == "darwin":  # getpeereid() is LOCAL_PEERCRED on SOL_LOCAL (0)
        LOCAL_PEERCRED = 0x001
        xucred = sock.getsockopt(0, LOCAL_PEERCRED, struct.calcsize("IIh16I"))
        return struct.unpack_from("IIh", xucred)[1]
    return None


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
        self.tasks: set[asyncio.Task] = set()
        self.subscriptions: set[str] = set()

    # -- sending -------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            self.writer.write(encode(message))
        except (ConnectionError, RuntimeError):
            self.abort("write failed")
            return
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            log.warning("client %s is not reading; disconnecting it", self.id)
            self.abort("send buffer full")

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self.send(notification(method, params))

    def abort(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.debug("connection %s closed: %s", self.id, why)
        self.cancel_all()
        try:
            self.writer.transport.abort()
        except Exception:  # noqa: BLE001 - already gone
            pass

    def cancel_all(self) -> None:
        for req in self.requests.values():
            req.cancel.set()

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
                        self._dispatch_line(line)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            # A client that goes away mid-stream stops its generations.
            self.cancel_all()
            self.closed = True
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass

    def _line_too_long(self, limit: int) -> None:
        self.send(error(None, RPCError(ErrorCode.LINE_TOO_LONG, f"line longer than {limit} bytes; message dropped")))

    def _dispatch_line(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.send(error(None, RPCError(ErrorCode.PARSE_ERROR, f"invalid JSON: {exc}")))
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0" or not isinstance(msg.get("method"), str):
            rid = msg.get("id") if isinstance(msg, dict) else None
            self.send(error(rid, RPCError(ErrorCode.INVALID_REQUEST, "expected a JSON-RPC 2.0 request object with a 'method'")))
            return
        params = msg.get("params", {})
        if params is None:
            params = {}
        has_id = "id" in msg
        rid = msg.get("id")
        if has_id and (isinstance(rid, bool) or not isinstance(rid, (str, int, float, type(None)))):
            self.send(error(None, RPCError(ErrorCode.INVALID_REQUEST, "id must be a string, a number or null")))
            return
        if not isinstance(params, dict):
            if has_id:
                self.send(error(rid, RPCError(ErrorCode.INVALID_PARAMS, "params must be an object")))
            return
        if has_id and rid in self.requests:
            self.send(error(rid, RPCError(ErrorCode.INVALID_REQUEST, f"request id {rid!r} is already in flight")))
            return
        req = Request(self, rid if has_id else None, msg["method"], params)
        if has_id:
            self.requests[rid] = req
        task = asyncio.ensure_future(self._call(req, has_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _call(self, req: Request, has_id: bool) -> None:
        method, rid = req.method, req.id
        handler = self.server.methods.get(method)
        try:
            if handler is None:
                raise RPCError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {method!r}")
            if not self.initialized and method != "initialize":
                raise RPCError(ErrorCode.NOT_INITIALIZED, "call 'initialize' first")
            value = await handler(req)
            if has_id:
                self.send(result(rid, value))
        except RPCError as exc:
            if has_id:
                self.send(error(rid, exc))
        except asyncio.CancelledError:
            if has_id:
                self.send(error(rid, RPCError(ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in a handler must not take the daemon down
            log.exception("method %s failed", method)
            if has_id:
                self.send(error(rid, RPCError(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")))
        finally:
            if has_id:
                self.requests.pop(rid, None)


class TextStream:
    """Streams text from a worker thread as notifications, joining what
    arrives close together: the first piece goes out at once, later ones at
    most every ``interval`` seconds. One notification per token would wake
    the event loop and the client for every token, CPU that on a small
    machine the model's own threads need; 20 ms (50 updates a second) still
    looks continuous. ``flush()`` (on the loop) sends what is left: call it
    before the final response so that every delta precedes it."""

    def __init__(self, conn: "Connection", method: str, params: dict[str, Any], *, key: str = "text",
                 interval: float = 0.02):
        self.conn, self.method, self.params, self.key, self.interval = conn, method, params, key, interval
        self.loop = conn.server.loop
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self._scheduled = False  # a send is queued or armed
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
        if wait <= 0:
            self._send()
        else:
            self._timer = self.loop.call_later(wait, self._send)

    def _send(self) -> None:
        self._timer = None
        with self._lock:
            text = "".join(self._parts)
            self._parts.clear()
            self._scheduled = False
        if text:
            self._last = self.loop.time()
            self.conn.notify(self.method, {**self.params, self.key: text})

    def flush(self) -> None:
        """On the loop: send what is queued now."""
        if self._timer is not None:
            self._timer.cancel()
        self._send()


class RPCServer:
    """Accepts connections on a Unix socket and routes their requests to handlers."""

    def __init__(self, *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        self.methods: dict[str, Handler] = {}
        self.connections: set[Connection] = set()
        self.max_line_bytes = max_line_bytes
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
        return sum(1 for c in self.connections for r in c.requests.values() if r is not exclude)

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
