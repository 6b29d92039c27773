"""The sessions sidebar: the daemon's persisted sessions, most recent first."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Label, ListItem, ListView

from assistant.tui.format import session_title
from assistant.tui.keys import key_bindings

# Shown in the footer while the sidebar has focus (they work everywhere: the chat screen binds
# them too, and runs them).
_SESSION_ACTIONS = ("new_session", "rename_session", "delete_session", "export_session")


class SessionItem(ListItem):
    def __init__(self, session: dict[str, Any]):
        super().__init__(classes="session-item")
        self.session = session

    def compose(self) -> ComposeResult:
        count = self.session.get("message_count") or 0
        line = Text(session_title(self.session), overflow="ellipsis", no_wrap=True)
        yield Label(line, classes="session-title", markup=False)
        yield Label(f"{count} message{'s' if count != 1 else ''}", classes="session-meta", markup=False)


class SessionSidebar(Vertical):
    """The list of sessions; choosing one posts ``SessionSidebar.Chosen``."""

    BINDINGS = key_bindings(_SESSION_ACTIONS, "screen", show=True)

    class Chosen(Message):
        def __init__(self, session_id: str):
            super().__init__()
            self.session_id = session_id

    def __init__(self, *, sessions: list[dict[str, Any]] | None = None, current: str | None = None,
                 **kwargs: Any):
        super().__init__(**kwargs)
        self.sessions: list[dict[str, Any]] = list(sessions or [])
        self.current: str | None = current

    def compose(self) -> ComposeResult:
        yield Label("Sessions", classes="panel-title")
        yield ListView(*[SessionItem(s) for s in self.sessions], id="session-list")

    def on_mount(self) -> None:
        self._highlight()

    async def show(self, sessions: list[dict[str, Any]], current: str | None) -> None:
        self.sessions = sessions
        self.current = current
        lv = self.query_one(ListView)
        await lv.clear()
        await lv.extend([SessionItem(s) for s in sessions])
        self._highlight()

    def set_current(self, current: str | None) -> None:
        self.current = current
        self._highlight()

    def _highlight(self) -> None:
        lv = self.query_one(ListView)
        for i, s in enumerate(self.sessions):
            if s["id"] == self.current:
                with lv.prevent(ListView.Highlighted):
                    lv.index = i
                return

    def on_list_view_selected(self, event: ListView.Selected) -> None:
        event.stop()
        item = event.item
        if isinstance(item, SessionItem) and item.session["id"] != self.current:
            self.post_message(self.Chosen(item.session["id"]))
