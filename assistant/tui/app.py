"""The Textual app: a terminal session with the daemon, over the Unix socket.

The app keeps what is not about one conversation: the connection (connect,
start the daemon, reconnect when it comes back), the daemon's notifications
(routed to the screen that shows them), what the daemon has loaded, the
theme, the key bindings (``tui: bindings:`` through Textual's keymap), the
command palette, the app-wide actions (plugins, help, reconnect, quit) and
what a bug shows. The conversation and its actions are the chat screen's
(``screens/chat.py``), the app's default screen. Everything that talks to the
daemon runs in Textual workers on the app's event loop, through
``assistant.client``; every failure is a message in the UI, never a traceback
on screen.
"""

from __future__ import annotations

import asyncio
import logging
import os
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from textual import work
from textual.app import App, SystemCommand
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from assistant import paths
from assistant.protocol import ErrorCode, RPCError
from assistant.tui.connection import CALL_FAILURES, ConnectFailure, failure_text, open_client
from assistant.tui.history import history_path, load_history
from assistant.tui.keys import ACTIONS, APP_ACTIONS, BY_ID, display_key, effective_keys, key_bindings
from assistant.tui.screens.chat import ChatScreen

log = logging.getLogger("assistant.tui")

RETRY_SECONDS = 1.0

PALETTE_TITLES = {
    "cancel": "Cancel the reply", "regenerate": "Regenerate the last reply", "copy": "Copy message",
    "attach": "Attach an image or audio file", "new_session": "New session", "rename_session": "Rename session",
    "delete_session": "Delete session", "export_session": "Export session to Markdown",
    "toggle_sidebar": "Show/hide the sessions sidebar", "toggle_activity": "Show/hide the activity panel",
    "settings": "Session settings", "plugins": "Plugins and skills", "help": "Help: keys",
    "reconnect": "Reconnect (start the daemon if needed)",
}

ClientFactory = Callable[[Callable[[], None], bool], Awaitable[Any]]


class AssistantApp(App[int]):
    """``assistant`` / ``assistant tui``."""

    CSS_PATH = str(Path(__file__).with_name("app.tcss"))
    TITLE = "assistant"
    # The app-wide keys; the chat screen binds the chat's (keys.APP_ACTIONS says which is whose).
    BINDINGS = key_bindings(a.id for a in ACTIONS if a.id in APP_ACTIONS)

    def __init__(self, *, socket: str | None = None, config_path: str | None = None, flags: list[str] | None = None,
                 start: bool = True, client_factory: ClientFactory | None = None, theme: str | None = None,
                 bindings: dict[str, str] | None = None, history_file: Path | None = None,
                 safety_net: bool = False, cwd: Path | None = None, config_problem: str | None = None,
                 client: Any = None, initial: dict[str, Any] | None = None):
        """``client`` and ``initial`` (``{"sessions": [...], "session": sessions.get}``): a connection
        made before the app started (see ``run``), so the first frame already shows the conversation.
        ``client_factory(on_starting, start)``: connects instead of ``open_client`` (tests, benchmarks).
        ``safety_net``: a bug is a sentence and the log, not a traceback (off under test: bugs are loud)."""
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
        # With a connection made before the app started, the first frame is already interactive.
        self.conn_state = "connected" if client is not None else "connecting"
        self.conn_message = ""
        self.loaded: dict[str, str] = {}  # model name -> backend, from the daemon
        self.loaded_info: dict[str, dict[str, Any]] = {}  # model name -> its models.list entry
        self.unloaded_idle: set[str] = set()  # models the daemon unloaded after keep_alive
        self.model_names: list[str] = []
        self.skills: list[dict[str, Any]] = []
        self.exit_message = ""
        self.connected_once = asyncio.Event()  # set once connected and loaded (tests wait on it)
        self._chat: ChatScreen | None = None
        self.set_keymap({aid: key for aid, key in self.keys.items() if BY_ID[aid].action})

    def get_default_screen(self) -> ChatScreen:
        self._chat = ChatScreen(keys=self.keys, history=load_history(self.history_file), initial=self.initial)
        return self._chat

    @property
    def chat_screen(self) -> ChatScreen:
        """The chat screen (the default screen; it exists once the app runs)."""
        assert self._chat is not None, "the app is not running"
        return self._chat

    def on_mount(self) -> None:
        if self.wanted_theme and self.wanted_theme != self.theme:
            if self.wanted_theme in self.available_themes:
                self.theme = self.wanted_theme
            else:
                self.notify(f"Unknown theme {self.wanted_theme!r} in the config (tui.theme); using the default. "
                            f"Known: {', '.join(sorted(self.available_themes))}", severity="warning", timeout=10)
        if self.config_problem:
            self.notify(self.config_problem, title="Config", severity="error", timeout=15)

    def on_chat_screen_ready(self, event: ChatScreen.Ready) -> None:
        # Textual composes the default screen after the app's on_mount: connect once the
        # screen that shows the connection is there.
        self.connection_loop(self.autostart)

    # -- the connection ---------------------------------------------------------

    def _show_connection(self, state: str, message: str) -> None:
        self.conn_state = state
        self.conn_message = message
        self.chat_screen.show_connection(state, message)

    def _starting(self) -> None:
        self._show_connection("starting", "Starting the daemon… (the first start loads the model; this can take "
                                          "a few seconds)")

    def _gone(self) -> str:
        return (f"The daemon went away; reconnecting when it is back. "
                f"({display_key(self.keys['reconnect'])} starts it.)")

    async def _open(self, start: bool) -> Any:
        if self.client_factory is not None:
            return await self.client_factory(self._starting, start)
        return await open_client(self.socket, start=start, config_path=self.config_path, flags=self.flags,
                                 on_starting=self._starting)

    @work(exclusive=True, group="connection", exit_on_error=False)
    async def connection_loop(self, start: bool) -> None:
        """Connect (starting the daemon if ``start``), load, and connect again whenever the daemon goes
        away; until a failure someone must fix (then the reconnect key starts this again)."""
        lost = False
        while True:
            if not lost and self.ready_client is None:
                self._show_connection("connecting", "")
            try:
                client, self.ready_client = (self.ready_client or await self._open(start)), None
            except ConnectFailure as exc:
                if not exc.retry:
                    self._show_connection("error", f"{exc.message}\nFix it, then press "
                                                   f"{display_key(self.keys['reconnect'])} to try again.")
                    return
                retry = f"{exc.message} Retrying… ({display_key(self.keys['reconnect'])} starts a daemon.)"
                self._show_connection("waiting", self._gone() if lost else retry)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            self.client = client
            await self._load(client)
            await client.closed.wait()
            self.client = None
            lost = True
            start = False
            self._show_connection("waiting", self._gone())

    async def _load(self, client: Any) -> None:
        """Everything the screen shows from a new connection; a daemon error is a notification."""
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

    async def _on_connected(self, client: Any) -> None:
        """What the first interactive frame needs: the sessions and the current one."""
        client.on_notification = self._on_notification
        prefetched, self.initial = self.initial is not None, None
        await self.chat_screen.connected(client, prefetched=prefetched)

    async def _after_connected(self, client: Any) -> None:
        """What can come a moment later: the activity backlog, models, skills."""
        try:
            sub = await client.call("events.subscribe", {"types": ["*"], "backlog": 50})
            self.chat_screen.add_events(sub.get("recent") or [])
        except RPCError as exc:
            if exc.code != ErrorCode.METHOD_NOT_FOUND:
                raise
        # Models after subscribing: a load that finishes in between is then either in
        # the list or an event we receive, never missed.
        await self.refresh_models(client)
        try:
            self.skills = (await client.call("skills.list")).get("skills") or []
        except RPCError:
            self.skills = []

    async def refresh_models(self, client: Any) -> None:
        """Ask the daemon which models it has and which are loaded (an error keeps what we knew)."""
        try:
            data = await client.call("models.list")
        except RPCError:
            return
        self.loaded = {m["name"]: m.get("backend") for m in data.get("loaded") or []}
        # keep_alive_s / unload_at per loaded model: the status line says when it unloads.
        self.loaded_info = {m["name"]: m for m in data.get("loaded") or []}
        names = [m["name"] for m in data.get("available") or []]
        self.model_names = names + [n for n in self.loaded if n not in names]
        self.chat_screen.update_model_status()

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        """The daemon's events: to the activity panel; model loads also to what the app knows."""
        if method != "event" or not isinstance(params, dict):
            return
        self.chat_screen.show_event(params)
        data = params.get("data") or {}
        if params.get("type") == "model.loaded" and isinstance(data, dict) and data.get("model"):
            self.loaded[data["model"]] = data.get("backend")
            self.unloaded_idle.discard(data["model"])
            self.chat_screen.update_model_status()
        elif params.get("type") == "model.unloaded" and isinstance(data, dict):
            self.loaded.pop(data.get("model"), None)
            self.loaded_info.pop(data.get("model"), None)
            if data.get("reason") == "keep_alive":
                self.unloaded_idle.add(data.get("model"))
            self.chat_screen.update_model_status()
        if params.get("type") in ("chat.finished", "model.loaded") and self.client is not None:
            # A finished reply restarts its model's keep-alive clock: ask when it unloads now.
            self.run_worker(self.refresh_models(self.client), group="models", exclusive=True)

    # -- app-wide actions ---------------------------------------------------------------

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
        """The plugins screen, with the daemon's plugins and skills as they are now."""
        from assistant.tui.screens.plugins import PluginsScreen

        try:
            plugins = (await self.client.call("plugins.list")).get("plugins") or []
            skills = (await self.client.call("skills.list")).get("skills") or []
        except CALL_FAILURES as exc:
            self.notify(f"Could not list plugins: {failure_text(exc)}", severity="error")
            return
        self.skills = skills
        await self.push_screen_wait(PluginsScreen(plugins, skills))

    def action_reconnect(self) -> None:
        if self.client is not None and not self.client.closed.is_set():
            self.notify("Already connected to the daemon.")
            return
        self.connection_loop(True)

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """Textual's commands, every action with its key, then the chat screen's switches."""
        yield from super().get_system_commands(screen)
        for a in ACTIONS:
            if not a.action or a.id == "quit":
                continue
            runs_on = self if a.id in APP_ACTIONS else self.chat_screen
            title = PALETTE_TITLES.get(a.id, a.description)
            yield SystemCommand(title, f"{a.help} [{display_key(self.keys[a.id])}]",
                                partial(runs_on.run_action, a.action))
        yield from self.chat_screen.palette_commands()

    # -- errors -----------------------------------------------------------------------

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.worker_changed(event)

    def worker_changed(self, event: Worker.StateChanged) -> None:
        """A worker of the app or of a screen changed state; a failure is a notification (a loud
        traceback under test)."""
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
