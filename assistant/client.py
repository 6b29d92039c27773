"""The one async client of the daemon: the CLI, the TUI and the tests all use it.

    async with await Client.connect() as client:
        stream = await client.chat(prompt="Hello", session="s1")
        async for text in stream:
            print(text, end="")
        result = await stream.result()

``connect(start=True)`` starts a daemon in the background if none answers.
A socket served by a process of another uid is refused before anything is
sent to it (``UntrustedDaemon``; docs/security.md).
This module imports nothing heavy, so commands that only talk to the daemon
start fast.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from assistant import paths
from assistant.peer import peer_uid
from assistant.protocol import DEFAULT_MAX_LINE_BYTES, PROTOCOL_VERSION, ErrorCode, RPCError, encode, request


class DaemonNotRunning(ConnectionError):
    """Nothing answers on the socket."""


class DaemonStartError(RuntimeError):
    """A daemon was started but did not become ready; the message holds its log tail."""


class UntrustedDaemon(RPCError):
    """The socket is served by a process of another user: nothing is sent to it.

    An RPCError, so every front end that prints a daemon's refusal prints this one.
    """

    def __init__(self, sock: Path, uid: int):
        from assistant.peer import describe_uid

        super().__init__(ErrorCode.INVALID_REQUEST,
                         f"refusing to talk to {sock}: it is served by a process of {describe_uid(uid)}, "
                         f"not of {describe_uid(os.geteuid())}, so it is not your daemon (another user may "
                         "have put it there); nothing was sent to it")
        self.uid = uid


class ChatStream:
    """A streaming chat: iterate for text deltas, then await ``result()``."""

    def __init__(self, client: "Client", rid: int):
        self._client = client
        self.id = rid
        self._deltas: asyncio.Queue = asyncio.Queue()
        self._future: asyncio.Future = asyncio.get_running_loop().create_future()
        self.text = ""

    def _on_delta(self, text: str) -> None:
        self.text += text  # the text so far, whether or not anyone iterates
        self._deltas.put_nowait(text)

    def _on_done(self) -> None:
        self._deltas.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        while True:
            item = await self._deltas.get()
            if item is None:
                return
            yield item

    async def chunks(self) -> AsyncIterator[str]:
        """Like iterating, but each item joins every delta that arrived since the
        last one: a consumer slower than the model (a UI repainting) gets fewer,
        larger pieces and never falls behind."""
        while True:
            item = await self._deltas.get()
            parts: list[str] = []
            while item is not None:
                parts.append(item)
                if self._deltas.empty():
                    break
                item = self._deltas.get_nowait()
            if parts:
                yield "".join(parts)
            if item is None:
                return

    async def result(self) -> dict[str, Any]:
        """The final response: full text, finish_reason and stats. Raises RPCError."""
        return await self._future

    async def cancel(self) -> bool:
        """Ask the daemon to stop this reply; the result then says "cancelled"."""
        try:
            await self._client.call("cancel", {"id": self.id})
            return True
        except RPCError as exc:
            if exc.code == ErrorCode.REQUEST_NOT_FOUND:
                return False  # already finished
            raise


class Client:
    """A connection to the daemon. Create it with ``await Client.connect(...)``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, socket_path: Path):
        self._reader = reader
        self._writer = writer
        self.socket_path = socket_path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._streams: dict[int, ChatStream] = {}
        self.server_info: dict[str, Any] = {}
        self.on_notification: Callable[[str, dict[str, Any]], None] | None = None
        self.closed = asyncio.Event()
        self._reader_task = asyncio.ensure_future(self._read_loop())

    # -- connecting ------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike | None = None,
        *,
        client_name: str = "assistant",
        start: bool = False,
        config_path: str | os.PathLike | None = None,
        start_timeout: float = 60.0,
        on_starting: Callable[[], None] | None = None,
        flags: list[str] | None = None,
    ) -> "Client":
        """Connect and ``initialize``. With ``start=True`` a missing daemon is started."""
        sock = paths.socket_path(socket_path)
        try:
            client = await cls._open(sock)
        except DaemonNotRunning:
            if not start:
                raise
            if on_starting is not None:
                on_starting()
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: start_daemon(sock, config_path=config_path, timeout=start_timeout, flags=flags))
            client = await cls._open(sock)
        try:
            client.server_info = await client.call(
                "initialize", {"protocol_version": PROTOCOL_VERSION, "client": client_name})
        except BaseException:
            await client.close()
            raise
        return client

    @classmethod
    async def _open(cls, sock: Path) -> "Client":
        try:
            reader, writer = await asyncio.open_unix_connection(str(sock), limit=DEFAULT_MAX_LINE_BYTES)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(f"no daemon is listening on {sock}") from exc
        try:
            _check_peer(writer, sock)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, sock)

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass
        self._reader_task.cancel()
        self._fail_all(ConnectionError("connection closed"))

    # -- the wire --------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    self._fail_all(RPCError(ErrorCode.PARSE_ERROR, "the daemon sent something that is not JSON: "
                                            "is this socket an assistant daemon?"))
                    break
                self._handle(msg)
        except (ConnectionError, ValueError):
            pass
        finally:
            self._fail_all(ConnectionError("the daemon closed the connection"))
            self.closed.set()

    def _handle(self, msg: dict[str, Any]) -> None:
        if not isinstance(msg, dict):
            return
        if "method" in msg and "id" not in msg:
            params = msg.get("params") or {}
            if msg["method"] == "chat.delta" and params.get("id") in self._streams:
                self._streams[params["id"]]._on_delta(params.get("text", ""))
            elif self.on_notification is not None:
                self.on_notification(msg["method"], params)
            return
        rid = msg.get("id")
        fut = self._pending.pop(rid, None)
        stream = self._streams.pop(rid, None)
        if stream is not None:
            stream._on_done()
        if fut is None or fut.done():
            return
        if "error" in msg:
            err = msg["error"] or {}
            fut.set_exception(RPCError(err.get("code", ErrorCode.INTERNAL_ERROR), err.get("message", "error"),
                                       err.get("data")))
        else:
            fut.set_result(msg.get("result"))

    def _fail_all(self, exc: BaseException) -> None:
        for rid, fut in list(self._pending.items()):
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        for stream in self._streams.values():
            stream._on_done()
        self._streams.clear()

    def _send(self, method: str, params: dict[str, Any] | None) -> tuple[int, asyncio.Future]:
        if self.closed.is_set():
            raise ConnectionError("the daemon closed the connection")
        rid = next(self._ids)
        line = encode(request(rid, method, params))  # ValueError (NaN, ...) before anything is pending
        fut = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._writer.write(line)
        return rid, fut

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """One request, its result. Raises RPCError for an error response."""
        _, fut = self._send(method, params)
        await self._writer.drain()
        return await fut

    async def chat(self, **params: Any) -> ChatStream:
        """Start a chat (see docs/protocol.md for the params); returns the stream."""
        params = {k: v for k, v in params.items() if v is not None}
        rid, fut = self._send("chat", params)
        stream = ChatStream(self, rid)
        self._streams[rid] = stream
        fut.add_done_callback(lambda f: _chain(f, stream._future))
        await self._writer.drain()
        return stream


def _check_peer(writer: asyncio.StreamWriter, sock: Path) -> None:
    """Refuse a socket served by another uid before anything is written to it.

    The kernel says who is at the other end (SO_PEERCRED on Linux, getpeereid
    on macOS): a socket path can be planted or swapped, the peer's uid cannot.
    Where the platform cannot tell (None), the socket's directory is all we go on.
    """
    raw = writer.get_extra_info("socket")
    uid = peer_uid(raw) if raw is not None else None
    if uid is not None and uid != os.geteuid():
        raise UntrustedDaemon(sock, uid)


def _chain(src: asyncio.Future, dst: asyncio.Future) -> None:
    if dst.done():
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())
    else:
        dst.set_result(src.result())


# -- starting a daemon in the background --------------------------------------


def daemon_command(sock: Path, config_path: str | os.PathLike | None = None,
                   flags: list[str] | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "assistant", "--socket", str(sock)]
    if config_path:
        cmd += ["--config", str(config_path)]
    return cmd + list(flags or []) + ["serve", "--quiet"]


def start_daemon(sock: Path, *, config_path: str | os.PathLike | None = None, timeout: float = 60.0,
                 flags: list[str] | None = None) -> int:
    """Start ``assistant serve`` detached and wait until it answers on ``sock``.

    Returns its pid. Raises DaemonStartError with the end of its log if it
    exits or does not answer in time.
    """
    import socket as _socket

    log_path = paths.log_dir()
    log_path.mkdir(parents=True, exist_ok=True)
    out = open(log_path / "daemon.stderr", "ab")
    start_at = out.tell()
    proc = subprocess.Popen(daemon_command(sock, config_path, flags), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=out, start_new_session=True, close_fds=True)
    out.close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise DaemonStartError(f"the daemon exited with status {code}:\n{_tail(log_path / 'daemon.stderr', start_at)}")
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(str(sock))
            return proc.pid
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    proc.terminate()
    raise DaemonStartError(f"the daemon did not answer on {sock} within {timeout:.0f} s:\n"
                           f"{_tail(log_path / 'daemon.stderr', start_at)}")


def _tail(path: Path, start: int, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode(errors="replace").strip()
