"""The live activity panel: daemon and automation events as they happen."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from assistant.tui.format import event_summary, event_time

SOURCE_STYLE = {"daemon": "cyan", "filewatch": "magenta"}
MAX_EVENTS = 500


class ActivityPanel(Vertical):
    """Events from ``events.subscribe``: time, source, what happened (newest at the bottom)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.count = 0

    def compose(self) -> ComposeResult:
        yield Label("Activity", classes="panel-title")
        yield VerticalScroll(Static("No events yet.", classes="activity-empty"), id="activity-log",
                             can_focus=False)

    def on_mount(self) -> None:
        self.query_one("#activity-log").anchor()

    def add_event(self, event: dict[str, Any]) -> None:
        self.add_events([event])

    def add_events(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        log = self.query_one("#activity-log", VerticalScroll)
        for empty in log.query(".activity-empty"):
            empty.remove()
        log.mount_all([Static(self._line(e), classes="activity-event", markup=False) for e in events])
        self.count += len(events)
        shown = log.query(".activity-event")
        for extra in list(shown)[: max(0, len(shown) - MAX_EVENTS)]:
            extra.remove()

    def _line(self, event: dict[str, Any]) -> Text:
        source = str(event.get("source") or "?")
        data = event.get("data")
        failed = isinstance(data, dict) and bool(data.get("error"))
        line = Text()
        line.append(event_time(event.get("time")), style="dim")
        line.append(" ")
        line.append(source, style=SOURCE_STYLE.get(source, "green"))
        line.append(" ")
        line.append(event_summary(event), style="red" if failed else "")
        return line
