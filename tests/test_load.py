"""Load: 32 concurrent clients with short chats and status calls, and one client
that sends a long chat and never reads, against a real daemon with SmolLM2.

Checked on the wire (raw connections, not the client library, so that nothing
is matched up for us): every request gets exactly one response, with its own
id; every ``chat.delta`` a client sees carries the id of one of its own chats;
the deltas add up to the reply; the clients that sent one prompt all get the
same greedy reply, and the prompts' replies differ (no text crossed between
clients). The never-reading client's chat is
cancelled by the daemon's send-stall bound (docs/protocol.md, Flow control),
long before it could finish, and the daemon says why in its log.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest

from conftest import TEST_CONFIG
from test_server import Wire, status_frame

pytestmark = pytest.mark.slow

CLIENTS = 32
STATUS_CALLS = 3  # per client, beside its chat
PROMPTS = ["Name a color.", "Name an animal.", "Name a fruit.", "Name a city."]
SHORT = {"max_tokens": 6, "temperature": 0.0, "seed": 1}


def prompt_of(n: int) -> str:
    """Neighbours share a prompt: the model's queue serves them one after the other, and the
    prompt is already in its KV cache (the load is on the daemon, not on the model)."""
    return PROMPTS[n * len(PROMPTS) // CLIENTS]
# The never-reader's chat: far longer than the stall bound lets it run, even on a
# fast machine (hence the daemon's larger context).
LONG_TOKENS = 7000
CONTEXT = 8192


async def one_client(path, n: int, prompt: str) -> dict[str, Any]:
    """A client's chat and status calls, pipelined; its replies checked on the wire."""
    wire = await Wire.open(path)
    chat_id = f"chat-{n}"
    sent = {chat_id, *(f"status-{n}-{k}" for k in range(STATUS_CALLS))}
    wire.send({"jsonrpc": "2.0", "id": chat_id, "method": "chat", "params": {"prompt": prompt, **SHORT}})
    for k in range(STATUS_CALLS):
        wire.send(status_frame(f"status-{n}-{k}"))
    answers: dict[str, dict] = {}
    deltas: list[str] = []
    try:
        while len(answers) < len(sent):
            msg = await wire.recv(timeout=120)
            if msg.get("method") == "chat.delta":
                assert msg["params"]["id"] == chat_id, f"client {n} got another's delta: {msg}"
                deltas.append(msg["params"]["text"])
                continue
            assert "method" not in msg, msg
            rid = msg["id"]
            assert rid in sent and rid not in answers, f"client {n}: unexpected or repeated response {msg}"
            assert "result" in msg, msg
            answers[rid] = msg["result"]
    finally:
        await wire.close()
    reply = answers[chat_id]
    assert "".join(deltas) == reply["text"], f"client {n}: the deltas do not add up to the reply"
    return reply


def never_reader(path) -> socket.socket:
    """A client that initializes, sends a long chat, and once its reply streams never reads
    again (waiting for the first delta puts its chat ahead of the others in the model's
    queue: they wait for it until the daemon cuts it off)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    s.settimeout(60)
    s.sendall(b'{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"client":"never-reads"}}\n')
    got = b""
    while b"\n" not in got:
        got += s.recv(65536)
    assert json.loads(got.split(b"\n")[0])["id"] == 0
    chat = {"prompt": "Tell me a very long story.", "session": "never-reads", "max_tokens": LONG_TOKENS,
            "ignore_eos": True, "temperature": 0.0}
    s.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "chat", "params": chat}).encode() + b"\n")
    got = b""
    while b"chat.delta" not in got:
        chunk = s.recv(1)  # byte by byte: nothing past the first delta is read
        assert chunk, "the daemon closed the connection"
        got += chunk
    return s


async def finished_chat_of(watcher: Wire, session: str, timeout_steps: int = 1200) -> dict:
    """The ``chat.finished`` event of ``session`` (bounded: 120 s)."""
    for _ in range(timeout_steps):
        try:
            msg = await watcher.recv(timeout=0.1)
        except asyncio.TimeoutError:
            continue
        if msg.get("method") == "event" and msg["params"]["type"] == "chat.finished" \
                and msg["params"]["data"].get("session") == session:
            return msg["params"]["data"]
    raise AssertionError(f"no chat.finished for {session}")


def drained_to_the_end(s: socket.socket) -> bool:
    """Whether the daemon closed the never-reader's connection: reading it ends."""
    s.settimeout(30)
    try:
        while s.recv(1 << 20):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        return False
    return True


async def test_32_clients_get_their_own_replies_and_a_client_that_never_reads_is_cut_off(daemon_factory):
    daemon = daemon_factory(config_text=TEST_CONFIG.replace("context: 2048", f"context: {CONTEXT}")).start()
    watcher = await Wire.open(daemon.socket)
    watcher.send({"jsonrpc": "2.0", "id": "sub", "method": "events.subscribe",
                  "params": {"types": ["chat.finished"], "backlog": 0}})
    assert (await watcher.reply())["id"] == "sub"
    sleeper = never_reader(daemon.socket)
    try:
        replies = await asyncio.gather(*(one_client(daemon.socket, n, prompt_of(n)) for n in range(CLIENTS)))
        texts: dict[str, set[str]] = {}
        for n, reply in enumerate(replies):
            texts.setdefault(prompt_of(n), set()).add(reply["text"])
        assert all(len(t) == 1 for t in texts.values()), f"one prompt, several replies: {texts}"
        assert len({t for group in texts.values() for t in group}) > 1, texts
        cut = await finished_chat_of(watcher, "never-reads")
        assert cut["finish_reason"] == "cancelled"
        assert cut["completion_tokens"] < LONG_TOKENS
        assert drained_to_the_end(sleeper), "the daemon kept the never-reading client connected"
    finally:
        sleeper.close()
        await watcher.close()
    log = daemon.stderr()
    assert "never-reads) has not read its replies" in log, log[-3000:]
    assert "Traceback" not in log
    async with await daemon.client() as c:
        st = await c.call("status")
    assert st["pid"] == daemon.proc.pid
