"""The JSON-RPC server: unit tests of its helpers, an in-process server on a
real Unix socket (flow control), and its framing against a real daemon
(bad frames, odd ids, batches, notifications)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from assistant.daemon.server import MAX_SEND_BUFFER, RPCServer, TextStream
from assistant.protocol import ErrorCode


class _Conn:
    def __init__(self, loop):
        self.server = SimpleNamespace(loop=loop)
        self.sent: list[dict] = []

    def notify(self, method, params):
        assert method == "chat.delta"
        self.sent.append(params)


async def _turns(n=3):
    for _ in range(n):
        await asyncio.sleep(0)


async def test_first_piece_goes_at_once_later_ones_wait_for_the_interval_or_a_flush():
    conn = _Conn(asyncio.get_running_loop())
    stream = TextStream(conn, "chat.delta", {"id": 7}, interval=3600)
    stream.push("Hello")
    await _turns()
    assert conn.sent == [{"id": 7, "text": "Hello"}]  # nothing sent yet: no wait
    stream.push(", wor")
    stream.push("ld")
    await _turns()
    assert len(conn.sent) == 1  # within the interval: held back, joined
    stream.flush()  # the daemon, before its final response
    assert conn.sent[1] == {"id": 7, "text": ", world"}
    stream.flush()
    assert len(conn.sent) == 2  # an empty flush sends nothing


async def test_pieces_that_arrive_while_the_loop_is_busy_go_out_as_one():
    conn = _Conn(asyncio.get_running_loop())
    stream = TextStream(conn, "chat.delta", {"id": 1}, interval=0.0)
    t = threading.Thread(target=lambda: [stream.push(f"t{i} ") for i in range(200)])
    t.start()
    t.join()  # the loop could not run meanwhile
    await _turns()
    assert conn.sent == [{"id": 1, "text": "".join(f"t{i} " for i in range(200))}]


async def test_several_threads_lose_no_piece():
    loop = asyncio.get_running_loop()
    conn = _Conn(loop)
    stream = TextStream(conn, "chat.delta", {"id": 1}, interval=0.0)
    barrier = threading.Barrier(4)

    def worker(k):
        barrier.wait()
        for _ in range(300):
            stream.push(f"{k}")

    await asyncio.gather(*(loop.run_in_executor(None, worker, k) for k in range(4)))
    stream.flush()
    assert sorted("".join(p["text"] for p in conn.sent)) == sorted("0123" * 300)


# -- a raw connection ---------------------------------------------------------------


def strict_json(line: bytes) -> Any:
    """``line`` parsed as the JSON standard says: UTF-8, no NaN or Infinity, no lone surrogate."""
    def no_constant(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    value = json.loads(line.decode("utf-8"), parse_constant=no_constant)
    # Re-encoding as strict UTF-8 fails on a lone surrogate (an escape like \ud800).
    json.dumps(value, ensure_ascii=False).encode("utf-8")
    return value


class Wire:
    """A bare asyncio connection to a daemon speaking newline-delimited JSON, to send
    bad input. Every line received is checked to be strict JSON."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path, *, initialize: bool = True) -> "Wire":
        reader, writer = await asyncio.open_unix_connection(str(path), limit=64 * 1024 * 1024)
        wire = cls(reader, writer)
        if initialize:
            wire.send({"jsonrpc": "2.0", "id": "init", "method": "initialize", "params": {"client": "wire"}})
            reply = await wire.recv()
            assert reply["id"] == "init" and "result" in reply, reply
        return wire

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, obj: Any) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    async def recv(self, timeout: float = 60) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise ConnectionError("the daemon closed the connection")
        return strict_json(line)

    async def reply(self, timeout: float = 60) -> Any:
        """The next message that is not a notification (a response, or an array of them)."""
        while True:
            msg = await self.recv(timeout)
            if isinstance(msg, list) or "method" not in msg:
                return msg

    async def replies_until(self, rid: Any, timeout: float = 60) -> list[Any]:
        """Every response up to and including the one with id ``rid``."""
        got = []
        while True:
            msg = await self.reply(timeout)
            got.append(msg)
            if isinstance(msg, dict) and msg.get("id") == rid:
                return got

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:  # noqa: BLE001 - already gone
            pass


def status_frame(rid: Any) -> dict:
    return {"jsonrpc": "2.0", "id": rid, "method": "status"}


def codes(replies: list[dict]) -> list[tuple[Any, int]]:
    return [(r["id"], r["error"]["code"]) for r in replies]


# -- bad frames against a real daemon ---------------------------------------------------


@pytest.mark.slow
async def test_deep_nesting_and_huge_integers_are_parse_errors_and_an_inflight_chat_still_answers(daemon):
    wire = await Wire.open(daemon.socket)
    try:
        wire.send({"jsonrpc": "2.0", "id": "c", "method": "chat",
                   "params": {"prompt": "Count to twenty.", "max_tokens": 30, "temperature": 0}})
        depth = 100_000
        wire.send_raw(b"[" * depth + b"]" * depth + b"\n")
        wire.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"status","params":' + b'{"a":' * depth + b"1"
                      + b"}" * depth + b"}\n")
        wire.send_raw(b'{"jsonrpc":"2.0","id":3,"method":"sessions.list","params":{"limit":'
                      + b"7" * 5000 + b"}}\n")
        wire.send(status_frame(4))
        got = await wire.replies_until("c")
        got += [] if any(r.get("id") == 4 for r in got) else await wire.replies_until(4)
    finally:
        await wire.close()
    parse_errors = [r for r in got if r["id"] is None]
    assert [r["error"]["code"] for r in parse_errors] == [ErrorCode.PARSE_ERROR] * 3, got
    by_id = {r["id"]: r for r in got}
    assert by_id["c"]["result"]["text"], "the chat in flight got its reply"
    assert by_id[4]["result"]["pid"] == daemon.proc.pid
    assert "Traceback" not in daemon.stderr()


@pytest.mark.slow
async def test_lone_surrogates_are_refused_with_a_reply_that_is_valid_utf8(assistant_daemon_factory):
    d = assistant_daemon_factory(no_plugins=True)
    wire = await Wire.open(d.socket)
    try:
        wire.send_raw(b'{"jsonrpc":"2.0","id":"\\ud800","method":"status"}\n')
        assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)]
        wire.send_raw(b'{"jsonrpc":"2.0","id":2,"method":"sessions.create","params":{"title":"a\\udc00b"}}\n')
        err = await wire.reply()
        assert codes([err]) == [(2, ErrorCode.INVALID_PARAMS)] and "title" in err["error"]["message"]
        wire.send_raw(b'{"jsonrpc":"2.0","id":3,"method":"sta\\uDFFFtus"}\n')
        assert codes([await wire.reply()]) == [(3, ErrorCode.INVALID_REQUEST)]
        # A proper pair of surrogates is one character, and fine.
        wire.send_raw(b'{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"status"}\n')
        assert (await wire.reply())["id"] == "\U0001F600"
    finally:
        await wire.close()
    assert "Traceback" not in d.stderr() and "never retrieved" not in d.stderr()


@pytest.mark.slow
async def test_non_finite_and_malformed_ids_are_refused_and_every_reply_is_json(assistant_daemon_factory):
    d = assistant_daemon_factory(no_plugins=True)
    wire = await Wire.open(d.socket)
    try:
        for raw in (b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"):
            wire.send_raw(b'{"jsonrpc":"2.0","id":' + raw + b',"method":"status"}\n')
            assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)], raw
            wire.send_raw(b'{"id":' + raw + b"}\n")  # not a request either: the id still cannot be echoed
            assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)], raw
        for bad in ([1], {"a": 1}, True):
            wire.send({"jsonrpc": "2.0", "id": bad, "method": "status"})
            assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)], bad
            wire.send({"id": bad})
            assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)], bad
        # Odd but valid ids come back as they were sent.
        for rid in (1.5, -7, 2**70, "", "☃"):
            wire.send(status_frame(rid))
            assert (await wire.reply())["id"] == rid
    finally:
        await wire.close()
    assert "Traceback" not in d.stderr()


@pytest.mark.slow
async def test_batches_follow_json_rpc(assistant_daemon_factory):
    d = assistant_daemon_factory(no_plugins=True)
    wire = await Wire.open(d.socket, initialize=False)
    try:
        wire.send([])
        assert codes([await wire.reply()]) == [(None, ErrorCode.INVALID_REQUEST)]
        wire.send([1, "x", None])
        reply = await wire.reply()
        assert isinstance(reply, list) and codes(reply) == [(None, ErrorCode.INVALID_REQUEST)] * 3
        wire.send([{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"client": "batch"}},
                   {"jsonrpc": "2.0", "method": "status"},  # a notification: no answer
                   {"jsonrpc": "2.0", "id": 2, "method": "no.such.method"},
                   {"foo": "bar"},
                   [status_frame(3)]])  # a batch in a batch is not a request
        reply = await wire.reply()
        assert isinstance(reply, list) and len(reply) == 4
        by_id: dict[Any, list[dict]] = {}
        for r in reply:
            by_id.setdefault(r["id"], []).append(r)
        assert by_id[1][0]["result"]["protocol_version"] == 1
        assert by_id[2][0]["error"]["code"] == ErrorCode.METHOD_NOT_FOUND
        assert [r["error"]["code"] for r in by_id[None]] == [ErrorCode.INVALID_REQUEST] * 2
        # Only notifications: nothing comes back, so the next reply is the status after it.
        wire.send([{"jsonrpc": "2.0", "method": "status"}, {"jsonrpc": "2.0", "method": "status"}])
        wire.send(status_frame(4))
        assert (await wire.reply())["id"] == 4
        # Requests of a batch run concurrently; the array comes when they all have.
        wire.send([status_frame(5), {"jsonrpc": "2.0", "id": 6, "method": "models.list"}, status_frame(5)])
        reply = await wire.reply()
        assert sorted(map(str, (r["id"] for r in reply))) == ["5", "5", "6"]
        assert sum("error" in r for r in reply) <= 1  # the second 5 only if the first was still in flight
    finally:
        await wire.close()
    assert "Traceback" not in d.stderr()


@pytest.mark.slow
async def test_a_notification_chat_is_cancelled_when_its_client_disconnects(daemon):
    wire = await Wire.open(daemon.socket)
    wire.send({"jsonrpc": "2.0", "method": "chat",
               "params": {"prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}})
    msg = await wire.recv()
    assert msg["method"] == "chat.delta" and msg["params"]["id"] is None
    await wire.close()
    watcher = await Wire.open(daemon.socket)
    try:
        for n in range(600):  # the status after the disconnect shows it stopped (bounded: 60 s)
            watcher.send(status_frame(n))
            st = (await watcher.reply())["result"]
            if all(m["active_requests"] == 0 for m in st["models"]):
                break
            await asyncio.sleep(0.1)
    finally:
        await watcher.close()
    last = st["models"][0]["last_request"]
    assert last["finish_reason"] == "cancelled"
    assert last["completion_tokens"] < 1500


# -- flow control: an in-process server on a real socket -------------------------------------


async def _flood_server(path: Path, cancelled: asyncio.Event, stall: float) -> RPCServer:
    """A server whose ``flood`` streams 1 KiB notifications (about 1 MB/s, capped at 6 MiB)
    until its request is cancelled."""
    server = RPCServer(send_stall_timeout=stall)

    async def initialize(req):
        req.conn.initialized = True
        req.conn.client_name = req.params.get("client", "?")
        return {}

    async def flood(req):
        sent = 0
        while not req.cancel.is_set() and sent < 6 * 1024 * 1024:
            req.conn.notify("flood.data", {"id": req.id, "text": "x" * 1024})
            sent += 1024
            await asyncio.sleep(0.001)
        if req.cancel.is_set():
            cancelled.set()
        return {"sent": sent}

    async def ping(req):
        return "pong"

    for name, handler in (("initialize", initialize), ("flood", flood), ("ping", ping)):
        server.method(name, handler)
    await server.listen(str(path))
    return server


async def test_a_client_that_never_reads_is_cancelled_after_the_stall_timeout(caplog):
    path = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp")) / "s.sock"
    cancelled = asyncio.Event()
    server = await _flood_server(path, cancelled, stall=0.5)
    sleeper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = await Wire.open(path)
    try:
        sleeper.connect(str(path))
        sleeper.sendall(b'{"jsonrpc":"2.0","id":0,"method":"initialize"}\n'
                        b'{"jsonrpc":"2.0","id":1,"method":"flood"}\n')  # and never reads
        with caplog.at_level(logging.WARNING, logger="assistant.daemon.server"):
            for n in range(3000):  # the other client is served meanwhile (bounded: 30 s)
                reader.send({"jsonrpc": "2.0", "id": n, "method": "ping"})
                assert (await reader.reply())["result"] == "pong"
                if cancelled.is_set():
                    break
                await asyncio.sleep(0.01)
        assert cancelled.is_set(), "the never-reading client's request was not cancelled"
        said = " ".join(r.getMessage() for r in caplog.records)
        assert "has not read its replies for" in said, said
        # The time bound fired, not the 8 MiB one (the flood stops at 6 MiB anyway).
        assert "is not reading: over" not in said
        # The sleeper is gone; the reader (the only one that named itself) is still served.
        assert [c.client_name for c in server.connections if not c.closed] == ["wire"]
    finally:
        sleeper.close()
        await reader.close()
        await server.close()
    assert MAX_SEND_BUFFER > 6 * 1024 * 1024


async def test_a_result_that_is_not_json_becomes_an_error_reply_and_nothing_else_goes_out():
    path = Path(tempfile.mkdtemp(prefix="as-", dir="/tmp")) / "s.sock"
    server = RPCServer()
    bad_results = {"nan": float("nan"), "inf": float("inf"), "surrogate": "a\udc80", "object": object(),
                   "deep": nest(5000)}

    async def initialize(req):
        req.conn.initialized = True
        return {}

    async def bad(req):
        req.conn.notify("bad.note", {"value": bad_results[req.params["kind"]]})  # dropped, not sent
        return bad_results[req.params["kind"]]

    server.method("initialize", initialize)
    server.method("bad", bad)
    await server.listen(str(path))
    wire = await Wire.open(path)
    try:
        for n, kind in enumerate(bad_results):
            wire.send({"jsonrpc": "2.0", "id": n, "method": "bad", "params": {"kind": kind}})
            reply = await wire.recv()  # strict JSON, and not the notification
            assert codes([reply]) == [(n, ErrorCode.INTERNAL_ERROR)], reply
            assert "cannot be encoded as JSON" in reply["error"]["message"]
        wire.send([{"jsonrpc": "2.0", "id": "a", "method": "bad", "params": {"kind": "nan"}},
                   {"jsonrpc": "2.0", "id": "b", "method": "initialize"}])
        reply = await wire.recv()
        assert sorted(codes([r for r in reply if "error" in r])) == [("a", ErrorCode.INTERNAL_ERROR)]
        assert [r["id"] for r in reply if "result" in r] == ["b"]
    finally:
        await wire.close()
        await server.close()


def nest(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value
