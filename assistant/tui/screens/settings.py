"""The settings screen: the current session's title, system prompt, sampling
settings, model, backend and drafter. Saved through the daemon
(``sessions.update``; a model or backend change also ``models.load``)."""

from __future__ import annotations

from typing import Any, Callable

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, TextArea

DRAFTERS = ("auto", "ngram", "draft", "mtp", "off")
DEFAULT = "default"

# name, type, what is valid (in words), check
SAMPLING: tuple[tuple[str, type, str, Callable[[float], bool]], ...] = (
    ("temperature", float, "a number >= 0", lambda v: v >= 0),
    ("top_p", float, "a number in (0, 1]", lambda v: 0 < v <= 1),
    ("top_k", int, "an integer >= 0", lambda v: v >= 0),
    ("min_p", float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    ("repeat_penalty", float, "a number > 0", lambda v: v > 0),
    ("max_tokens", int, "an integer >= 1", lambda v: v >= 1),
    ("seed", int, "an integer", lambda v: True),
)


def parse_sampling(values: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Typed settings from the fields' text (blank: the daemon's default), and the problems."""
    out: dict[str, Any] = {}
    problems = []
    for name, typ, expected, check in SAMPLING:
        text = (values.get(name) or "").strip()
        if not text:
            continue
        try:
            value = typ(text) if typ is float else int(text)
        except ValueError:
            problems.append(f"{name}: expected {expected}, got {text!r}")
            continue
        if not check(value):
            problems.append(f"{name}: expected {expected}, got {text!r}")
            continue
        out[name] = value
    return out, problems


class SettingsScreen(ModalScreen[dict[str, Any] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False),
                Binding("ctrl+s", "save", "Save", show=False, priority=True)]

    def __init__(self, session: dict[str, Any], *, models: list[str], backends: list[str], model: str,
                 backend: str):
        super().__init__(classes="dialog-screen")
        self.session = session
        self.models = models
        self.backends = backends
        self.model = model
        self.backend = backend

    def compose(self) -> ComposeResult:
        settings = self.session.get("settings") or {}
        with Vertical(classes="dialog settings-dialog"):
            yield Label("Session settings", classes="dialog-title")
            with VerticalScroll(classes="settings-body"):
                yield Label("Title", classes="field-label")
                yield Input(self.session.get("title") or "", placeholder="New chat", id="title", compact=True)
                yield Label("System prompt (this session)", classes="field-label")
                yield TextArea(self.session.get("system_prompt") or "", id="system", soft_wrap=True,
                               tab_behavior="focus", compact=True)
                with Horizontal(classes="select-row"):
                    with Vertical():
                        yield Label("Model", classes="field-label")
                        yield Select([(m, m) for m in self.models], value=self.model, allow_blank=False,
                                     id="model", compact=True)
                    with Vertical():
                        yield Label("Backend", classes="field-label")
                        yield Select([(b, b) for b in self.backends], value=self.backend, allow_blank=False,
                                     id="backend", compact=True)
                    with Vertical():
                        yield Label("Drafter", classes="field-label")
                        draft = settings.get("draft") or DEFAULT
                        options = [("daemon default", DEFAULT)] + [(d, d) for d in DRAFTERS]
                        if draft not in (DEFAULT, *DRAFTERS):
                            options.append((draft, draft))
                        yield Select(options, value=draft, allow_blank=False, id="draft", compact=True)
                yield Label("Sampling (blank: the daemon's default)", classes="field-label")
                with Grid(classes="sampling-grid"):
                    for name, _typ, expected, _check in SAMPLING:
                        yield Label(name, classes="grid-label")
                        value = settings.get(name)
                        yield Input("" if value is None else str(value), placeholder=expected, id=f"s-{name}",
                                    compact=True)
            yield Static("", id="settings-error", markup=False)
            with Horizontal(classes="dialog-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#title", Input).focus()

    def values(self) -> tuple[dict[str, Any] | None, list[str]]:
        raw = {name: self.query_one(f"#s-{name}", Input).value for name, *_ in SAMPLING}
        sampling, problems = parse_sampling(raw)
        draft = self.query_one("#draft", Select).value
        settings = dict(self.session.get("settings") or {})
        for name, *_ in SAMPLING:
            settings.pop(name, None)
        settings.update(sampling)
        if draft and draft != DEFAULT:
            settings["draft"] = draft
        else:
            settings.pop("draft", None)
        result = {
            "title": self.query_one("#title", Input).value.strip() or None,
            "system": self.query_one("#system", TextArea).text,
            "model": self.query_one("#model", Select).value,
            "backend": self.query_one("#backend", Select).value,
            "settings": settings,
        }
        return (None if problems else result), problems

    @on(Button.Pressed, "#save")
    def action_save(self) -> None:
        result, problems = self.values()
        error = self.query_one("#settings-error", Static)
        if problems:
            error.update("Not saved: " + "; ".join(problems))
            error.add_class("-shown")
            return
        self.dismiss(result)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
