"""Attaching an image or audio file to the next message (Ctrl+O).

The dialog asks for a path and refuses, in the dialog, one that cannot be
attached (``attachments.prepare`` says why); the attachment then waits on the
chat screen (``ChatScreen.attachment``) until the message is sent or the
cancel key removes it. The checks themselves are in ``tui/attachments.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from assistant.protocol import RPCError
from assistant.tui import attachments
from assistant.tui.widgets.chat import ChatInput

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen


async def attach(screen: "ChatScreen") -> None:
    """The attach dialog, then the attachment on the chat screen (run in a worker)."""
    from assistant.tui.screens.dialogs import InputDialog

    app = screen.app
    try:  # the skills may have changed since the app connected
        app.skills = (await screen.client.call("skills.list")).get("skills") or []
    except (RPCError, ConnectionError):
        pass

    def check(value: str) -> str | None:
        try:
            attachments.prepare(value, app.skills, app.cwd)
        except attachments.AttachmentError as exc:
            return str(exc)
        return None

    value = await app.push_screen_wait(InputDialog(
        "Attach an image or audio file", placeholder="path, e.g. ~/Pictures/cat.png", ok="Attach",
        hint="Images go to a vision.* skill, audio to an audio.* skill; its result is sent with your message.",
        check=check))
    if value is None:
        return
    if attach_path(screen, value) is None:
        screen.query_one(ChatInput).focus()


def attach_path(screen: "ChatScreen", text: str) -> str | None:
    """Attach the file at ``text`` to the next message; the problem (also notified), or None."""
    app = screen.app
    try:
        screen.attachment = attachments.prepare(text, app.skills, app.cwd)
    except attachments.AttachmentError as exc:
        screen.notify(str(exc), severity="error")
        return str(exc)
    screen.show_attachment()
    screen.refresh_bindings()
    return None
