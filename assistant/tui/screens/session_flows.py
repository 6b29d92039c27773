"""The chat screen's sessions: which one is shown, and the actions on them.

The state is the screen's: ``screen.sessions`` (the daemon's list, most
recent first, as the sidebar shows it) and ``screen.session`` (the current
one, as ``sessions.get`` returned it, without its messages). The functions
here load them from the daemon and show them. ``rename``, ``delete`` and
``export`` are dialog flows: each runs in a worker of the screen
(``ChatScreen.run_flow``: waiting for a dialog needs one); a failure is a
notification, and the session stays as it was.
"""

from __future__ import annotations

import os
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from textual.app import SystemCommand

from assistant.tui.connection import CALL_FAILURES, failure_text
from assistant.tui.format import session_title
from assistant.tui.widgets.chat import ChatView, MessageView
from assistant.tui.widgets.sidebar import SessionSidebar

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen

SHOWN_MESSAGES = 200  # the most recent messages of a session that are drawn
LISTED = 200  # sessions in the sidebar


async def refresh(screen: "ChatScreen") -> None:
    """Fetch the session list again and show it in the sidebar."""
    if screen.client is None:
        return
    data = await screen.client.call("sessions.list", {"limit": LISTED})
    screen.sessions = data.get("sessions") or []
    await screen.query_one(SessionSidebar).show(screen.sessions, screen.session["id"] if screen.session else None)


async def open_session(screen: "ChatScreen", sid: str) -> None:
    """Make ``sid`` the current session and show its messages."""
    if screen.client is None:
        return
    data = await screen.client.call("sessions.get", {"id": sid})
    views = take(screen, data)
    chat = screen.query_one(ChatView)
    await chat.clear()
    if views:
        await chat.mount_all(views)
    chat.scroll_end(animate=False, immediate=True)
    chat.anchor()
    show_current(screen)


def take(screen: "ChatScreen", data: dict[str, Any]) -> list[MessageView]:
    """Make ``data`` (sessions.get) the current session; its messages as views, not yet mounted."""
    messages = data.pop("messages", [])
    screen.session = data
    screen.last_stats = None
    views = []
    for m in messages[-SHOWN_MESSAGES:]:
        if m["role"] not in ("user", "assistant"):
            continue
        # a message with media: its parts, so the view names each image or recording
        views.append(MessageView(m["role"], m.get("parts") or m["content"], message_id=m["id"], status=m.get("status", "complete"),
                                 model=(m.get("stats") or {}).get("model")))
        if m["role"] == "assistant" and m.get("stats"):
            screen.last_stats = m["stats"]
    return views


def show_current(screen: "ChatScreen") -> None:
    """The current session's figures, model, place in the sidebar and title."""
    screen.status_bar.set(stats=screen.last_stats)
    screen.update_model_status()
    screen.query_one(SessionSidebar).set_current(screen.session["id"])
    screen.sub_title = session_title(screen.session)


async def create(screen: "ChatScreen") -> None:
    """A new session in the daemon, made the current one."""
    if screen.client is None:
        return
    created = await screen.client.call("sessions.create", {})
    screen.session = created
    await refresh(screen)
    await open_session(screen, created["id"])


async def reopen(screen: "ChatScreen") -> None:
    """After connecting: the session that was open (it is still there after a reconnect), else the
    most recent one, else a new one."""
    await refresh(screen)
    wanted = screen.session["id"] if screen.session else None
    ids = [s["id"] for s in screen.sessions]
    if wanted in ids:
        await open_session(screen, wanted)
    elif ids:
        await open_session(screen, ids[0])
    else:
        await create(screen)


def palette_commands(screen: "ChatScreen") -> Iterable[SystemCommand]:
    """The palette's "Open session:" entries (found by typing, not listed)."""
    for s in screen.sessions:
        yield SystemCommand(f"Open session: {session_title(s)}", f"{s.get('message_count', 0)} messages",
                            partial(_choose, screen, s["id"]), discover=False)


def _choose(screen: "ChatScreen", sid: str) -> None:
    # as if chosen in the sidebar: the screen refuses while a reply is coming
    screen.post_message(SessionSidebar.Chosen(sid))


async def rename(screen: "ChatScreen") -> None:
    """Ask for a title (F2) and save it."""
    from assistant.tui.screens.dialogs import InputDialog

    sid = screen.session["id"]
    value = await screen.app.push_screen_wait(InputDialog(
        "Rename session", value=screen.session.get("title") or "", placeholder="a title", ok="Rename",
        check=lambda v: None if v.strip() else "Give a title."))
    if value is None:
        return
    try:
        updated = await screen.client.call("sessions.update", {"id": sid, "title": value.strip()})
    except CALL_FAILURES as exc:
        screen.notify(f"Rename failed: {failure_text(exc)}", severity="error")
        return
    if screen.session and screen.session["id"] == sid:
        screen.session["title"] = updated.get("title")
        screen.sub_title = session_title(screen.session)
    await refresh(screen)


async def delete(screen: "ChatScreen") -> None:
    """Ask first (F8), delete, then open the most recent session left (or a new one)."""
    from assistant.tui.screens.dialogs import ConfirmDialog

    sid = screen.session["id"]
    ok = await screen.app.push_screen_wait(ConfirmDialog(
        f"Delete the session “{session_title(screen.session)}” and its "
        f"{len(screen.query_one(ChatView).messages())} messages? This cannot be undone.", yes="Delete"))
    if not ok:
        return
    try:
        await screen.client.call("sessions.delete", {"id": sid})
        screen.session = None
        await refresh(screen)
        if screen.sessions:
            await open_session(screen, screen.sessions[0]["id"])
        else:
            await create(screen)
    except CALL_FAILURES as exc:
        screen.notify(f"Delete failed: {failure_text(exc)}", severity="error")
        return
    screen.notify("Session deleted.")


def resolve(value: str, cwd: Path) -> Path:
    """The path typed in the export dialog: ``~`` expanded, relative to ``cwd``."""
    path = Path(os.path.expanduser(value.strip()))
    return path if path.is_absolute() else cwd / path


def export_problem(value: str, cwd: Path) -> str | None:
    """Why the Markdown cannot be written to ``value``, or None when it can."""
    if not value.strip():
        return "Give a file path."
    path = resolve(value, cwd)
    if path.is_dir():
        return f"{path} is a folder; give a file name."
    if not path.parent.is_dir():
        return f"The folder {path.parent} does not exist."
    if not os.access(path.parent, os.W_OK):
        return f"Cannot write in {path.parent}: permission denied."
    return None


async def export(screen: "ChatScreen") -> None:
    """Ask for a file (Ctrl+S; the default is named after the title) and write the Markdown there."""
    from assistant.tui.screens.dialogs import InputDialog

    cwd = screen.app.cwd
    sid = screen.session["id"]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", session_title(screen.session)).strip("-").lower() or sid
    value = await screen.app.push_screen_wait(InputDialog(
        "Export session to Markdown", value=str(cwd / f"{slug}.md"), ok="Export",
        check=lambda v: export_problem(v, cwd)))
    if value is None:
        return
    path = resolve(value, cwd)
    try:
        data = await screen.client.call("sessions.export", {"id": sid})
        path.write_text(data["markdown"], encoding="utf-8")
    except CALL_FAILURES as exc:
        screen.notify(f"Export failed: {failure_text(exc)}", severity="error")
        return
    except OSError as exc:
        screen.notify(f"Export failed: cannot write {path}: {exc.strerror or exc}", severity="error")
        return
    screen.notify(f"Exported to {path}")
