"""The plugins screen: each plugin's status, version, source and hooks; the skills they offer."""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, Static

STATUS_STYLE = {"loaded": "green", "failed": "bold red", "disabled": "dim"}


class PluginsScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f4", "close", "Close", show=False)]

    def __init__(self, plugins: list[dict[str, Any]], skills: list[dict[str, Any]]):
        super().__init__(classes="dialog-screen")
        self.plugins = plugins
        self.skills = skills

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog plugins-dialog"):
            yield Label(f"Plugins ({len(self.plugins)})", classes="dialog-title")
            table = DataTable(id="plugins-table", cursor_type="row", zebra_stripes=True)
            table.add_columns("Name", "Status", "Version", "Source", "Hooks")
            for p in self.plugins:
                table.add_row(p.get("name", "?"), Text(p.get("status", "?"), style=STATUS_STYLE.get(p.get("status"), "")),
                              p.get("version") or "-", p.get("source") or "-", ", ".join(p.get("hooks") or []) or "-")
            yield table
            problems = []
            for p in self.plugins:
                if p.get("error"):
                    problems.append(f"{p['name']}: {p['error']}")
                for problem in p.get("problems") or []:
                    problems.append(f"{p['name']}: {problem}")
            if problems:
                yield Static("\n".join(problems), classes="plugin-problems", markup=False)
            yield Label(f"Skills ({len(self.skills)})", classes="dialog-title")
            skills = DataTable(id="skills-table", cursor_type="row", zebra_stripes=True)
            skills.add_columns("Skill", "Plugin", "Description")
            for s in self.skills:
                desc = (s.get("description") or "").strip().splitlines()
                skills.add_row(s.get("name", "?"), s.get("plugin", "?"), desc[0] if desc else "")
            yield skills
            yield Static("An attached image or recording (Ctrl+O) goes to the model when it reads it, else to "
                         "vision.ocr / audio.transcribe. Esc closes.", classes="dialog-hint", markup=False)

    def action_close(self) -> None:
        self.dismiss(None)
