"""Attaching an image or audio file to the next message (Ctrl+O).

The dialog asks for a path and refuses, in the dialog, one that cannot be
attached (``attachments.prepare`` says why); the attachment then waits on the
chat screen (``ChatScreen.attachments``; several may wait) until the message
is sent or the cancel key removes it. The line above the input says how the
model will get each file, from what the daemon said about the model and its
skills, refreshed here. The checks themselves are in ``tui/attachments.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from assistant.protocol import RPCError
from assistant.tui import attachments
from assistant.tui.widgets.chat import ChatInput

if TYPE_CHECKING:
    from assistant.tui.screens.chat import ChatScreen

HINT = ("The file goes to the model with your message. A model that cannot see images or hear audio gets "
        "the daemon's OCR text or transcript instead (vision.ocr, audio.transcribe).")


async def attach(screen: "ChatScreen") -> None:
    """The attach dialog, then the attachment on the chat screen (run in a worker)."""
    from assistant.tui.screens.dialogs import InputDialog

    app = screen.app
    client = screen.client
    try:  # the skills (the fallbacks) and the loaded models (what they take) may have changed
        app.skills = (await client.call("skills.list")).get("skills") or []
        await app.refresh_models(client)
    except (RPCError, ConnectionError):
        pass

    def check(value: str) -> str | None:
        try:
            attachments.prepare(value, app.cwd, max_bytes(screen))
        except attachments.AttachmentError as exc:
            return str(exc)
        return None

    value = await app.push_screen_wait(InputDialog(
        "Attach an image or audio file", placeholder="path, e.g. ~/Pictures/cat.png", ok="Attach",
        hint=HINT, check=check))
    if value is None:
        return
    if attach_path(screen, value) is None:
        screen.query_one(ChatInput).focus()


def attach_path(screen: "ChatScreen", text: str) -> str | None:
    """Attach the file at ``text`` to the next message; the problem (also notified), or None."""
    app = screen.app
    try:
        att = attachments.prepare(text, app.cwd, max_bytes(screen))
    except attachments.AttachmentError as exc:
        screen.notify(str(exc), severity="error")
        return str(exc)
    screen.attachments.append(att)
    screen.show_attachment()
    screen.refresh_bindings()
    return None


def max_bytes(screen: "ChatScreen") -> int | None:
    """The daemon's size limit for a medium, when its ``initialize`` answer says one
    (``media.max_bytes``); None: only the daemon checks."""
    client: Any = screen.client
    media = (getattr(client, "server_info", None) or {}).get("media") if client is not None else None
    limit = media.get("max_bytes") if isinstance(media, dict) else None
    return limit if isinstance(limit, int) and limit > 0 else None
