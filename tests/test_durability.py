"""Durability: kill -9 the daemon at seeded random moments while it generates and
writes sessions, restart it, and check that nothing acknowledged was lost.

Acknowledged means: a user message whose chat got at least one delta or its
reply (the message is stored before generation starts), a reply that reached
the client (stored before the response is sent), and a ``sessions.create``
that was answered. After every kill the database passes ``PRAGMA
integrity_check`` and the restarted daemon serves everything acknowledged so
far, over the real socket. Chats are short (a few tokens) so the whole run
stays within a minute or two on a small machine.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from assistant.client import Client

pytestmark = pytest.mark.slow

SEED = 1414
KILLS = 12


@dataclass
class Acked:
    """What the daemon acknowledged, by session id."""

    prompts: dict[str, str] = field(default_factory=dict)  # chat session -> its user message
    replies: dict[str, str] = field(default_factory=dict)  # chat session -> the reply's text
    created: dict[str, str] = field(default_factory=dict)  # created session -> its title


async def chat_loop(client: Client, round_: int, rng: random.Random, acked: Acked, generating: asyncio.Event) -> None:
    """One short chat after another, each in its own session, until the daemon dies."""
    for k in range(10_000):
        sid, prompt = f"chat-{round_}-{k}", f"Round {round_}, question {k}: name a colour."
        try:
            stream = await client.chat(prompt=prompt, session=sid, max_tokens=rng.randint(4, 16),
                                       temperature=0.0, seed=1)
            async for _ in stream:
                acked.prompts[sid] = prompt  # a delta: the user's message is on disk
                generating.set()
            reply = await stream.result()
        except ConnectionError:  # the kill; any other error fails the test
            return
        acked.prompts[sid] = prompt
        acked.replies[sid] = reply["text"]


async def create_loop(client: Client, round_: int, acked: Acked) -> None:
    """sessions.create after sessions.create, until the daemon dies."""
    for i in range(1_000_000):
        sid, title = f"made-{round_}-{i}", f"title {round_}.{i}"
        try:
            await client.call("sessions.create", {"id": sid, "title": title})
        except ConnectionError:
            return
        acked.created[sid] = title


async def kill_at_random(d, rng: random.Random, generating: asyncio.Event, work: list[asyncio.Task]) -> str:
    """Kill -9 the daemon: mostly while a reply is generated, sometimes earlier
    (loading, prompt processing, session writes only). Returns when, for messages."""
    if rng.random() < 0.7:
        waiting = asyncio.ensure_future(generating.wait())
        await asyncio.wait([waiting, *work], timeout=120, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        for t in work:
            if t.done():
                t.result()  # a loop that ended before the kill: its error, or "ended early"
                raise AssertionError("a client loop ended before the daemon was killed")
        assert generating.is_set(), "no reply was generated within 120 s"
        delay = rng.uniform(0.0, 0.6)
        when = f"{delay:.2f} s into generation"
    else:
        delay = rng.uniform(0.05, 0.8)
        when = f"{delay:.2f} s after the clients started"
    await asyncio.sleep(delay)
    d.kill9()
    return when


def integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


async def check_all_present(client: Client, acked: Acked, context: str) -> None:
    """Every acknowledged session and message, served by the restarted daemon."""
    listed = {s["id"]: s for s in (await client.call("sessions.list", {"limit": 1_000_000}))["sessions"]}
    missing = [sid for sid in acked.created if sid not in listed]
    assert not missing, f"{context}: acknowledged sessions.create lost: {missing[:5]}"
    wrong = [sid for sid, title in acked.created.items() if listed[sid]["title"] != title]
    assert not wrong, f"{context}: sessions with a wrong title: {wrong[:5]}"
    for sid, prompt in acked.prompts.items():
        messages = (await client.call("sessions.get", {"id": sid}))["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        assert users == [prompt], f"{context}: session {sid}: user messages {users}, acknowledged {prompt!r}"
        if sid in acked.replies:
            replies = [m["content"] for m in messages if m["role"] == "assistant"]
            assert replies == [acked.replies[sid]], f"{context}: session {sid}: replies {replies}"


async def test_acknowledged_writes_survive_kill9_at_random_moments(daemon_factory):
    rng = random.Random(SEED)
    acked = Acked()
    socket_path = None
    db = None
    for round_ in range(KILLS + 1):
        d = daemon_factory(socket_path=socket_path).start()
        socket_path = d.socket
        context = f"seed {SEED}, after kill {round_}"
        async with await Client.connect(d.socket, client_name="durability-check") as check:
            if db is None:
                db = Path((await check.call("status"))["database"])
            await check_all_present(check, acked, context)
        if round_ == KILLS:
            d.stop()
            assert "Traceback" not in d.stderr(), d.stderr()[-3000:]
            break
        generating = asyncio.Event()
        chatter = await Client.connect(d.socket, client_name="durability-chat")
        writer = await Client.connect(d.socket, client_name="durability-writes")
        # Its own generator per round, so the kill moments do not depend on how many chats ran.
        work = [asyncio.ensure_future(chat_loop(chatter, round_, random.Random(SEED + round_), acked, generating)),
                asyncio.ensure_future(create_loop(writer, round_, acked))]
        try:
            when = await kill_at_random(d, rng, generating, work)
            await asyncio.wait_for(asyncio.gather(*work), 30)  # the loops end once the connection drops
        finally:
            for t in work:
                t.cancel()
            await chatter.close()
            await writer.close()
        d.stop()  # closes its log; the process is already gone
        assert "Traceback" not in d.stderr(), d.stderr()[-3000:]
        assert integrity(db) == "ok", f"seed {SEED}, kill {round_ + 1} ({when}): integrity_check failed"
    # The kills landed where they should: replies were generated and sessions written across the rounds.
    assert len(acked.prompts) >= KILLS // 2 and acked.replies and len(acked.created) >= KILLS, \
        (len(acked.prompts), len(acked.replies), len(acked.created))
