"""The help screen: every key, from the effective bindings (config included)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

from assistant.tui.keys import ACTIONS, display_key

EXTRA = (
    ("Ctrl+P", "Command palette", "Every action, plus switching model, backend, drafter and theme."),
    ("Tab / Shift+Tab", "Move focus", "Between the input, the messages, the sessions and the panels."),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1", "close", "Close", show=False)]

    def __init__(self, keys: dict[str, str], config_hint: str = ""):
        super().__init__(classes="dialog-screen")
        self.keys = keys
        self.config_hint = config_hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help-dialog"):
            yield Label("Keys", classes="dialog-title")
            table = DataTable(id="help-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("Key", "Action", "What it does")
            for a in ACTIONS:
                table.add_row(display_key(self.keys[a.id]), a.description, a.help or a.description)
            for key, name, text in EXTRA:
                table.add_row(key, name, text)
            yield table
            yield Static("Change keys in the config file under tui: bindings: (see config.example.yaml)."
                         + (f"\n{self.config_hint}" if self.config_hint else "") + "  Esc closes.",
                         classes="dialog-hint", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
