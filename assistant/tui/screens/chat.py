"""The chat screen: the conversation with the daemon, and the actions on it.

Layout: sessions sidebar | chat (connection banner, messages, attachments line,
input) | activity panel; the status line and the key footer at the bottom.

The screen owns the conversation's state (the sessions, the current one, the
reply being streamed, the attachments) and the chat's keys; its actions start
the flows that live beside it, each a module of functions on the screen:
``reply_flow`` (send a message, stream the reply, regenerate),
``session_flows`` (load, open, create, rename, delete, export sessions),
``model_flows`` (settings, model / backend / drafter) and ``attach_flow``.
The app owns the connection (``app.client``) and what the daemon has loaded;
it tells the screen when it connects (:meth:`ChatScreen.connected`), what the
connection is doing (:meth:`ChatScreen.show_connection`) and what the daemon
reports (:meth:`ChatScreen.show_event`). Everything that talks to the daemon
runs in a worker; every failure is a message on screen, never a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from textual import on
from textual.app import ComposeResult, SystemCommand
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Static
from textual.worker import Worker

from assistant.protocol import RPCError
from assistant.tui import attachments
from assistant.tui.format import keep_alive_text
from assistant.tui.history import append_history
from assistant.tui.keys import ACTIONS, APP_ACTIONS, display_key, key_bindings
from assistant.tui.screens import attach_flow, model_flows, reply_flow, session_flows
from assistant.tui.widgets.activity import ActivityPanel
from assistant.tui.widgets.chat import ChatInput, ChatView, MessageView
from assistant.tui.widgets.sidebar import SessionSidebar
from assistant.tui.widgets.status import StatusBar

if TYPE_CHECKING:
    from assistant.tui.app import AssistantApp

BUSY = "A reply is still coming: wait, or press Esc to cancel it."


class ChatScreen(Screen[None]):
    """The app's main screen (``AssistantApp.get_default_screen``)."""

    app: "AssistantApp"

    # Quit first: the footer then reads Quit, the chat's keys, and the app's (Plugins, Help)
    # last, the order it always had. The app binds Quit too, for any other screen.
    BINDINGS = (key_bindings(["quit"], "app")
                + key_bindings(a.id for a in ACTIONS if a.action and a.id not in APP_ACTIONS))

    def __init__(self, *, keys: dict[str, str], history: list[str], initial: dict[str, Any] | None = None):
        """``initial``: ``{"sessions": [...], "session": sessions.get}`` fetched before the app
        started, drawn in the first frame."""
        super().__init__()
        self.keys = keys
        self.history = history
        self.sessions: list[dict[str, Any]] = list(initial["sessions"]) if initial else []
        self.session: dict[str, Any] | None = None
        self.stream: Any = None  # the reply being streamed (client.ChatStream)
        self.busy = False  # a reply (or a regenerate) is under way
        self.last_stats: dict[str, Any] | None = None
        # files waiting to go with the next message (Ctrl+O adds one, the cancel key drops the last)
        self.attachments: list[attachments.Attachment] = []
        self._first = dict(initial["session"]) if initial else None

    def compose(self) -> ComposeResult:
        nl = display_key(self.keys["newline"])
        views = session_flows.take(self, self._first) if self._first else []
        self._first = None
        with Horizontal(id="body"):
            yield SessionSidebar(id="sidebar", sessions=self.sessions, current=(self.session or {}).get("id"))
            with Vertical(id="main"):
                yield Static("", id="banner", markup=False)
                yield ChatView(*views, id="chat")
                yield Static("", id="attachment", markup=False)
                yield ChatInput(keys=self.keys, history=self.history, id="input",
                                placeholder=f"Ask anything. {display_key(self.keys['send'])} sends, {nl} "
                                            "adds a line, Ctrl+P for commands.")
            yield ActivityPanel(id="activity", classes="-hidden")
        yield StatusBar(id="status", activity_key=display_key(self.keys["toggle_activity"]))
        yield Footer(compact=True)

    class Ready(Message):
        """Posted once the screen is composed and mounted: the app may connect (and reach the
        screen's widgets) from now on."""

    def on_mount(self) -> None:
        self.query_one(ChatInput).focus()
        if self.session is not None:
            session_flows.show_current(self)
        # The state the app starts in ("connected" with a connection made before the app started,
        # so the first frame is already interactive).
        self.show_connection(self.app.conn_state, self.app.conn_message)
        self.post_message(self.Ready())  # bubbles to the app
        # The keep-alive countdown ("unloads in 4m") is computed here from unload_at: no call.
        self.set_interval(15, self.update_model_status)

    @property
    def client(self) -> Any:
        """The app's connection to the daemon (None while there is none)."""
        return self.app.client

    @property
    def status_bar(self) -> StatusBar:
        return self.query_one(StatusBar)

    # -- what the app tells the screen ---------------------------------------------

    def show_connection(self, state: str, message: str) -> None:
        """The connection's state in the status line, and ``message`` (if any) in the banner."""
        if not self._has_widgets():
            return
        banner = self.query_one("#banner", Static)
        banner.update(message)
        banner.set_class(bool(message), "-shown")
        banner.set_class(state == "error", "-error")
        self.status_bar.set(state=state)

    async def connected(self, client: Any, *, prefetched: bool) -> None:
        """Connected: load what the first interactive frame needs, the sessions and the current
        one (``prefetched``: fetched before the app started, and already on screen)."""
        self.status_bar.set(model=(self.session or {}).get("model") or client.server_info.get("default_model"))
        if prefetched:
            self.update_model_status()
        else:
            await session_flows.reopen(self)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        """Earlier events (the backlog) for the activity panel."""
        self.query_one(ActivityPanel).add_events(events)

    def show_event(self, event: dict[str, Any]) -> None:
        """A live event: in the activity panel, and counted in the status line while it is hidden."""
        panel = self.query_one(ActivityPanel)
        panel.add_event(event)
        if panel.has_class("-hidden") and event.get("type") != "chat.finished":
            self.status_bar.set(unseen_events=self.status_bar.unseen_events + 1)

    @property
    def attachment(self) -> attachments.Attachment | None:
        """The last attachment waiting for the next message (None: none)."""
        return self.attachments[-1] if self.attachments else None

    @attachment.setter
    def attachment(self, att: attachments.Attachment | None) -> None:
        self.attachments = [] if att is None else [att]

    def model_modalities(self) -> list[str] | None:
        """What the current model takes ("text", "image", "audio"), when it is loaded and the
        daemon says; None when the TUI cannot know before sending."""
        model = self.current_model()
        return attachments.modalities(self.app.loaded_info.get(model)) if model else None

    def current_model(self) -> str | None:
        """The session's model, else the daemon's default, else the model of the last reply."""
        model = (self.session or {}).get("model")
        if model:
            return model
        return (self.client.server_info.get("default_model") if self.client is not None else None) or (
            self.last_stats or {}).get("model")

    def _has_widgets(self) -> bool:
        """False while the app is tearing the screen down: the connection loop and the
        client's reader may still report then (the daemon closing as the app exits)."""
        try:
            self.query_one(StatusBar)
        except NoMatches:
            return False
        return True

    def update_model_status(self) -> None:
        """The status line's model and the backend it is loaded with."""
        if not self._has_widgets():
            return
        model = self.current_model()
        backend = self.app.loaded.get(model) if model else None
        if backend is None and self.last_stats and self.last_stats.get("model") == model:
            backend = self.last_stats.get("backend")
        if model in self.app.unloaded_idle:
            keep = "unloaded while idle; the next message reloads it"
        else:
            keep = keep_alive_text(self.app.loaded_info.get(model)) if model else ""
        self.status_bar.set(model=model, backend=backend, keep=keep)
        if self.attachments:  # what the model takes may have changed: so may the path each file takes
            self.show_attachment()

    # -- running things ---------------------------------------------------------------

    @on(SessionSidebar.Chosen)
    def session_chosen(self, event: SessionSidebar.Chosen) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or press Esc to cancel it, before switching sessions.",
                        severity="warning")
            self.query_one(SessionSidebar).set_current(self.session["id"] if self.session else None)
            return
        self.guarded(session_flows.open_session(self, event.session_id))
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

    def run_flow(self, flow: Callable[..., Awaitable[Any]], *args: Any, group: str = "dialog") -> Worker:
        """Run ``flow(self, *args)`` in a worker of this screen (waiting for a dialog needs one);
        a failure is the app's to show (``on_worker_state_changed``)."""
        return self.run_worker(flow(self, *args), name=flow.__name__, group=group, exit_on_error=False)

    def need_session(self) -> bool:
        """Connected, with a current session; otherwise says so and returns False."""
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon.", severity="error")
            return False
        return True

    # -- the chat -----------------------------------------------------------------

    @on(ChatInput.Submitted)
    def submitted(self, event: ChatInput.Submitted) -> None:
        text = event.text
        if not text.strip() and not self.attachments:
            return
        if self.busy:
            self.notify(BUSY, severity="warning")
            return
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon yet; your message is still in the input.", severity="error")
            return
        chat_input = event.chat_input
        chat_input.remember(text)
        append_history(self.app.history_file, text)
        chat_input.clear()
        atts, self.attachments = self.attachments, []
        self.show_attachment()
        self.busy = True
        self.refresh_bindings()
        self.run_flow(reply_flow.send, text, atts, group="chat")

    # -- actions --------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":  # hidden from the footer while there is nothing to cancel
            return True if (self.stream is not None or self.attachments) else False
        if action == "regenerate":  # shown, disabled, while a reply is coming
            return None if self.busy else True
        return True

    def action_cancel(self) -> None:
        if self.stream is not None:
            stream = self.stream
            self.status_bar.set(busy="cancelling…")
            self.guarded(stream.cancel(), "Cancel failed: ")
        elif self.attachments:
            removed = self.attachments.pop()
            self.show_attachment()
            self.refresh_bindings()
            self.notify(f"Attachment removed: {removed.label}.")

    def action_regenerate(self) -> None:
        if self.busy:
            self.notify("A reply is still coming: wait, or cancel it first.", severity="warning")
            return
        if self.client is None or self.session is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.run_flow(reply_flow.regenerate, group="chat")

    def action_copy(self) -> None:
        focused = self.focused
        view = focused if isinstance(focused, MessageView) else self.query_one(ChatView).last("assistant")
        if view is None or not view.text:
            self.notify("No message to copy yet.")
            return
        self.app.copy_to_clipboard(view.text)
        self.notify(f"Copied {len(view.text)} characters to the clipboard.")

    def action_attach(self) -> None:
        if self.client is None:
            self.notify("Not connected to the daemon.", severity="error")
            return
        self.run_flow(attach_flow.attach)

    def show_attachment(self) -> None:
        """The line above the input that names the attachments and how the model will get each
        (read by the model, OCR text, transcript, refused), hidden when there is none."""
        bar = self.query_one("#attachment", Static)
        if not self.attachments:
            bar.update("")
            bar.remove_class("-shown")
            return
        mods = self.model_modalities()
        shown = " · ".join(f"{a.label} ({attachments.expected_path(a.kind, mods, self.app.skills)})"
                           for a in self.attachments)
        last = "it" if len(self.attachments) == 1 else "the last"
        bar.update(f"Attached: {shown}  ({display_key(self.keys['cancel'])} removes {last})")
        bar.add_class("-shown")

    def action_new_session(self) -> None:
        if self.busy:
            self.notify(BUSY, severity="warning")
            return
        self.guarded(session_flows.create(self), "Could not create a session: ")
        self.query_one(ChatInput).focus()

    def action_rename_session(self) -> None:
        if self.need_session():
            self.run_flow(session_flows.rename)

    def action_delete_session(self) -> None:
        if self.busy:
            self.notify(BUSY, severity="warning")
            return
        if self.need_session():
            self.run_flow(session_flows.delete)

    def action_export_session(self) -> None:
        if self.need_session():
            self.run_flow(session_flows.export)

    def action_toggle_sidebar(self) -> None:
        self.query_one(SessionSidebar).toggle_class("-hidden")

    def action_toggle_activity(self) -> None:
        panel = self.query_one(ActivityPanel)
        panel.toggle_class("-hidden")
        if not panel.has_class("-hidden"):
            self.status_bar.set(unseen_events=0)

    def action_settings(self) -> None:
        if self.need_session():
            self.run_flow(model_flows.settings)

    def palette_commands(self) -> Iterable[SystemCommand]:
        """The command palette's entries about the chat: switch model, backend, drafter, session."""
        yield from model_flows.palette_commands(self)
        yield from session_flows.palette_commands(self)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # A worker's messages go to the node that runs it and do not bubble: the app decides
        # what a failure shows.
        self.app.worker_changed(event)
