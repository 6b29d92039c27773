"""The TUI driven by Textual's Pilot against a real daemon (real SmolLM2 weights
where a reply is needed): streaming, cancel, sessions, settings, plugins,
attachments, key bindings from config, reconnecting, and every bad input shown
as a message rather than a traceback."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from assistant.client import Client
from assistant.protocol import PROTOCOL_VERSION
from assistant.testing import run_cli, short_socket_path
from assistant.tui import connection
from assistant.tui.app import AssistantApp
from assistant.tui.screens.attach_flow import attach_path
from assistant.tui.screens.dialogs import ConfirmDialog, InputDialog
from assistant.tui.screens.help import HelpScreen
from assistant.tui.screens.plugins import PluginsScreen
from assistant.tui.screens.reply_flow import chat_params
from assistant.tui.screens.settings import SettingsScreen
from assistant.tui.widgets.activity import ActivityPanel
from assistant.tui.widgets.chat import ChatInput, ChatView, MessageView
from assistant.tui.widgets.sidebar import SessionSidebar
from assistant.tui.widgets.status import StatusBar
from conftest import TEST_CONFIG

pytestmark = pytest.mark.slow

GREEDY = TEST_CONFIG + "generation:\n  temperature: 0\n"
NO_MODEL = "threads: 2\ncontext: 2048\npreload: false\n"
QUESTION = "Tell me the capital of France."
SIZE = (120, 40)
# Replies need the real model; on a busy 2-core machine a first reply can take a while.
REPLY = 240.0


def tui(daemon, **kwargs: Any) -> AssistantApp:
    kwargs.setdefault("start", False)
    return AssistantApp(socket=str(daemon.socket), config_path=str(daemon.config), **kwargs)


async def until(pilot, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def connected(pilot) -> None:
    app = pilot.app
    await until(pilot, lambda: app.connected_once is not None and app.connected_once.is_set(), "the TUI to connect")
    await pilot.pause()


def status_text(app) -> str:
    return app.query_one(StatusBar).render_text().plain


def notifications(app) -> str:
    return "\n".join(str(n.message) for n in app._notifications)


async def type_and_send(pilot, text: str) -> None:
    pilot.app.query_one(ChatInput).focus()
    await pilot.press(*text)
    await pilot.press("enter")


async def session_data(daemon, sid: str) -> dict[str, Any]:
    async with await daemon.client() as c:
        return await c.call("sessions.get", {"id": sid})


# -- chat ------------------------------------------------------------------------------------


async def test_question_streams_answer_and_fills_the_footer(daemon_factory, monkeypatch):
    daemon = daemon_factory(config_text=GREEDY).start()
    writes: list[str] = []
    original = MessageView.write

    async def counting_write(self, delta):
        writes.append(delta)
        await original(self, delta)

    monkeypatch.setattr(MessageView, "write", counting_write)
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        assert status_text(app).startswith("● connected")
        await type_and_send(pilot, QUESTION)
        await until(pilot, lambda: not app.chat_screen.busy and app.query_one(ChatView).last("assistant") is not None,
                    "the reply", REPLY)
        reply = app.query_one(ChatView).last("assistant")
        assert "Paris" in reply.text
        # The daemon sends the first piece at once and joins later ones arriving
        # within 20 ms (server.TextStream): a short reply comes in 2+ writes.
        assert len(writes) >= 2, "the answer should arrive as a stream of deltas"
        assert "".join(writes) == reply.text
        md = reply.query_one("Markdown")
        assert "Paris" in md.source
        status = status_text(app)
        for part in ("smollm2-135m", "llama.cpp", "tok/s", "TTFT", "ctx "):
            assert part in status, (part, status)
        assert app.chat_screen.last_stats["completion_tokens"] > 0
        # The message is persisted in the daemon's session, and the session got a title.
        data = await session_data(daemon, app.chat_screen.session["id"])
        assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
        assert data["messages"][1]["content"] == reply.text
        assert data["title"] == QUESTION
        assert reply.message_id == data["messages"][1]["id"]
        # The input is empty again and remembers the question (Up recalls it).
        chat_input = app.query_one(ChatInput)
        assert chat_input.text == ""
        await pilot.press("up")
        assert chat_input.text == QUESTION


async def test_escape_cancels_the_reply(daemon_factory):
    daemon = daemon_factory(config_text=GREEDY).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        app.query_one(ChatInput).text = "Write a very long story about a dragon who learns to fly over the sea."
        await pilot.press("enter")
        await until(pilot, lambda: (v := app.query_one(ChatView).last("assistant")) is not None and v.text,
                    "the first words of the reply", REPLY)
        await pilot.press("escape")
        await until(pilot, lambda: not app.chat_screen.busy, "the cancelled reply to end", REPLY)
        reply = app.query_one(ChatView).last("assistant")
        assert reply.note == "cancelled"
        assert reply.has_class("-cancelled")
        data = await session_data(daemon, app.chat_screen.session["id"])
        assert data["messages"][-1]["status"] == "cancelled"
        assert data["messages"][-1]["content"] == reply.text
        assert app.chat_screen.last_stats["completion_tokens"] < 512


async def test_newline_key_and_history(daemon_factory):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon, history_file=None)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        chat_input = app.query_one(ChatInput)
        chat_input.focus()
        await pilot.press("a", "ctrl+j", "b")
        assert chat_input.text == "a\nb"
        assert not app.chat_screen.busy  # ctrl+j did not send
        chat_input.input_history[:] = ["first", "second"]
        chat_input.text = ""
        await pilot.press("up")
        assert chat_input.text == "second"
        await pilot.press("up")
        assert chat_input.text == "first"
        await pilot.press("down")
        assert chat_input.text == "second"
        await pilot.press("down")
        assert chat_input.text == ""


async def test_regenerate_replaces_the_last_reply(daemon_factory):
    daemon = daemon_factory(config_text=GREEDY).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await type_and_send(pilot, QUESTION)
        await until(pilot, lambda: not app.chat_screen.busy and app.query_one(ChatView).last("assistant") is not None,
                    "reply", REPLY)
        first = app.query_one(ChatView).last("assistant").text
        await pilot.press("ctrl+r")
        await pilot.pause(0.2)
        await until(pilot, lambda: not app.chat_screen.busy, "the regenerated reply", REPLY)
        views = app.query_one(ChatView).messages()
        assert [v.role for v in views] == ["user", "assistant"]
        assert views[1].text == first  # greedy: the same answer again
        data = await session_data(daemon, app.chat_screen.session["id"])
        assert [m["role"] for m in data["messages"]] == ["user", "assistant"]


async def test_copy_uses_the_clipboard(daemon_factory):
    daemon = daemon_factory(config_text=GREEDY).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await type_and_send(pilot, QUESTION)
        await until(pilot, lambda: not app.chat_screen.busy and app.query_one(ChatView).last("assistant") is not None,
                    "reply", REPLY)
        await pilot.press("alt+c")
        assert app.clipboard == app.query_one(ChatView).last("assistant").text
        # A focused message is the one copied.
        app.query_one(ChatView).messages()[0].focus()
        await pilot.press("alt+c")
        assert app.clipboard == QUESTION


# -- sessions -----------------------------------------------------------------------------------


async def test_switch_session_from_the_sidebar(daemon_factory):
    daemon = daemon_factory(config_text=GREEDY).start()
    async with await daemon.client() as c:
        alpha = await c.call("sessions.create", {"title": "Alpha"})
        stream = await c.chat(prompt=QUESTION, session=alpha["id"])
        await stream.result()
        beta = await c.call("sessions.create", {"title": "Beta"})
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        assert app.chat_screen.session["id"] == beta["id"]  # the most recent
        assert app.query_one(ChatView).messages() == []
        sidebar = app.query_one(SessionSidebar)
        assert [s["title"] for s in sidebar.sessions] == ["Beta", "Alpha"]
        app.query_one("#session-list").focus()
        await pilot.press("down", "enter")
        await until(pilot, lambda: app.chat_screen.session["id"] == alpha["id"], "the switch to Alpha")
        await until(pilot, lambda: len(app.query_one(ChatView).messages()) == 2, "Alpha's messages")
        views = app.query_one(ChatView).messages()
        assert "Paris" in views[1].text
        assert app.chat_screen.sub_title == "Alpha"
        # The footer shows the figures of the session's last reply.
        assert "tok/s" in status_text(app) and "TTFT" in status_text(app)


async def test_new_rename_export_delete_session(daemon_factory, tmp_path):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon, cwd=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        first = app.chat_screen.session["id"]
        await pilot.press("ctrl+n")
        await until(pilot, lambda: app.chat_screen.session["id"] != first, "a new session")
        second = app.chat_screen.session["id"]
        assert len(app.chat_screen.sessions) == 2
        # rename
        await pilot.press("f2")
        await until(pilot, lambda: isinstance(app.screen, InputDialog), "the rename dialog")
        app.screen.query_one("Input").value = ""
        await pilot.press(*"Trip plans", "enter")
        await until(pilot, lambda: app.chat_screen.session.get("title") == "Trip plans", "the rename")
        assert (await session_data(daemon, second))["title"] == "Trip plans"
        assert app.query_one(SessionSidebar).sessions[0]["title"] == "Trip plans"
        # export: a missing folder is refused in the dialog, then a good path works
        await pilot.press("ctrl+s")
        await until(pilot, lambda: isinstance(app.screen, InputDialog), "the export dialog")
        assert app.screen.query_one("Input").value == str(tmp_path / "trip-plans.md")
        app.screen.query_one("Input").value = str(tmp_path / "missing" / "x.md")
        await pilot.press("enter")
        assert isinstance(app.screen, InputDialog)
        assert "does not exist" in str(app.screen.query_one("#dialog-error").render())
        app.screen.query_one("Input").value = str(tmp_path / "trip-plans.md")
        await pilot.press("enter")
        await until(pilot, lambda: (tmp_path / "trip-plans.md").exists(), "the exported file")
        assert (tmp_path / "trip-plans.md").read_text().startswith("# Trip plans")
        # delete (asks first)
        await pilot.press("f8")
        await until(pilot, lambda: isinstance(app.screen, ConfirmDialog), "the confirmation")
        await pilot.press("y")
        await until(pilot, lambda: app.chat_screen.session is not None and app.chat_screen.session["id"] == first,
                    "the delete")
        async with await daemon.client() as c:
            ids = [s["id"] for s in (await c.call("sessions.list"))["sessions"]]
        assert second not in ids and first in ids


async def test_settings_screen_saves_through_the_daemon(daemon_factory):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await pilot.press("f3")
        await until(pilot, lambda: isinstance(app.screen, SettingsScreen), "the settings screen")
        screen = app.screen
        screen.query_one("#system").text = "You answer in French."
        screen.query_one("#s-temperature").value = "hot"
        await pilot.click("#save")
        assert isinstance(app.screen, SettingsScreen), "a bad value must not be saved"
        assert "temperature: expected a number >= 0, got 'hot'" in str(screen.query_one("#settings-error").render())
        screen.query_one("#s-temperature").value = "0.3"
        screen.query_one("#s-max_tokens").value = "64"
        screen.query_one("#draft").value = "ngram"
        await pilot.press("ctrl+s")  # the screen's save key (a Button ignores a second click within 0.2 s)
        await until(pilot, lambda: not isinstance(app.screen, SettingsScreen), "the screen to close")
        await until(pilot, lambda: "Session settings saved." in notifications(app), "the save")
        data = await session_data(daemon, app.chat_screen.session["id"])
        assert data["system_prompt"] == "You answer in French."
        assert data["settings"] == {"temperature": 0.3, "max_tokens": 64, "draft": "ngram"}
        params = chat_params(app.chat_screen.session, "hi")
        assert params["temperature"] == 0.3 and params["max_tokens"] == 64 and params["draft"] == "ngram"


async def test_model_switch_from_the_command_palette(daemon_factory):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        assert "smollm2-135m" in app.model_names and "gemma3-270m" in app.model_names
        await pilot.press("ctrl+p")
        await pilot.pause(0.2)
        await pilot.press(*"Model: smollm2")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await until(pilot, lambda: app.loaded.get("smollm2-135m") == "llama.cpp", "the model to load", REPLY)
        assert (await session_data(daemon, app.chat_screen.session["id"]))["model"] == "smollm2-135m"
        assert "smollm2-135m · llama.cpp" in status_text(app)


# -- plugins, activity, attachments ----------------------------------------------------------------

VISION_PLUGIN = '''
from assistant import hookimpl

def describe(path, prompt=""):
    return "A small red square on a white background."

@hookimpl
def register_skills(register):
    register("vision.describe", describe, description="Describe an image.", parameters={
        "type": "object", "properties": {"path": {"type": "string"}, "prompt": {"type": "string"}},
        "required": ["path"]})
'''


async def test_plugins_screen_and_activity_panel(assistant_daemon_factory, tmp_path):
    plugin = tmp_path / "vision_stub.py"
    plugin.write_text(VISION_PLUGIN)
    daemon = assistant_daemon_factory(plugin_files=[plugin])
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await pilot.press("f4")
        await until(pilot, lambda: isinstance(app.screen, PluginsScreen), "the plugins screen")
        names = [p["name"] for p in app.screen.plugins]
        assert "core" in names and "vision_stub" in names
        assert app.screen.query_one("#plugins-table").row_count == len(names)
        assert "vision.describe" in [s["name"] for s in app.screen.skills]
        await pilot.press("escape")
        await until(pilot, lambda: not isinstance(app.screen, PluginsScreen), "the screen to close")
        # The activity panel shows the daemon's events live.
        panel = app.query_one(ActivityPanel)
        assert panel.has_class("-hidden")
        await pilot.press("ctrl+t")
        assert not panel.has_class("-hidden")
        before = panel.count
        async with await daemon.client() as c:
            await c.call("models.load", {"model": "smollm2-135m"})
        await until(pilot, lambda: panel.count > before, "the model.loaded event", REPLY)
        assert app.loaded.get("smollm2-135m") == "llama.cpp"


async def test_attachment_problems_are_clear_messages(daemon_factory, tmp_path):
    # (How an attached medium reaches the model, natively or by a fallback: tests/test_tui_media.py.)
    daemon = daemon_factory(config_text=NO_MODEL).start()
    song = tmp_path / "song.mp3"
    song.write_bytes(b"ID3" + b"\0" * 16)
    app = tui(daemon, cwd=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        # Attached: the daemon decides how it reads it (natively, a transcript, or a clear error).
        assert attach_path(app.chat_screen, str(song)) is None
        missing = tmp_path / "missing.png"
        assert attach_path(app.chat_screen, str(missing)) == f"No such file: {missing}"
        notes = tmp_path / "notes.txt"
        notes.write_text("hi")
        assert "not an image or audio file" in attach_path(app.chat_screen, str(notes))
        if os.geteuid() != 0:  # root reads everything
            locked = tmp_path / "locked.png"
            locked.write_bytes(b"x")
            locked.chmod(0)
            assert "permission denied" in attach_path(app.chat_screen, str(locked))
        assert [a.path.name for a in app.chat_screen.attachments] == ["song.mp3"]  # only the good one
        await pilot.pause()
        assert "No such file" in notifications(app)


# -- keys ---------------------------------------------------------------------------------------


async def test_bindings_from_config_and_help_screen(daemon_factory):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon, bindings={"new_session": "ctrl+g", "help": "f12"})
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        first = app.chat_screen.session["id"]
        await pilot.press("ctrl+n")  # no longer bound
        await pilot.pause(0.3)
        assert app.chat_screen.session["id"] == first
        await pilot.press("ctrl+g")
        await until(pilot, lambda: app.chat_screen.session["id"] != first, "a new session from the remapped key")
        await pilot.press("f12")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen")
        table = app.screen.query_one("#help-table")
        rows = [[str(c) for c in table.get_row_at(i)] for i in range(table.row_count)]
        assert ["Ctrl+G", "New", "Start a new chat session."] in rows
        assert ["F12", "Help", "This list of keys."] in rows
        assert any(r[0] == "Shift+Enter / Ctrl+J" for r in rows)
        await pilot.press("escape")


def test_bindings_come_from_the_config_file(tmp_path):
    from assistant.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("tui:\n  theme: nord\n  bindings:\n    regenerate: ctrl+g\n")
    config = load_config(path)
    assert config.tui.theme == "nord"
    assert config.tui.bindings["regenerate"] == "ctrl+g"
    assert config.tui.bindings["cancel"] == "escape"
    path.write_text("tui:\n  bindings:\n    regenrate: ctrl+g\n")
    with pytest.raises(Exception) as err:
        load_config(path)
    assert "did you mean 'regenerate'" in str(err.value)


# -- connecting -------------------------------------------------------------------------------


async def test_starts_a_daemon_and_says_so(isolated_home, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(NO_MODEL)
    sock = short_socket_path()
    app = AssistantApp(socket=str(sock), config_path=str(config), start=True)
    states: list[tuple[str, str]] = []
    original = app._show_connection

    def record(state, message):
        states.append((state, message))
        original(state, message)

    app._show_connection = record
    try:
        async with app.run_test(size=SIZE) as pilot:
            await connected(pilot)
            assert ("starting" in [s for s, _ in states])
            starting = next(m for s, m in states if s == "starting")
            assert "Starting the daemon" in starting
            assert app.conn_state == "connected"
            assert not app.query_one("#banner").has_class("-shown")
    finally:
        async with await Client.connect(sock) as c:
            await c.call("shutdown")


async def test_reconnects_when_the_daemon_comes_back(daemon_factory, monkeypatch):
    monkeypatch.setattr("assistant.tui.app.RETRY_SECONDS", 0.2)
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        sid = app.chat_screen.session["id"]
        daemon.stop()
        await until(pilot, lambda: app.conn_state == "waiting", "the TUI to notice")
        banner = str(app.query_one("#banner").render())
        assert "went away" in banner
        assert "daemon gone" in status_text(app)
        # A message sent now is refused with a message and stays in the input.
        app.query_one(ChatInput).text = "hello?"
        await pilot.press("enter")
        assert app.query_one(ChatInput).text == "hello?"
        again = daemon_factory(config_text=NO_MODEL, socket_path=daemon.socket).start()
        await until(pilot, lambda: app.conn_state == "connected", "the reconnect")
        assert app.chat_screen.session["id"] == sid  # the same session, reloaded
        assert not app.query_one("#banner").has_class("-shown")
        again.stop()


class FakeServer:
    """A Unix socket server that is not a daemon: it answers each line with ``reply(line)``."""

    def __init__(self, reply: Callable[[bytes], bytes | None]):
        self.reply = reply
        self.path = short_socket_path()
        self.server = None

    async def __aenter__(self):
        async def handle(reader, writer):
            try:
                while line := await reader.readline():
                    out = self.reply(line)
                    if out is None:
                        continue
                    writer.write(out)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_unix_server(handle, str(self.path))
        return self

    async def __aexit__(self, *exc):
        self.server.close()


async def _error_shown(app_socket: str, expected: str, **kwargs) -> AssistantApp:
    app = AssistantApp(socket=app_socket, start=True, **kwargs)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.conn_state == "error", "the error", 20)
        banner = str(app.query_one("#banner").render())
        assert expected in banner, banner
        assert "Traceback" not in banner
        assert app.query_one("#banner").has_class("-error")
        assert app.client is None
    return app


async def test_socket_that_is_not_a_daemon(isolated_home):
    async with FakeServer(lambda line: b"HTTP/1.0 400 Bad Request\r\n") as server:
        await _error_shown(str(server.path), "is not an assistant daemon")


async def test_socket_that_never_answers(isolated_home, monkeypatch):
    monkeypatch.setattr(connection, "HANDSHAKE_TIMEOUT", 0.5)
    async with FakeServer(lambda line: None) as server:
        await _error_shown(str(server.path), "did not answer the handshake")


async def test_daemon_of_another_protocol_version(isolated_home):
    def reply(line: bytes) -> bytes:
        req = json.loads(line)
        err = {"code": -32002, "message": "client speaks protocol 1, this daemon speaks 2",
               "data": {"protocol_version": PROTOCOL_VERSION + 1}}
        return json.dumps({"jsonrpc": "2.0", "id": req["id"], "error": err}).encode() + b"\n"

    async with FakeServer(reply) as server:
        await _error_shown(str(server.path), f"speaks protocol version {PROTOCOL_VERSION + 1}; this TUI speaks "
                                             f"{PROTOCOL_VERSION}")


async def test_socket_path_that_is_a_file(isolated_home, tmp_path):
    path = tmp_path / "not-a-socket"
    path.write_text("precious data")
    await _error_shown(str(path), "is a file, not a daemon socket")
    assert path.read_text() == "precious data"  # never replaced by a daemon


async def test_a_bug_is_a_message_not_a_traceback(daemon_factory):
    daemon = daemon_factory(config_text=NO_MODEL).start()
    app = tui(daemon, safety_net=True)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)

        # A failing worker: a notification, and the TUI goes on.
        async def broken_worker():
            raise ValueError("boom")

        app.run_worker(broken_worker(), exit_on_error=False)
        await until(pilot, lambda: "Something went wrong: ValueError: boom" in notifications(app), "the message")
        assert app.is_running
        # A failing handler stops Textual's message loop: the app closes with one sentence, no traceback.
        app._handle_exception(RuntimeError("bad state"))
        await asyncio.sleep(0.3)
    assert app.return_code == 1
    printed = app.exit_message
    assert "stopped because of a bug: RuntimeError: bad state" in printed
    assert "Traceback" not in printed and "tui.log" in printed


async def test_a_failing_chat_screen_worker_is_a_message_too():
    """The chat screen runs its own workers (sending, dialogs); their state changes reach the
    screen, not the app (Textual does not bubble them): a failure still becomes a notification."""
    from tui_fake import FakeClient

    async def factory(on_starting, start):
        return FakeClient()

    app = AssistantApp(client_factory=factory, history_file=None, safety_net=True)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)

        async def broken_flow(screen):
            raise ValueError("flow broke")

        app.chat_screen.run_flow(broken_flow)
        await until(pilot, lambda: "Something went wrong: ValueError: flow broke" in notifications(app),
                    "the message")
        assert app.is_running


# -- the command line ---------------------------------------------------------------------------


def test_assistant_without_a_terminal_prints_help():
    proc = run_cli(timeout=60)
    assert proc.returncode == 0
    assert "usage: assistant" in proc.stdout
    assert "tui" in proc.stdout
    proc = run_cli("tui", "--help", timeout=60)
    assert proc.returncode == 0 and "--no-start" in proc.stdout


def test_tui_package_imports_no_textual_for_the_config():
    import subprocess
    import sys

    code = "import sys, assistant.config; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert Path(__file__).parents[1].joinpath("assistant", "tui", "app.tcss").exists()


def test_config_and_tui_do_not_import_each_other():
    """The config reads the actions table from assistant.keymap: loading it imports no TUI module,
    and the TUI's keys import no config (YAML, the schema): a start without a config file stays light."""
    import subprocess
    import sys

    code = "import sys, assistant.config; print(sorted(m for m in sys.modules if m.startswith('assistant.tui')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    code = "import sys, assistant.tui.keys; print('assistant.config' in sys.modules, 'yaml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


def test_every_action_is_bound_once_by_the_app_or_the_chat_screen():
    """Each action with a key is bound where it runs: app-wide ones by the app, the chat's by the
    chat screen (which also shows Quit first in its footer), all under their ids for the keymap."""
    from assistant.keymap import ACTIONS
    from assistant.tui.keys import APP_ACTIONS
    from assistant.tui.screens.chat import ChatScreen

    app_ids = [b.id for b in AssistantApp.BINDINGS]
    chat_ids = [b.id for b in ChatScreen.BINDINGS]
    bound = [a.id for a in ACTIONS if a.action]
    assert sorted(app_ids) == sorted(APP_ACTIONS)
    assert chat_ids[0] == "quit" and ChatScreen.BINDINGS[0].action == "app.quit"
    assert chat_ids[1:] == [i for i in bound if i not in APP_ACTIONS]
    for binding in ChatScreen.BINDINGS[1:]:
        assert hasattr(ChatScreen, f"action_{binding.action}"), binding
    for binding in AssistantApp.BINDINGS:
        assert hasattr(AssistantApp, f"action_{binding.action}"), binding


def test_the_canned_daemon_is_not_in_the_package():
    root = Path(__file__).parents[1]
    assert not (root / "assistant" / "tui" / "fake.py").exists()
    for path in (root / "assistant").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "tui_fake" not in text and "assistant.tui.fake" not in text, path


# -- the fast start, and the status line's figures --------------------------------------------------


async def test_prefetched_connection_shows_the_session_in_the_first_frame(daemon_factory):
    from assistant.tui.app import prefetch

    daemon = daemon_factory(config_text=NO_MODEL).start()
    async with await daemon.client() as c:
        older = await c.call("sessions.create", {"title": "Older"})
        newest = await c.call("sessions.create", {"title": "Newest"})
    client, initial = await prefetch(str(daemon.socket))
    assert client is not None and initial["session"]["id"] == newest["id"]
    app = AssistantApp(socket=str(daemon.socket), start=False, client=client, initial=initial)
    async with app.run_test(size=SIZE) as pilot:
        # Before any daemon call of the app's own: the first frame is complete and interactive.
        assert app.conn_state == "connected"
        assert app.chat_screen.session["id"] == newest["id"]
        assert [s["title"] for s in app.query_one(SessionSidebar).sessions] == ["Newest", "Older"]
        await connected(pilot)
        assert app.client is client
        assert older["id"] in [s["id"] for s in app.chat_screen.sessions]
    # No daemon: nothing prefetched, the app does the connecting (and shows it).
    assert await prefetch(str(short_socket_path())) == (None, None)


def test_status_line_shows_the_last_replys_figures():
    from assistant.tui.format import stats_parts

    stats = {"tokens_per_second": 104.66, "ttft_ms": 41.2, "context_used": 38, "context_length": 2048,
             "drafter": "ngram", "acceptance_rate": 0.753}
    assert stats_parts(stats) == ["104.7 tok/s", "TTFT 41 ms", "draft ngram 75%", "ctx 38/2048 (1%)"]
    assert stats_parts({"tokens_per_second": 10.0}) == ["10.0 tok/s"]  # no speculative decoding: no drafter
    assert stats_parts(None) == []


async def test_input_history_is_kept_between_runs(tmp_path):
    from assistant.tui.history import append_history, load_history
    from tui_fake import FakeClient

    path = tmp_path / "state" / "tui-history.jsonl"
    assert load_history(path) == []
    append_history(path, "first question")
    append_history(path, "a\nmulti-line one")
    with path.open("a") as f:
        f.write("not json\n")
    assert load_history(path) == ["first question", "a\nmulti-line one"]

    async def factory(on_starting, start):
        return FakeClient()

    app = AssistantApp(client_factory=factory, history_file=path)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await pilot.press("up")
        assert app.query_one(ChatInput).text == "a\nmulti-line one"
        app.query_one(ChatInput).text = "third"
        await pilot.press("enter")
        await until(pilot, lambda: not app.chat_screen.busy, "the fake reply")
    assert load_history(path)[-1] == "third"


async def test_sessions_rewind_for_regenerate(daemon_factory):
    """The daemon method behind regenerate: drop a message and everything after it."""
    from assistant.protocol import ErrorCode, RPCError

    daemon = daemon_factory(config_text=GREEDY).start()
    async with await daemon.client() as c:
        s = await c.call("sessions.create", {})
        for prompt in ("Hello.", QUESTION):
            await (await c.chat(prompt=prompt, session=s["id"], max_tokens=8)).result()
        messages = (await c.call("sessions.get", {"id": s["id"]}))["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert await c.call("sessions.rewind", {"id": s["id"], "message_id": messages[2]["id"]}) == {"deleted": 2}
        left = (await c.call("sessions.get", {"id": s["id"]}))["messages"]
        assert [m["id"] for m in left] == [messages[0]["id"], messages[1]["id"]]
        other = await c.call("sessions.create", {})
        with pytest.raises(RPCError) as err:
            await c.call("sessions.rewind", {"id": other["id"], "message_id": messages[0]["id"]})
        assert err.value.code == ErrorCode.INVALID_PARAMS and "no message" in err.value.message
        with pytest.raises(RPCError) as err:
            await c.call("sessions.rewind", {"id": "nope", "message_id": 1})
        assert err.value.code == ErrorCode.SESSION_NOT_FOUND


async def test_status_line_says_when_the_model_unloads(daemon_factory):
    # keep_alive from the config: after a reply the daemon says when the idle model
    # unloads, and the status line shows it (with -1: the next test).
    daemon = daemon_factory(config_text=GREEDY + "keep_alive: 10m\n").start()
    app = tui(daemon)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await type_and_send(pilot, QUESTION)
        await until(pilot, lambda: not app.chat_screen.busy and app.query_one(ChatView).last("assistant") is not None,
                    "the reply", REPLY)
        await until(pilot, lambda: "unloads in 9m" in status_text(app) or "unloads in 10m" in status_text(app),
                    "the keep-alive countdown in the status line")


async def test_status_line_says_a_model_is_kept_loaded(daemon_factory):
    kept = daemon_factory(config_text=GREEDY + "keep_alive: -1\n").start()
    app = tui(kept)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot)
        await until(pilot, lambda: "kept loaded" in status_text(app), "'kept loaded' in the status line")
