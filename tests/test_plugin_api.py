"""The plugin API (assistant.plugin_api.PluginContext) as a third-party author
meets it: a single-file plugin written only against the documented context,
in a real daemon with the real SmolLM2 model and the real filewatch plugin;
then the context's storage rules on a real store, and the error a plugin
written to the old ``daemon`` signature gets."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import stat
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from assistant.daemon.store import Store, StoreError
from assistant.plugin_api import PluginContext, PluginServices
from assistant.plugin_host import PluginHost
from assistant.protocol import ErrorCode, RPCError
from test_tools import PLUGIN as SCRIPTED_BACKEND  # noqa: E402  (tests/ is on sys.path under pytest)

# Uses nothing but what docs/plugins.md documents: hooks taking `context`,
# and the context's members.
PROBE = '''
from assistant import hookimpl

MIGRATIONS = [
    "CREATE TABLE probe_notes (id INTEGER PRIMARY KEY, text TEXT NOT NULL)",
    ["ALTER TABLE probe_notes ADD COLUMN source TEXT",
     "CREATE INDEX probe_notes_source ON probe_notes(source)"],
]


def add_note(conn, text, source):
    return conn.execute("INSERT INTO probe_notes (text, source) VALUES (?, ?)", (text, source)).lastrowid


def all_notes(conn):
    return [list(row) for row in conn.execute("SELECT id, text, source FROM probe_notes ORDER BY id")]


@hookimpl
async def startup(context, settings):
    ran = await context.migrate(MIGRATIONS)
    starts = await context.state.get("starts", 0) + 1
    await context.state.set("starts", starts)
    (context.data_dir / "starts.txt").write_text(str(starts))
    context.log.info("probe up, start %d", starts)
    context.emit("probe.started", {"starts": starts, "migrations_ran": ran, "greeting": settings.get("greeting")})


@hookimpl
def register_skills(register, context):
    async def note(text, source="client"):
        note_id = await context.db(add_note, text, source)
        context.emit("probe.noted", {"id": note_id, "text": text, "source": source})
        return {"id": note_id}

    async def report():
        return {"name": context.name, "settings": context.settings, "starts": await context.state.get("starts"),
                "keys": await context.state.keys(), "notes": await context.db(all_notes),
                "data_file": (context.data_dir / "starts.txt").read_text(),
                "members": sorted(m for m in dir(context) if not m.startswith("_"))}

    async def ask(question):
        reply = await context.chat(question, max_tokens=8, temperature=0)
        return {"text": reply["text"], "finish_reason": reply["finish_reason"],
                "completion_tokens": reply["stats"]["completion_tokens"]}

    async def relay(skill, args):
        return await context.call_skill(skill, args)

    text = {"type": "string"}
    register("probe.note", note, parameters={"type": "object", "properties": {"text": text, "source": text},
                                             "required": ["text"]})
    register("probe.report", report)
    register("probe.ask", ask, parameters={"type": "object", "properties": {"question": text},
                                           "required": ["question"]})
    register("probe.relay", relay, parameters={"type": "object", "properties": {
        "skill": text, "args": {"type": "object"}}, "required": ["skill", "args"]})
'''

OLD_STARTUP = '''
from assistant import hookimpl

@hookimpl
def startup(daemon, settings):
    daemon.emit("never", {}, source="old")
'''

OLD_ON_EVENT = '''
from assistant import hookimpl

@hookimpl
async def on_event(event, daemon):
    pass
'''

# What docs/plugins.md lists as the context's public members.
DOCUMENTED_MEMBERS = ["aclose", "call_skill", "chat", "data_dir", "db", "emit", "log", "migrate", "name", "settings",
                      "state"]


def write_plugin(folder: Path, name: str, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


class Events:
    """The events a subscribed client receives."""

    def __init__(self, client):
        self.queue: asyncio.Queue = asyncio.Queue()
        client.on_notification = lambda method, params: method == "event" and self.queue.put_nowait(params)

    async def next(self, type_: str, timeout: float = 60, **data: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await asyncio.wait_for(self.queue.get(), max(0.1, deadline - time.monotonic()))
            if event["type"] == type_ and all(event["data"].get(k) == v for k, v in data.items()):
                return event


async def call_skill(client, name: str, **arguments: Any) -> Any:
    return (await client.call("skills.call", {"name": name, "arguments": arguments}))["result"]


async def runs_of(client, rule_id: str, timeout: float = 60) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = (await client.call("automations.log", {"id": rule_id}))["runs"]
        if runs and all(r["status"] != "running" for r in runs):
            return runs
        await asyncio.sleep(0.2)
    raise AssertionError(f"rule {rule_id} did not run")


@pytest.mark.slow
async def test_third_party_plugin_through_its_context_only(assistant_daemon_factory, tmp_path):
    probe = write_plugin(tmp_path / "src", "probe", PROBE)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rule = {"id": "to-probe", "trigger": {"paths": [str(inbox)], "globs": ["*.txt"], "debounce": 0.2},
            "actions": [{"skill": "probe.note", "arguments": {"text": "{name}", "source": "filewatch"}}]}
    config = {"context": 2048, "plugins": {"probe": {"greeting": "hej"}, "filewatch": {"rules": [rule]}}}

    first = assistant_daemon_factory(plugin_files=[probe], config=config)
    async with await first.client() as c:
        events = Events(c)
        sub = await c.call("events.subscribe", {"types": ["probe.*", "daemon.started"]})
        started = [e for e in sub["recent"] if e["type"] == "probe.started"]
        started = started[0] if started else await events.next("probe.started")
        assert started["source"] == "probe"
        assert started["data"] == {"starts": 1, "migrations_ran": [1, 2], "greeting": "hej"}
        if not any(e["type"] == "daemon.started" for e in sub["recent"]):
            await events.next("daemon.started")  # every startup hook (filewatch's too) has returned

        # A skill that writes the plugin's own table and emits an event a client receives.
        assert await call_skill(c, "probe.note", text="by hand") == {"id": 1}
        noted = await events.next("probe.noted")
        assert noted["source"] == "probe" and noted["data"] == {"id": 1, "text": "by hand", "source": "client"}

        # Called from an automation: a real file write, filewatch's rule, the plugin's skill.
        await asyncio.sleep(1.0)  # the watcher arms after startup
        (inbox / "dropped.txt").write_text("hello")
        by_rule = await events.next("probe.noted", source="filewatch")
        assert by_rule["data"]["text"] == "dropped.txt"
        (run,) = await runs_of(c, "to-probe")
        assert run["status"] == "ok" and run["actions"][0]["output"] == {"id": by_rule["data"]["id"]}

        # Asks the model (the real SmolLM2) from inside a skill, through its context.
        answer = await call_skill(c, "probe.ask", question="Say hello.")
        assert answer["text"].strip() and answer["completion_tokens"] >= 1
        assert answer["finish_reason"] in ("stop", "length")

        # Calls another skill; errors come back as RPCError, as documented.
        assert await call_skill(c, "probe.relay", skill="probe.note", args={"text": "relayed"}) == {"id": 3}
        with pytest.raises(RPCError) as missing:
            await call_skill(c, "probe.relay", skill="no.such.skill", args={})
        assert missing.value.code == ErrorCode.SKILL_NOT_FOUND and "no skill 'no.such.skill'" in missing.value.message

        report = await call_skill(c, "probe.report")
    assert report["members"] == DOCUMENTED_MEMBERS  # the context is the contract: no daemon in sight
    assert report["name"] == "probe" and report["settings"] == {"greeting": "hej"}
    assert report["starts"] == 1 and report["keys"] == ["starts"] and report["data_file"] == "1"
    assert report["notes"] == [[1, "by hand", "client"], [2, "dropped.txt", "filewatch"], [3, "relayed", "client"]]
    first.stop()

    # A restart: the state, the table and its rows, and the data dir are all still there;
    # the migrations do not run again.
    second = assistant_daemon_factory(plugin_files=[probe], config=config)
    async with await second.client() as c:
        events = Events(c)
        sub = await c.call("events.subscribe", {"types": ["probe.*"]})
        started = [e for e in sub["recent"] if e["type"] == "probe.started"]
        started = started[0] if started else await events.next("probe.started")
        assert started["data"]["starts"] == 2 and started["data"]["migrations_ran"] == []
        report = await call_skill(c, "probe.report")
    assert report["starts"] == 2 and report["data_file"] == "2"
    assert [n[1] for n in report["notes"]] == ["by hand", "dropped.txt", "relayed"]


ASKER = '''
import asyncio
from assistant import hookimpl

@hookimpl
def register_skills(register, context):
    async def ask(question):
        with_tools = await context.chat(question, temperature=0, backend="scripted", tools=True)
        plain = await context.chat(messages=[{"role": "user", "content": question}], backend="scripted")
        return {"text": with_tools["text"], "tool_calls": with_tools.get("tool_calls"), "plain": plain["text"]}

    async def give_up(question):
        reply = asyncio.ensure_future(context.chat(question, backend="scripted", max_tokens=1000000, ignore_eos=True))
        await asyncio.sleep(0.3)
        reply.cancel()
        try:
            await reply
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    question = {"type": "object", "properties": {"question": {"type": "string"}}, "required": ["question"]}
    register("asker.ask", ask, parameters=question)
    register("asker.give_up", give_up, parameters=question)
'''


async def test_chat_through_the_context_takes_chat_params_and_stops_when_cancelled(assistant_daemon_factory,
                                                                                     tmp_path):
    # A scripted model (tests/test_tools.py's backend plugin) makes the replies exact.
    files = [write_plugin(tmp_path, "scripted", SCRIPTED_BACKEND), write_plugin(tmp_path, "asker", ASKER)]
    model = tmp_path / "model.bin"
    model.write_bytes(b"scripted")
    d = assistant_daemon_factory(plugin_files=files, plugins=["scripted", "asker"],
                                 config={"model": "script", "models": {"script": {"path": str(model)}}})
    async with await d.client() as c:
        reply = await call_skill(c, "asker.ask", question="What is 2 + 3?")
        # tools=True: the model's tool call ran a skill, inside a chat a skill started.
        assert reply["tool_calls"] == [{"name": "calc.add", "result": 5}]
        assert reply["text"].endswith('The answer is {"name": "calc.add", "result": 5}')
        assert reply["plain"].startswith("<tool_call>")
        assert await call_skill(c, "asker.give_up", question="Go on forever.") == "cancelled"
        # The skill returns as soon as it has sent the cancel; the daemon answers the
        # cancelled chat within a decode step, so wait (bounded) for it to be counted.
        for _ in range(100):
            status = await c.call("status")
            if status["models"][0]["requests_done"] == 3:
                break
            await asyncio.sleep(0.1)
    (model_status,) = status["models"]
    # Cancelling the plugin's await stopped the reply on the daemon, too; the
    # plugin's three chats shared one connection (the test's client is the other).
    assert model_status["requests_done"] == 3 and model_status["last_request"]["finish_reason"] == "cancelled"
    assert status["connections"] == 2


async def test_old_daemon_signature_is_listed_failed_naming_the_new_one(assistant_daemon_factory, tmp_path):
    src = tmp_path / "src"
    files = [write_plugin(src, "old_startup", OLD_STARTUP), write_plugin(src, "old_event", OLD_ON_EVENT),
             write_plugin(src, "probe", PROBE)]
    d = assistant_daemon_factory(plugin_files=files, plugins=["old_startup", "old_event", "probe"])
    async with await d.client() as c:
        plugins = {p["name"]: p for p in (await c.call("plugins.list"))["plugins"]}
        assert await call_skill(c, "probe.note", text="fine") == {"id": 1}  # the others go on
    assert plugins["old_startup"]["status"] == "failed"
    assert plugins["old_startup"]["error"] == (
        "hook startup(daemon, settings) takes a `daemon` argument; since 0.2 hooks get a PluginContext: "
        "write startup(context, settings) (see docs/plugins.md)")
    assert plugins["old_event"]["status"] == "failed"
    assert "write on_event(event, context)" in plugins["old_event"]["error"]
    assert plugins["probe"]["status"] == "loaded"


# -- the context on a real store (what the daemon provides, in this process) ------------------------


class StoreServices:
    """The services the daemon gives contexts, minus the socket: a real Store on
    a thread of its own, as the daemon runs it; events are kept in a list."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.socket_path = db_path.parent / "no-daemon.sock"
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.store = Store(db_path)
        self.events: list[dict[str, Any]] = []

    @property
    def data_dir(self) -> Path:
        return self.db_path.parent

    def emit(self, type_: str, data: dict[str, Any] | None = None, *, source: str) -> dict[str, Any]:
        event = {"type": type_, "time": time.time(), "source": source, "data": data or {}}
        self.events.append(event)
        return event

    async def call_skill(self, name: str, arguments: dict[str, Any]) -> Any:
        raise RPCError(ErrorCode.SKILL_NOT_FOUND, f"no skill {name!r}")

    async def db(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, lambda: fn(*args, **kwargs))

    def close(self) -> None:
        self._thread.shutdown()
        self.store.close()


@pytest.fixture
def services(tmp_path):
    s = StoreServices(tmp_path / "data" / "assistant.db")
    yield s
    s.close()


async def test_state_is_per_plugin_json_and_persistent(services, tmp_path):
    assert isinstance(services, PluginServices)
    a, b = PluginContext("a", {}, services), PluginContext("b", {}, services)
    await a.state.set("config", {"n": 1, "tags": ["x"], "ok": True})
    await a.state.set("runs:1", 1.5)
    await b.state.set("config", "b's")
    assert await a.state.get("config") == {"n": 1, "tags": ["x"], "ok": True}
    assert await b.state.get("config") == "b's" and await b.state.get("nope", 7) == 7
    assert await a.state.keys() == ["config", "runs:1"] and await a.state.keys("runs:") == ["runs:1"]
    assert await a.state.delete("runs:1") is True and await a.state.delete("runs:1") is False
    with pytest.raises(TypeError, match="'bad' is not JSON-serialisable"):
        await a.state.set("bad", object())
    with pytest.raises(TypeError, match="non-empty string"):
        await a.state.get("")
    services.close()
    again = StoreServices(services.db_path)
    try:
        assert await PluginContext("a", {}, again).state.get("config") == {"n": 1, "tags": ["x"], "ok": True}
    finally:
        again.close()


async def test_migrate_and_db(services):
    ctx = PluginContext("notes", {}, services)
    history = ["CREATE TABLE notes_items (id INTEGER PRIMARY KEY, body TEXT UNIQUE)"]
    assert await ctx.migrate(history) == [1]
    history.append(["ALTER TABLE notes_items ADD COLUMN seen INTEGER DEFAULT 0",
                    "INSERT INTO notes_items (body) VALUES ('seed')"])
    assert await ctx.migrate(history) == [2] and await ctx.migrate(history) == []

    def add(conn, body, *, seen=0):
        return conn.execute("INSERT INTO notes_items (body, seen) VALUES (?, ?)", (body, seen)).lastrowid

    assert await ctx.db(add, "second", seen=1) == 2
    with pytest.raises(sqlite3.IntegrityError):  # the plugin's own SQL errors, as they are
        await ctx.db(add, "second")
    with pytest.raises(sqlite3.DatabaseError, match="not authorized"):  # core tables are read-only to plugins
        await ctx.db(lambda conn: conn.execute("DELETE FROM messages"))
    rows = await ctx.db(lambda conn: conn.execute("SELECT body, seen FROM notes_items ORDER BY id").fetchall())
    assert rows == [("seed", 0), ("second", 1)]
    with pytest.raises(StoreError, match="plugin 'notes': migration 3 failed"):
        await ctx.migrate(history + ["CREATE TABLE notes_items (id)"])
    with pytest.raises(TypeError, match="SQL statements"):
        await ctx.migrate([42])


async def test_emit_data_dir_and_settings(services):
    ctx = PluginContext("weather", {"units": "metric"}, services)
    event = ctx.emit("weather.updated", {"t": 3})
    assert event["source"] == "weather" and services.events == [event]
    assert ctx.settings == {"units": "metric"} and ctx.log.name == "assistant.plugin.weather"
    folder = ctx.data_dir
    assert folder == services.data_dir / "plugins" / "weather" and folder.is_dir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(folder.parent.stat().st_mode) == 0o700
    assert PluginContext("other", {}, services).data_dir != folder
    with pytest.raises(RPCError) as unknown:
        await ctx.call_skill("nope", {})
    assert unknown.value.code == ErrorCode.SKILL_NOT_FOUND
    with pytest.raises(TypeError, match="exactly one"):
        await ctx.chat()
    with pytest.raises(TypeError, match="exactly one"):
        await ctx.chat("hi", messages=[{"role": "user", "content": "hi"}])


async def test_an_unbound_context_says_there_is_no_daemon():
    ctx = PluginContext("lonely", {}, None)
    with pytest.raises(RuntimeError, match="no daemon behind this context"):
        ctx.emit("x.y")
    with pytest.raises(RuntimeError, match="no daemon"):
        await ctx.state.get("k")


async def test_host_gives_each_plugin_one_context_in_every_hook(services, tmp_path):
    src = tmp_path / "p"
    write_plugin(src, "keeper", '''
        from assistant import hookimpl

        SEEN = []

        @hookimpl
        def register_skills(register, context):
            SEEN.append(("register_skills", context))

        @hookimpl
        async def startup(context, settings):
            SEEN.append(("startup", context))
            await context.state.set("up", True)

        @hookimpl
        def on_event(event, context):  # sync: runs in a thread
            SEEN.append(("on_event", context))
            context.emit("keeper.saw", {"type": event["type"]})

        @hookimpl
        async def shutdown(context):
            SEEN.append(("shutdown", context))
    ''')
    write_plugin(src, "old", OLD_STARTUP)
    host = PluginHost(dirs=[src], settings={"keeper": {"k": 1}}).load()
    host.bind(services)
    host.collect()
    await host.acall("startup")
    await host.acall("on_event", event={"type": "demo", "time": 0, "source": "test", "data": {}})
    await host.acall("shutdown")
    import sys

    seen = sys.modules["assistant_plugin_keeper"].SEEN
    assert [hook for hook, _ in seen] == ["register_skills", "startup", "on_event", "shutdown"]
    contexts = {id(ctx) for _, ctx in seen}
    assert len(contexts) == 1 and seen[0][1] is host.context("keeper")
    assert seen[0][1].name == "keeper" and seen[0][1].settings == {"k": 1}
    assert services.events[-1]["source"] == "keeper" and services.events[-1]["data"] == {"type": "demo"}
    assert await host.context("keeper").state.get("up") is True
    assert host.records["old"].status == "failed" and "write startup(context, settings)" in host.records["old"].error
    assert json.dumps(host.list())  # still JSON for `plugins list`
