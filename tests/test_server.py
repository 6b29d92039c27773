"""Unit tests of the server's helpers that need no daemon."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from assistant.daemon.server import TextStream


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
