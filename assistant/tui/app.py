"""The Textual app: a terminal session with the daemon, over the Unix socket.

Layout: sessions sidebar | chat (messages, attachment line, input) | activity
panel; a status line (connection, model, backend, the last reply's figures)
and the key footer at the bottom. Everything that talks to the daemon runs in
Textual workers on the app's event loop, through ``assistant.client``; every
failure is a message in the UI, never a traceback on screen.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker, WorkerState

from assistant import paths
from assistant.protocol import ErrorCode, RPCError
from assistant.tui import attachments
from assistant.tui.connection import ConnectFailure, open_client
from assistant.tui.format import session_title, title_from_prompt
from assistant.tui.keys import ACTIONS, BY_ID, display_key, effective_keys
from assistant.tui.widgets.activity import ActivityPanel
from assistant.tui.widgets.chat import ChatInput, ChatView, MessageView
from assistant.tui.widgets.sidebar import SessionSidebar
from assistant.tui.widgets.status import StatusBar

log = logging.getLogger("assistant.tui")

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "max_tokens", "seed")
BACKENDS = ("auto", "llama.cpp", "mlx")
HISTORY_LIMIT = 500
RETRY_SECONDS = 1.0
STREAM_FPS = 15

PALETTE_TITLES = {
    "cancel": "Cancel the reply", "regenerate": "Regenerate the last reply", "copy": "Copy message",
    "attach": "Attach an image or audio file", "new_session": "New session", "rename_session": "Rename session",
    "delete_session": "Delete session", "export_session": "Export session to Markdown",
    "toggle_sidebar": "Show/hide the sessions sidebar", "toggle_activity": "Show/hide the activity panel",
    "settings": "Session settings", "plugins": "Plugins and skills", "help": "Help: keys",
    "reconnect": "Reconnect (start the daemon if needed)",
}

ClientFactory = Callable[[Callable[[], None], bool], Awaitable[Any]]


def history_path() -> Path:
    return paths.data_dir() / "tui-history.jsonl"


def load_history(path: Path | None) -> list[str]:
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines[-HISTORY_LIMIT:]:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, str):
            out.append(item)
    return out


def append_history(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
    except OSError:
        pass  # history is a convenience; never an error on screen


class AssistantApp(App[int]):
    """``assistant`` / ``assistant tui``."""

    CSS_PATH = str(Path(__file__).with_name("app.tcss"))
    TITLE = "assistant"
    BINDINGS = [Binding(a.key, a.action, a.description, show=a.footer, id=a.id) for a in ACTIONS if a.action]

    def __init__(self, *, socket: str | None = None, config_path: str | None = None, flags: list[str] | None = None,
                 start: bool = True, client_factory: ClientFactory | None = None, theme: str | None = None,
                 bindings: dict[str, str] | None = None, history_file: Path | None = None,
                 safety_net: bool = False, cwd: Path | None = None, config_problem: str | None = None,
                 client: Any = None, initial: dict[str, Any] | None = None):
        """``client`` and ``initial`` (``{"sessions": [...], "session": sessions.get}``): a connection
        made before the app started (see ``run``), so the first frame already shows the conversation."""
        super().__init__()
        self.socket = socket
        self.config_path = config_path
        self.flags = flags
        self.autostart = start
        self.client_factory = client_factory
        self.keys = effective_keys(bindings)
        self.wanted_theme = theme
        self.history_file = history_file
        self.safety_net = safety_net
        self.cwd = cwd or Path.cwd()
        self.config_problem = config_problem
        self.ready_client = client
        self.initial = initial if client is not None else None
        self.client: Any = None
        self.conn_state = "connecting"
        self.conn_message = ""
        self.sessions: list[dict[str, Any]] = list(self.initial["sessions"]) if self.initial else []
        self.session: dict[str, Any] | None = None
        self.stream: Any = None
        self.busy = False
        self.last_stats: dict[str, Any] | None = None
        self.loaded: dict[str, str] = {}  # model name -> backend, from the daemon
        self.model_names: list[str] = []
        self.skills: list[dict[str, Any]] = []
        self.attachment: attachments.Attachment | None = None
        self.exit_message = ""
        self.connected_once: asyncio.Event | None = None  # set once connected and loaded (tests wait on it)
        self.set_keymap({aid: key for aid, key in self.keys.items() if BY_ID[aid].action})

    # -- layout ---------------------------------------------------------------

    def compose(self) -> ComposeResult:
        nl = display_key(self.keys["newline"])
        views = self._take_session(dict(self.initial["session"])) if self.initial else []
        with Horizontal(id="body"):
            yield SessionSidebar(id="sidebar", sessions=self.sessions, current=(self.session or {}).get("id"))
            with Vertical(id="main"):
                yield Static("", id="banner", markup=False)
                yield ChatView(*views, id="chat")
                yield Static("", id="attachment", markup=False)
                yield ChatInput(keys=self.keys, history=load_history(self.history_file), id="input",
                                placeholder=f"Ask anything. {display_key(self.keys['send'])} sends, {nl} "
                                            "adds a line, Ctrl+P for commands.")
            yield ActivityPanel(id="activity", classes="-hidden")
        yield StatusBar(id="status", activity_key=display_key(self.keys["toggle_activity"]))
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.connected_once = asyncio.Event()
        if self.wanted_theme and self.wanted_theme != self.theme:
            if self.wanted_theme in self.available_themes:
                self.theme = self.wanted_theme
            else:
                self.notify(f"Unknown theme {self.wanted_theme!r} in the config (tui.theme); using the default. "
                            f"Known: {', '.join(sorted(self.available_themes))}", severity="warning", timeout=10)
        if self.config_problem:
            self.notify(self.config_problem, title="Config", severity="error", timeout=15)
        self.query_one(ChatInput).focus()
        if self.session is not None:
            self._show_session()
        # With a connection made before the app started, the first frame is already interactive.
        self._show_connection("connected" if self.ready_client is not None else "connecting", "")
        self.connection_loop(self.autostart)

    # -- the connection ---------------------------------------------------------

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    def _show_connection(self, state: str, message: str) -> None:
        self.conn_state = state
        self.conn_message = message
        banner = self.query_one("#banner", Static)
        banner.update(message)
        banner.set_class(bool(message), "-shown")
        banner.set_class(state == "error", "-error")
        self.status_bar.set(state=state)

    def _starting(self) -> None:
        self._show_connection("starting", "Starting the daemon… (the first start loads the model; this can take "
                                          "a few seconds)")

    async def _open(self, start: bool) -> Any:
        if self.client_factory is not None:
            return await self.client_factory(self._starting, start)
        return await open_client(self.socket, start=start, config_path=self.config_path, flags=self.flags,
                                 on_starting=self._starting)

    @work(exclusive=True, group="connection", exit_on_error=False)
    async def connection_loop(self, start: bool) -> None:
        lost = False
        while True:
            if not lost and self.ready_client is None:
                self._show_connection("connecting", "")
            try:
                client, self.ready_client = (self.ready_client or await self._open(start)), None
            except ConnectFailure as exc:
                if exc.retry:
                    if lost:
                        msg = (f"The daemon went away; reconnecting when it is back. "
                               f"({display_key(self.keys['reconnect'])} starts it.)")
                    else:
                        msg = f"{exc.message} Retrying… ({display_key(self.keys['reconnect'])} starts a daemon.)"
                    self._show_connection("waiting", msg)
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                self._show_connection("error", f"{exc.message}\nFix it, then press "
                                               f"{display_key(self.keys['reconnect'])} to try again.")
                return
            self.client = client
            try:
                await self._on_connected(client)
                if not client.closed.is_set():
                    self._show_connection("connected", "")  # the session is on screen: interactive
                await self._after_connected(client)
            except (RPCError, ConnectionError, OSError) as exc:
                if not client.closed.is_set():
                    msg = exc.message if isinstance(exc, RPCError) else str(exc)
                    self.notify(f"The daemon answered with an error while loading: {msg}", severity="error")
            if not client.closed.is_set():
                self._show_connection("connected", "")
                self.connected_once.set()
            await client.closed.wait()
            self.client = None
            self.status_bar.set(state="waiting")
            lost = True
            start = False
            self._show_connection("waiting", f"The daemon went away; reconnecting when it is back. "
                                             f"({display_key(self.keys['reconnect'])} starts it.)")

    async def _on_connected(self, client: Any) -> None:
        """What the first interactive frame needs: the sessions and the current one."""
        client.on_notification = self._on_notification
        self.status_bar.set(model=(self.session or {}).get("model") or client.server_info.get("default_model"))
        if self.initial is not None:  # fetched before the app started, and already on screen
            self.initial = None
            self._update_model_status()
            return
        await self.refresh_sessions()
        wanted = self.session["id"] if self.session else None
        ids = [s["id"] for s in self.sessions]
        if wanted in ids:
            await self.open_session(wanted)
        elif ids:
            await self.open_session(ids[0])
        else:
            await self.create_session()

    async def _after_connected(self, client: Any) -> None:
        """What can come a moment later: models, the activity backlog, skills."""
        await self._refresh_models(client)
        try:
            sub = await client.call("events.subscribe", {"types": ["*"], "backlog": 50})
            self.query_one(ActivityPanel).add_events(sub.get("recent") or [])
        except RPCError as exc:
            if exc.code != ErrorCode.METHOD_NOT_FOUND:
                raise
        try:
            self.skills = (await client.call("skills.list")).get("skills") or []
        except RPCError:
            self.skills = []

    async def _refresh_models(self, client: Any) -> None:
        try:
            data = await client.call("models.list")
        except RPCError:
            return
        self.loaded = {m["name"]: m.get("backend") for m in data.get("loaded") or []}
        names = [m["name"] for m in data.get("available") or []]
        self.model_names = names + [n for n in self.loaded if n not in names]
        self._update_model_status()

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        if method != "event" or not isinstance(params, dict):
            return
        panel = self.query_one(ActivityPanel)
        panel.add_event(params)
        if panel.has_class("-hidden") and params.get("type") != "chat.finished":
            self.status_bar.set(unseen_events=self.status_bar.unseen_events + 1)
        data = params.get("data") or {}
        if params.get("type") == "model.loaded" and isinstance(data, dict) and data.get("model"):
            self.loaded[data["model"]] = data.get("backend")
            self._update_model_status()
        elif params.get("type") == "model.unloaded" and isinstance(data, dict):
            self.loaded.pop(data.get("model"), None)
            self._update_model_status()

    def current_model(self) -> str | None:
        model = (self.session or {}).get("model")
        if model:
            return model
        return (self.client.server_info.get("default_model") if self.client is not None else None) or (
            self.last_stats or {}).get("model")

    def _update_model_status(self) -> None:
        model = self.current_model()
        backend = self.loaded.get(model) if model else None
        if backend is None and self.last_stats and self.last_stats.get("model") == model:
            backend = self.last_stats.get("backend")
        self.status_bar.set(model=model, backend=backend)

    # -- sessions -----------------------------------------------------------------

    async def refresh_sessions(self) -> None:
        if self.client is None:
            return
        data = await self.client.call("sessions.list", {"limit": 200})
        self.sessions = data.get("sessions") or []
        await self.query_one(SessionSidebar).show(self.sessions, self.session["id"] if self.session else None)

    async def open_session(self, sid: str) -> None:
        if self.client is None:
            return
        data = await self.client.call("sessions.get", {"id": sid})
        views = self._take_session(data)
        chat = self.query_one(ChatView)
        await chat.clear()
        if views:
            await chat.mount_all(views)
        chat.scroll_end(animate=False, immediate=True)
        chat.anchor()
        self._show_session()

    def _take_session(self, data: dict[str, Any]) -> list[MessageView]:
        """Make ``data`` (sessions.get) the current session; its messages as views."""
        messages = data.pop("messages", [])
        self.session = data
        self.last_stats = None
        views = []
        for m in messages[-200:]:
            if m["role"] not in ("user", "assistant"):
                continue
            views.append(MessageView(m["role"], m["content"], message_id=m["id"], status=m.get("status", "complete"),
                                     model=(m.get("stats") or {}).get("model")))
            if m["role"] == "assistant" and m.get("stats"):
                self.last_stats = m["stats"]
        return views

    def _show_session(self) -> None:
        self.status_bar.set(stats=self.last_stats)
        self._update_model_status()
        self.query_one(SessionSidebar).set_current(self.session["id"])
        self.sub_title = session_title(self.session)

    async def create_session(self) -> None:
        if self.client is None:
            return
        created = await self.client.call("sessions.create", {})
        self.session = created
        await self.refresh_sessions()
        await self.open_session(created["id"])

    @on(SessionSidebar.Chosen)
    def session_chosen(self, event: SessionSidebar.Chosen) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or press Esc to cancel it, before switching sessions.",
                        severity="warning")
            self.query_one(SessionSidebar).set_current(self.session["id"] if self.session else None)
            return
        self.guarded(self.open_session(event.session_id))
        self.query_one(ChatInput).focus()

    def guarded(self, coro: Awaitable[Any], what: str = "") -> Worker:
        """Run a daemon call in a worker; errors become notifications."""

        async def run() -> None:
            try:
                await coro
            except RPCError as exc:
                self.notify(f"{what}{exc.message}", severity="error", timeout=8)
            except ConnectionError:
                self.notify("Not connected to the daemon.", severity="error")

        return self.run_worker(run(), exit_on_error=False, group="daemon")

    # -- chat ---------------------------------------------------------------------

    @on(ChatInput.Submitted)
    def submitted(self, event: ChatInput.Submitted) -> None:
        text = event.text
        if not text.strip() and self.attachment is None:
            return
        if self.busy:
            self.notify("A reply is still coming: wait, or press Esc to cancel it.", severity="warning")
            return
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon yet; your message is still in the input.", severity="error")
            return
        chat_input = event.chat_input
        chat_input.remember(text)
        append_history(self.history_file, text)
        chat_input.clear()
        att, self.attachment = self.attachment, None
        self._show_attachment()
        self.busy = True
        self.refresh_bindings()
        self.run_chat(text, att)

    def chat_params(self, prompt: str) -> dict[str, Any]:
        settings = (self.session or {}).get("settings") or {}
        params: dict[str, Any] = {"prompt": prompt, "session": self.session["id"]}
        for key in SAMPLING_KEYS:
            if settings.get(key) is not None:
                params[key] = settings[key]
        if settings.get("draft"):
            params["draft"] = settings["draft"]
        return params

    @work(group="chat", exit_on_error=False)
    async def run_chat(self, prompt: str, att: attachments.Attachment | None = None,
                       show_user: bool = True) -> None:
        chat = self.query_one(ChatView)
        client = self.client
        view: MessageView | None = None
        user_view: MessageView | None = None
        original = prompt
        try:
            chat.anchor()
            if show_user:
                shown = prompt if att is None else (prompt + ("\n" if prompt else "") + f"[attached {att.label}]")
                user_view = await chat.add(MessageView("user", shown))
            if att is not None:
                self.status_bar.set(busy=f"{att.skill['name']} is reading {att.path.name}…")
                try:
                    res = await client.call("skills.call", {"name": att.skill["name"],
                                                            "arguments": attachments.skill_arguments(att, prompt)})
                except RPCError as exc:
                    await chat.add(MessageView("error", f"{att.skill['name']} could not read {att.path.name}: "
                                                        f"{exc.message}"))
                    return
                prompt = attachments.message_with_result(att, prompt, res.get("result"))
            view = await chat.add(MessageView("assistant", "", model=self.current_model()))
            self.status_bar.set(busy=f"generating… ({display_key(self.keys['cancel'])} cancels)")
            stream = await client.chat(**self.chat_params(prompt))
            self.stream = stream
            self.refresh_bindings()
            view.start_stream()
            # chunks(): every delta that arrived while the screen was repainting, in one piece
            async for delta in (stream.chunks() if hasattr(stream, "chunks") else stream):
                await view.write(delta)
                # At most ~STREAM_FPS repaints a second: what arrives meanwhile joins the next chunk,
                # so a fast model costs fewer layouts and the screen never falls behind.
                await asyncio.sleep(1 / STREAM_FPS)
            result = await stream.result()
            await view.end_stream(result.get("text", view.text))
            view.message_id = result.get("message_id")
            if user_view is not None:
                user_view.message_id = result.get("user_message_id")
            stats = result.get("stats") or {}
            self.last_stats = stats
            view.set_model(stats.get("model") or result.get("model"))
            if stats.get("model") and stats.get("backend"):
                self.loaded[stats["model"]] = stats["backend"]
            self.status_bar.set(stats=stats)
            self._update_model_status()
            reason = result.get("finish_reason")
            if reason == "cancelled":
                view.set_note("cancelled")
            elif stats.get("context_full"):
                view.set_note("stopped: the context window is full")
            elif reason == "length":
                view.set_note("stopped at max_tokens")
            if self.session is not None and not self.session.get("title") and original.strip():
                updated = await client.call("sessions.update", {"id": self.session["id"],
                                                                "title": title_from_prompt(original)})
                self.session["title"] = updated.get("title")
                self.sub_title = session_title(self.session)
            await self.refresh_sessions()
        except RPCError as exc:
            if view is not None:
                await view.end_stream()
                if not view.text:
                    await view.remove()
            await chat.add(MessageView("error", exc.message))
        except ConnectionError:
            if view is not None:
                await view.end_stream()
                view.set_note("incomplete: the daemon went away")
            else:
                await chat.add(MessageView("error", "Not sent: the connection to the daemon was lost."))
        finally:
            self.stream = None
            self.busy = False
            self.status_bar.set(busy="")
            self.refresh_bindings()

    # -- actions ------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return True if (self.stream is not None or self.attachment is not None) else False
        if action == "regenerate":
            return None if self.busy else True
        return True

    def action_cancel(self) -> None:
        if self.stream is not None:
            stream = self.stream
            self.status_bar.set(busy="cancelling…")
            self.guarded(stream.cancel(), "Cancel failed: ")
        elif self.attachment is not None:
            self.attachment = None
            self._show_attachment()
            self.notify("Attachment removed.")

    def action_regenerate(self) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or cancel it first.", severity="warning")
            return
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.regenerate()

    @work(group="chat", exit_on_error=False)
    async def regenerate(self) -> None:
        client, sid = self.client, self.session["id"]
        try:
            data = await client.call("sessions.get", {"id": sid})
            users = [m for m in data.get("messages", []) if m["role"] == "user"]
            if not users:
                self.notify("Nothing to regenerate in this session yet.")
                return
            last = users[-1]
            try:
                await client.call("sessions.rewind", {"id": sid, "message_id": last["id"]})
            except RPCError as exc:
                if exc.code == ErrorCode.METHOD_NOT_FOUND:
                    self.notify("This daemon cannot regenerate (it has no sessions.rewind); upgrade it.",
                                severity="error")
                    return
                raise
            await self.open_session(sid)
        except RPCError as exc:
            self.notify(f"Regenerate failed: {exc.message}", severity="error")
            return
        except ConnectionError:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.busy = True
        self.refresh_bindings()
        self.run_chat(last["content"])

    def action_copy(self) -> None:
        focused = self.focused
        view = focused if isinstance(focused, MessageView) else self.query_one(ChatView).last("assistant")
        if view is None or not view.text:
            self.notify("No message to copy yet.")
            return
        self.copy_to_clipboard(view.text)
        self.notify(f"Copied {len(view.text)} characters to the clipboard.")

    def action_attach(self) -> None:
        if self.client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.attach_flow()

    @work(group="dialog", exit_on_error=False)
    async def attach_flow(self) -> None:
        from assistant.tui.screens.dialogs import InputDialog

        try:
            self.skills = (await self.client.call("skills.list")).get("skills") or []
        except (RPCError, ConnectionError):
            pass

        def check(value: str) -> str | None:
            try:
                attachments.prepare(value, self.skills, self.cwd)
            except attachments.AttachmentError as exc:
                return str(exc)
            return None

        value = await self.push_screen_wait(InputDialog(
            "Attach an image or audio file", placeholder="path, e.g. ~/Pictures/cat.png", ok="Attach",
            hint="Images go to a vision.* skill, audio to an audio.* skill; its result is sent with your message.",
            check=check))
        if value is None:
            return
        try:
            self.attachment = attachments.prepare(value, self.skills, self.cwd)
        except attachments.AttachmentError as exc:
            self.notify(str(exc), severity="error")
            return
        self._show_attachment()
        self.refresh_bindings()
        self.query_one(ChatInput).focus()

    def attach_path(self, text: str) -> str | None:
        """Attach without the dialog (tests, scripts); returns the problem or None."""
        try:
            self.attachment = attachments.prepare(text, self.skills, self.cwd)
        except attachments.AttachmentError as exc:
            self.notify(str(exc), severity="error")
            return str(exc)
        self._show_attachment()
        self.refresh_bindings()
        return None

    def _show_attachment(self) -> None:
        bar = self.query_one("#attachment", Static)
        if self.attachment is None:
            bar.update("")
            bar.remove_class("-shown")
        else:
            bar.update(f"Attached: {self.attachment.label}  ({display_key(self.keys['cancel'])} removes it)")
            bar.add_class("-shown")

    def action_new_session(self) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or press Esc to cancel it.", severity="warning")
            return
        self.guarded(self.create_session(), "Could not create a session: ")
        self.query_one(ChatInput).focus()

    def _need_session(self) -> bool:
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon.", severity="error")
            return False
        return True

    def action_rename_session(self) -> None:
        if self._need_session():
            self.rename_flow()

    @work(group="dialog", exit_on_error=False)
    async def rename_flow(self) -> None:
        from assistant.tui.screens.dialogs import InputDialog

        sid = self.session["id"]
        value = await self.push_screen_wait(InputDialog(
            "Rename session", value=self.session.get("title") or "", placeholder="a title", ok="Rename",
            check=lambda v: None if v.strip() else "Give a title."))
        if value is None:
            return
        try:
            updated = await self.client.call("sessions.update", {"id": sid, "title": value.strip()})
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Rename failed: {getattr(exc, 'message', exc)}", severity="error")
            return
        if self.session and self.session["id"] == sid:
            self.session["title"] = updated.get("title")
            self.sub_title = session_title(self.session)
        await self.refresh_sessions()

    def action_delete_session(self) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or press Esc to cancel it.", severity="warning")
            return
        if self._need_session():
            self.delete_flow()

    @work(group="dialog", exit_on_error=False)
    async def delete_flow(self) -> None:
        from assistant.tui.screens.dialogs import ConfirmDialog

        sid = self.session["id"]
        ok = await self.push_screen_wait(ConfirmDialog(
            f"Delete the session “{session_title(self.session)}” and its "
            f"{len(self.query_one(ChatView).messages())} messages? This cannot be undone.", yes="Delete"))
        if not ok:
            return
        try:
            await self.client.call("sessions.delete", {"id": sid})
            self.session = None
            await self.refresh_sessions()
            if self.sessions:
                await self.open_session(self.sessions[0]["id"])
            else:
                await self.create_session()
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Delete failed: {getattr(exc, 'message', exc)}", severity="error")
            return
        self.notify("Session deleted.")

    def action_export_session(self) -> None:
        if self._need_session():
            self.export_flow()

    @work(group="dialog", exit_on_error=False)
    async def export_flow(self) -> None:
        from assistant.tui.screens.dialogs import InputDialog

        sid = self.session["id"]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", session_title(self.session)).strip("-").lower() or sid
        default = str(self.cwd / f"{slug}.md")

        def check(value: str) -> str | None:
            path = Path(os.path.expanduser(value.strip())) if value.strip() else None
            if path is None:
                return "Give a file path."
            path = path if path.is_absolute() else self.cwd / path
            if path.is_dir():
                return f"{path} is a folder; give a file name."
            if not path.parent.is_dir():
                return f"The folder {path.parent} does not exist."
            if not os.access(path.parent, os.W_OK):
                return f"Cannot write in {path.parent}: permission denied."
            return None

        value = await self.push_screen_wait(InputDialog("Export session to Markdown", value=default, ok="Export",
                                                        check=check))
        if value is None:
            return
        path = Path(os.path.expanduser(value.strip()))
        path = path if path.is_absolute() else self.cwd / path
        try:
            data = await self.client.call("sessions.export", {"id": sid})
            path.write_text(data["markdown"], encoding="utf-8")
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Export failed: {getattr(exc, 'message', exc)}", severity="error")
            return
        except OSError as exc:
            self.notify(f"Export failed: cannot write {path}: {exc.strerror or exc}", severity="error")
            return
        self.notify(f"Exported to {path}")

    def action_toggle_sidebar(self) -> None:
        self.query_one(SessionSidebar).toggle_class("-hidden")

    def action_toggle_activity(self) -> None:
        panel = self.query_one(ActivityPanel)
        panel.toggle_class("-hidden")
        if not panel.has_class("-hidden"):
            self.status_bar.set(unseen_events=0)

    def action_help(self) -> None:
        from assistant.tui.screens.help import HelpScreen

        hint = f"Config file: {paths.config_path(self.config_path)}" if self.client_factory is None else ""
        self.push_screen(HelpScreen(self.keys, hint))

    def action_plugins(self) -> None:
        if self.client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.plugins_flow()

    @work(group="dialog", exit_on_error=False)
    async def plugins_flow(self) -> None:
        from assistant.tui.screens.plugins import PluginsScreen

        try:
            plugins = (await self.client.call("plugins.list")).get("plugins") or []
            skills = (await self.client.call("skills.list")).get("skills") or []
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Could not list plugins: {getattr(exc, 'message', exc)}", severity="error")
            return
        self.skills = skills
        await self.push_screen_wait(PluginsScreen(plugins, skills))

    def action_settings(self) -> None:
        if self._need_session():
            self.settings_flow()

    @work(group="dialog", exit_on_error=False)
    async def settings_flow(self) -> None:
        from assistant.tui.screens.settings import SettingsScreen

        client = self.client
        await self._refresh_models(client)
        model = self.current_model() or "smollm2-135m"
        models = self.model_names or [model]
        if model not in models:
            models = [model] + models
        backend = self.loaded.get(model) or "auto"
        backends = list(BACKENDS) + [b for b in self.loaded.values() if b and b not in BACKENDS]
        if backend not in backends:
            backends.append(backend)
        result = await self.push_screen_wait(SettingsScreen(self.session, models=models, backends=backends,
                                                            model=model, backend=backend))
        if result is None:
            return
        await self.apply_settings(result, old_model=model, old_backend=backend)

    async def apply_settings(self, result: dict[str, Any], *, old_model: str | None, old_backend: str | None) -> None:
        sid = self.session["id"]
        params: dict[str, Any] = {"id": sid, "system": result["system"], "settings": result["settings"]}
        if result["title"]:  # the protocol cannot clear a title; an empty field keeps it
            params["title"] = result["title"]
        if result["model"] != old_model:
            params["model"] = result["model"]
        try:
            updated = await self.client.call("sessions.update", params)
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Settings not saved: {getattr(exc, 'message', exc)}", severity="error")
            return
        self.session.update({k: v for k, v in updated.items() if k != "message_count"})
        self.sub_title = session_title(self.session)
        await self.refresh_sessions()
        self._update_model_status()
        self.notify("Session settings saved.")
        backend = result["backend"]
        if result["model"] != old_model or (backend != old_backend and backend != "auto"):
            await self.load_model(result["model"], backend if backend != "auto" else None)

    async def load_model(self, model: str, backend: str | None) -> None:
        self.status_bar.set(busy=f"loading {model}" + (f" with {backend}" if backend else "") + "…")
        try:
            params = {"model": model}
            if backend:
                params["backend"] = backend
            info = await self.client.call("models.load", params)
        except (RPCError, ConnectionError, AttributeError) as exc:
            self.notify(f"Could not load {model}: {getattr(exc, 'message', exc)}", severity="error", timeout=10)
            return
        finally:
            self.status_bar.set(busy="")
        self.loaded[info.get("name", model)] = info.get("backend")
        self._update_model_status()
        self.notify(f"{info.get('name', model)} loaded with {info.get('backend')}.")

    def action_reconnect(self) -> None:
        if self.client is not None and not self.client.closed.is_set():
            self.notify("Already connected to the daemon.")
            return
        self.connection_loop(True)

    # -- switching from the command palette -------------------------------------------

    @work(group="dialog", exit_on_error=False)
    async def switch_model(self, model: str) -> None:
        if not self._need_session():
            return
        try:
            updated = await self.client.call("sessions.update", {"id": self.session["id"], "model": model})
        except (RPCError, ConnectionError) as exc:
            self.notify(f"Could not switch model: {getattr(exc, 'message', exc)}", severity="error")
            return
        self.session["model"] = updated.get("model")
        self._update_model_status()
        await self.load_model(model, None)

    @work(group="dialog", exit_on_error=False)
    async def switch_backend(self, backend: str) -> None:
        if self.client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        model = self.current_model()
        if model:
            await self.load_model(model, None if backend == "auto" else backend)

    @work(group="dialog", exit_on_error=False)
    async def switch_drafter(self, drafter: str | None) -> None:
        if not self._need_session():
            return
        settings = dict(self.session.get("settings") or {})
        if drafter:
            settings["draft"] = drafter
        else:
            settings.pop("draft", None)
        try:
            await self.client.call("sessions.update", {"id": self.session["id"], "settings": settings})
        except (RPCError, ConnectionError) as exc:
            self.notify(f"Could not set the drafter: {getattr(exc, 'message', exc)}", severity="error")
            return
        self.session["settings"] = settings
        self.notify(f"Drafter for this session: {drafter or 'the daemon default'}.")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for a in ACTIONS:
            if not a.action or a.id == "quit":
                continue
            title = PALETTE_TITLES.get(a.id, a.description)
            yield SystemCommand(title, f"{a.help} [{display_key(self.keys[a.id])}]",
                                partial(self.run_action, a.action))
        for name in self.model_names:
            yield SystemCommand(f"Model: {name}", "Use this model in the current session (loads it in the daemon)",
                                partial(self.switch_model, name), discover=False)
        for backend in BACKENDS:
            yield SystemCommand(f"Backend: {backend}", "Reload the current model with this backend",
                                partial(self.switch_backend, backend), discover=False)
        from assistant.tui.screens.settings import DRAFTERS

        yield SystemCommand("Drafter: daemon default", "Speculative decoding as the daemon's config says",
                            partial(self.switch_drafter, None), discover=False)
        for drafter in DRAFTERS:
            yield SystemCommand(f"Drafter: {drafter}", "Speculative-decoding drafter for this session",
                                partial(self.switch_drafter, drafter), discover=False)
        for s in self.sessions:
            yield SystemCommand(f"Open session: {session_title(s)}", f"{s.get('message_count', 0)} messages",
                                partial(self._open_from_palette, s["id"]), discover=False)

    def _open_from_palette(self, sid: str) -> None:
        self.post_message(SessionSidebar.Chosen(sid))

    # -- errors -----------------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state == WorkerState.ERROR:
            error = event.worker.error
            log.error("worker %s failed", event.worker.name, exc_info=error)
            if not self.safety_net and self._exception is None and error is not None:
                # under test: make bugs loud
                self._handle_exception(error)
                return
            self.notify(f"Something went wrong: {type(error).__name__}: {error}", severity="error", timeout=10)

    def _handle_exception(self, error: Exception) -> None:
        if not self.safety_net:
            super()._handle_exception(error)  # under test: the traceback, loudly
            return
        # An error in a message handler stops Textual's message loop, so the app
        # must close; but never with a traceback on the screen: it goes to the
        # log, and the terminal gets one sentence.
        log.error("unhandled error in the TUI", exc_info=error)
        self._return_code = 1
        where = paths.log_dir() / "tui.log"
        self.exit_message = (f"The assistant TUI stopped because of a bug: {type(error).__name__}: {error}\n"
                             f"The details are in {where}. The daemon is still running.")
        self._exit_renderables.append(self.exit_message)
        self._close_messages_no_wait()


def run(args: Any) -> int:
    """``assistant`` / ``assistant tui``: load the config's ``tui:`` section and run the app."""
    problem = None
    theme, bindings = None, None
    explicit = bool(args.config or os.environ.get("ASSISTANT_CONFIG"))
    if explicit or paths.config_path().exists():  # no file: the defaults, without loading YAML
        from assistant.config import ConfigError, load_config

        try:
            config = load_config(paths.config_path(args.config) if args.config else None)
            theme, bindings = config.tui.theme, config.tui.bindings
        except ConfigError as exc:
            problem = f"{exc} (the TUI uses its defaults; the daemon will refuse this config)"
    _log_to_file()

    async def main() -> int:
        # A daemon that is already up answers in milliseconds: fetch the sessions before the first
        # frame, so it shows the conversation at once. Anything else (no daemon, errors) is the
        # app's business, with messages on screen.
        client, initial = await prefetch(args.socket)
        app = AssistantApp(socket=args.socket, config_path=args.config, flags=_flags(args), theme=theme,
                           bindings=bindings, history_file=history_path(), safety_net=True,
                           config_problem=problem, start=not getattr(args, "no_start", False), client=client,
                           initial=initial)
        await app.run_async()
        return app.return_code or 0

    return asyncio.run(main())


async def prefetch(socket: str | None, timeout: float = 1.0) -> tuple[Any, dict[str, Any] | None]:
    """A connected client and the sessions (plus the most recent one) when a daemon answers at once;
    (None, None) otherwise."""
    from assistant.client import Client, DaemonNotRunning

    try:
        sock = paths.socket_path(socket)
        import stat as _stat

        if not _stat.S_ISSOCK(os.stat(sock).st_mode):
            return None, None
        client = await asyncio.wait_for(Client.connect(sock, client_name="assistant-tui"), timeout)
    except (DaemonNotRunning, OSError, RPCError, asyncio.TimeoutError, ValueError):
        return None, None
    try:
        sessions = (await asyncio.wait_for(client.call("sessions.list", {"limit": 200}), timeout))["sessions"]
        if sessions:
            session = await asyncio.wait_for(client.call("sessions.get", {"id": sessions[0]["id"]}), timeout)
        else:
            session = await asyncio.wait_for(client.call("sessions.create", {}), timeout)
            session["messages"] = []
            sessions = [session]
        return client, {"sessions": sessions, "session": session}
    except (RPCError, ConnectionError, OSError, asyncio.TimeoutError, KeyError, TypeError):
        await client.close()
        return None, None


def _flags(args: Any) -> list[str]:
    return [f for f, on_ in (("--no-plugins", getattr(args, "no_plugins", False)),
                             ("--trace-plugins", getattr(args, "trace_plugins", False))) if on_]


def _log_to_file() -> None:
    """The TUI logs to tui.log in the log dir, never to the screen."""
    try:
        log_dir = paths.log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(log_dir / "tui.log", encoding="utf-8")
    except OSError:
        return
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("assistant.tui")
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False
