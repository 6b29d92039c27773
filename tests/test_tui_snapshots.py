"""Snapshot tests of the TUI's screens (pytest-textual-snapshot).

They render against ``FakeClient`` (canned sessions, plugins and events with
fixed timestamps), at a fixed terminal size, with the clock's time zone pinned,
so the SVGs in ``tests/__snapshots__/test_tui_snapshots/`` hold no clock,
pid, path or timing. After a deliberate change of the UI, look at the new
pictures and accept them with ``./dev test tests/test_tui_snapshots.py --snapshot-update``.
Behaviour is tested against the real daemon in test_tui.py.
"""

from __future__ import annotations

import time

import pytest

from assistant.tui.app import AssistantApp
from tui_fake import FakeClient

SIZE = (120, 36)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def make_app() -> AssistantApp:
    fake = FakeClient()

    async def factory(on_starting, start):
        return fake

    app = AssistantApp(client_factory=factory, history_file=None, theme="textual-dark")
    app.fake = fake
    return app


async def ready(pilot) -> None:
    app = pilot.app
    while app.connected_once is None or not app.connected_once.is_set():
        await pilot.pause(0.02)
    await pilot.pause()
    await pilot.wait_for_scheduled_animations()


def test_main_screen(snap_compare):
    """Sidebar with three sessions, a reply with a highlighted code block, the status line with
    model, backend, tokens/s, TTFT, drafter, acceptance and context, and the key footer."""
    assert snap_compare(make_app(), terminal_size=SIZE, run_before=ready)


def test_sessions_sidebar_focused(snap_compare):
    """The sidebar has focus: the footer shows the session keys (new, rename, delete, export)."""

    async def run_before(pilot):
        await ready(pilot)
        pilot.app.query_one("#session-list").focus()
        await pilot.press("down")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare):
    """F3: the current session's title, system prompt, model, backend, drafter and sampling."""

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f3")
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_plugins_screen(snap_compare):
    """F4: plugins with status (loaded, failed with its error, disabled) and the skills."""

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f4")
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_activity_panel(snap_compare):
    """Ctrl+T: the live activity panel with the daemon's and an automation's events."""

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("ctrl+t")
        await pilot.pause()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    """F1: every key, with what it does."""

    async def run_before(pilot):
        await ready(pilot)
        await pilot.press("f1")
        await pilot.pause(0.1)
        await pilot.wait_for_scheduled_animations()

    assert snap_compare(make_app(), terminal_size=SIZE, run_before=run_before)
