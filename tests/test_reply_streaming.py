"""The path of a reply's text to its client, and what it costs on the way.

- ``server.TextStream``: while text comes faster than its interval the loop
  sends it on its own timer, and the model's thread stops waking the loop;
- ``chat._AfterCommit``: the reply's text waits for the user message's commit
  (which runs beside the prefill) and goes out whole and in order after it;
  after a failed commit none of it ever does;
- ``http.runs.ChatRun``: pieces queued while the loop was busy go out as one;
- the remote backend listens to a cancel flag that says when it is set (the
  daemon's ``CancelFlag``) instead of polling it, against a real HTTP server
  on loopback that stays silent (a long prefill); a plain flag is still polled;
- it reads a fast stream (a piece a millisecond, from a real server on
  loopback) in gulps, whole and in order, and a cancel stops it meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest
from aiohttp import web
from remote_servers import free_port

from assistant.daemon import remote_chat
from assistant.daemon.http.runs import ChatRun
from assistant.daemon.methods.chat import _AfterCommit
from assistant.daemon.server import TextStream
from assistant.daemon.worker import CancelFlag
from assistant.inference.sampling import SamplingParams
from backends import remote, remote_stream
from backends.base import LoadOptions
from backends.remote import RemoteBackend


class _Conn:
    def __init__(self, loop):
        self.server = SimpleNamespace(loop=loop)
        self.sent: list[str] = []

    def notify(self, method, params):
        self.sent.append(params["text"])


class _CountingLoop:
    """A real loop, counting the wakeups other threads ask of it."""

    def __init__(self, loop):
        self.loop, self.wakeups = loop, 0

    def call_soon_threadsafe(self, *args):
        self.wakeups += 1
        return self.loop.call_soon_threadsafe(*args)

    def __getattr__(self, name):
        return getattr(self.loop, name)


async def test_text_faster_than_the_interval_goes_out_on_the_loops_timer_without_waking_it():
    loop = _CountingLoop(asyncio.get_running_loop())
    conn = _Conn(loop)
    stream = TextStream(conn, "chat.delta", {"id": 1}, interval=0.1)
    pieces = [f"t{i} " for i in range(150)]

    def model():  # a token every 2 ms for about 0.3 s: three intervals and more
        for piece in pieces:
            stream.push(piece)
            threading.Event().wait(0.002)

    await loop.run_in_executor(None, model)
    await asyncio.sleep(0.8)  # the timer sends what is left, then finds nothing and stops
    assert "".join(conn.sent) == "".join(pieces)  # all of it, in order
    assert len(conn.sent) >= 3
    # Each notification used to cost one wakeup from the model's thread; now only the
    # first piece and the one after it wake the loop, the timer takes the rest.
    assert loop.wakeups < len(conn.sent)
    before = loop.wakeups
    stream.push("after a pause")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert loop.wakeups == before + 1 and conn.sent[-1] == "after a pause"  # stopped: woken, and out at once
    stream.flush()


class _Recorder:
    def __init__(self):
        self.pushed: list[str] = []
        self.flushes = 0

    def push(self, text):
        self.pushed.append(text)

    def flush(self):
        self.flushes += 1


def test_text_waits_for_the_commit_then_goes_out_in_order_and_a_flush_asked_for_meanwhile_follows():
    inner = _Recorder()
    gate = _AfterCommit(inner)
    gate.push("Hel")
    gate.push("lo")
    gate.flush()  # the generation ended before the commit returned
    assert inner.pushed == [] and inner.flushes == 0
    gate.open()
    assert inner.pushed == ["Hello"] and inner.flushes == 1
    gate.push(", world")
    gate.flush()
    gate.open()  # the done callback and the reply path both open it: once is what counts
    assert inner.pushed == ["Hello", ", world"] and inner.flushes == 2


def test_after_a_failed_commit_nothing_of_the_reply_goes_out():
    inner = _Recorder()
    gate = _AfterCommit(inner)
    gate.push("secret")
    gate.fail()
    gate.push(" more")
    gate.open()
    gate.flush()
    assert inner.pushed == [] and inner.flushes == 0


def test_opening_while_the_model_pushes_loses_and_reorders_nothing():
    inner = _Recorder()
    gate = _AfterCommit(inner)
    started = threading.Event()

    def model():
        for i in range(5000):
            gate.push(f"{i},")
            if i == 100:
                started.set()

    t = threading.Thread(target=model)
    t.start()
    started.wait()
    gate.open()
    t.join()
    assert "".join(inner.pushed) == "".join(f"{i}," for i in range(5000))


async def test_pieces_queued_while_the_loop_was_busy_go_out_as_one_event():
    run = ChatRun(None, "http:local", None, stream=True)
    for piece in ("a", "b", "c"):
        run._queue_text(piece)
    assert run.unsent == 3
    assert await run.first() == "abc"
    run._queue_text("d")
    run._queue_text("e")
    run.queue.put_nowait(None)  # the chat ended
    assert [p async for p in run.pieces()] == ["de"]
    assert run.unsent == 0
    assert [p async for p in run.pieces()] == []  # the end stays the end


# -- the remote backend against a silent server ------------------------------------------------


@pytest.fixture
def silent_server():
    """A real OpenAI-shaped server on loopback whose chat answers nothing for a minute
    (a long prefill); ``reached`` is set when a chat request arrived."""
    reached, ready, stopping = threading.Event(), threading.Event(), threading.Event()
    holder: dict = {"port": free_port()}

    async def models(_request):
        return web.json_response({"object": "list", "data": [{"id": "quiet", "object": "model"}]})

    async def chat(_request):
        reached.set()
        for _ in range(1200):  # a minute at most, or until the test is over
            if stopping.is_set():
                break
            await asyncio.sleep(0.05)
        return web.json_response({})

    def serve():
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.add_routes([web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", holder["port"])
        loop.run_until_complete(site.start())
        holder["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield f"http://127.0.0.1:{holder['port']}/v1", reached
    stopping.set()
    holder["loop"].call_soon_threadsafe(holder["loop"].stop)
    thread.join(30)


def _chat_in_thread(backend, flag):
    out: dict = {}

    def go():
        out["result"] = remote_chat.generate(backend, [{"role": "user", "content": "hi"}], SamplingParams(),
                                             max_tokens=8, cancel=flag)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("flag_kind", ["listens", "polled"])
def test_a_cancel_during_a_silent_prefill_stops_the_remote_request(silent_server, monkeypatch, flag_kind):
    url, reached = silent_server
    if flag_kind == "listens":
        # No polling to fall back on: only the flag telling the backend can stop it in time.
        monkeypatch.setattr(remote, "CANCEL_POLL", 3600.0)
        flag = CancelFlag()
    else:
        flag = threading.Event()  # says nothing when set: polled every CANCEL_POLL
    backend = RemoteBackend()
    backend.load(url, LoadOptions(extra={"model": "quiet", "alias": "quiet"}))
    t, out = _chat_in_thread(backend, flag)
    assert reached.wait(30), "the request did not reach the server"
    flag.set()
    t.join(20)
    assert not t.is_alive(), "the cancel was not seen while the server was silent"
    backend.unload()
    assert out["result"].finish_reason == "cancelled"


@pytest.fixture
def fast_server():
    """A real OpenAI-shaped server on loopback streaming ``PIECES`` pieces a millisecond apart
    (a GPU server's pace), one SSE event each, then usage and [DONE]."""
    ready, stopping = threading.Event(), threading.Event()
    holder: dict = {"port": free_port()}

    async def models(_request):
        return web.json_response({"object": "list", "data": [{"id": "fast", "object": "model"}]})

    async def chat(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(PIECES):
            if stopping.is_set():
                break
            chunk = {"choices": [{"index": 0, "delta": {"content": f"p{i} "}, "finish_reason": None}]}
            try:
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            except ConnectionError:
                return resp
            await asyncio.sleep(0.001)
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}],
               "usage": {"prompt_tokens": 3, "completion_tokens": PIECES, "total_tokens": PIECES + 3}}
        await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    def serve():
        loop = asyncio.new_event_loop()
        app = web.Application()
        app.add_routes([web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", holder["port"]).start())
        holder["loop"] = loop
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield f"http://127.0.0.1:{holder['port']}/v1"
    stopping.set()
    holder["loop"].call_soon_threadsafe(holder["loop"].stop)
    thread.join(30)


PIECES = 400


def _loaded(url: str) -> RemoteBackend:
    backend = RemoteBackend()
    backend.load(url, LoadOptions(extra={"model": "fast", "alias": "fast"}))
    return backend


def test_a_fast_stream_is_read_in_gulps_whole_and_in_order(fast_server, monkeypatch):
    reads = []
    feed = remote_stream.SSEDecoder.feed
    monkeypatch.setattr(remote_stream.SSEDecoder, "feed", lambda self, chunk: reads.append(len(chunk)) or
                        feed(self, chunk))
    backend = _loaded(fast_server)
    try:
        pieces: list[str] = []
        result = remote_chat.generate(backend, [{"role": "user", "content": "go"}], SamplingParams(),
                                      max_tokens=PIECES, on_text=pieces.append, cancel=CancelFlag())
    finally:
        backend.unload()
    assert result.text == "".join(f"p{i} " for i in range(PIECES))
    assert result.stats.completion_tokens == PIECES and result.finish_reason == "length"
    # A piece a millisecond, read every READ_GATHER_S (20 ms): a few dozen reads, not hundreds.
    assert len(reads) < PIECES / 3, f"{len(reads)} reads for {PIECES} pieces"


def test_a_cancel_while_a_fast_stream_is_gathered_stops_it(fast_server):
    backend = _loaded(fast_server)
    flag = CancelFlag()
    got: list[str] = []

    def take(text: str) -> None:
        got.append(text)
        if len(got) == 50:
            threading.Thread(target=flag.set).start()  # from another thread, as a client's cancel comes

    try:
        result = remote_chat.generate(backend, [{"role": "user", "content": "go"}], SamplingParams(),
                                      max_tokens=PIECES, on_text=take, cancel=flag)
    finally:
        backend.unload()
    assert result.finish_reason == "cancelled"
    assert 50 <= len(got) < PIECES
    assert result.text == "".join(f"p{i} " for i in range(len(got)))
