"""The status bar: connection, model, backend and the last reply's figures."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from assistant.tui.format import stats_parts

STATE_STYLE = {
    "connected": ("●", "green"),
    "connecting": ("○", "yellow"),
    "starting": ("◐", "yellow"),
    "waiting": ("○", "red"),
    "error": ("✖", "red"),
}
STATE_LABEL = {
    "connected": "connected",
    "connecting": "connecting…",
    "starting": "starting the daemon…",
    "waiting": "daemon gone, waiting…",
    "error": "not connected",
}


class StatusBar(Static):
    """One line: ● connected │ model · backend │ 104.7 tok/s · TTFT 41 ms · draft ngram 62% · ctx 38/2048."""

    def __init__(self, *, activity_key: str = "Ctrl+T", **kwargs: Any):
        super().__init__("", markup=False, **kwargs)
        self.activity_key = activity_key
        self.state = "connecting"
        self.model: str | None = None
        self.backend: str | None = None
        self.keep: str = ""  # when the model unloads (keep_alive), as the daemon says
        self.stats: dict[str, Any] | None = None
        self.busy: str = ""
        self.unseen_events = 0

    def set(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        self.update(self.render_text())

    def render_text(self) -> Text:
        mark, colour = STATE_STYLE.get(self.state, ("?", "red"))
        text = Text()
        text.append(f"{mark} ", style=colour)
        text.append(STATE_LABEL.get(self.state, self.state))
        if self.model:
            text.append("  │  ", style="dim")
            text.append(self.model, style="bold")
            if self.backend:
                text.append(f" · {self.backend}")
            if self.keep:
                text.append(f" · {self.keep}", style="dim")
        parts = stats_parts(self.stats)
        if parts:
            text.append("  │  ", style="dim")
            text.append(" · ".join(parts))
        if self.busy:
            text.append("  │  ", style="dim")
            text.append(self.busy, style="italic")
        if self.unseen_events:
            text.append("  │  ", style="dim")
            n = self.unseen_events
            text.append(f"{n} new event{'s' if n != 1 else ''} ({self.activity_key})", style="cyan")
        return text
