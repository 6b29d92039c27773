"""A session as Markdown (``session.export``)."""

from __future__ import annotations

__all__ = ["markdown"]

_ROLE_HEADINGS = {
    "system": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


def markdown(session: dict, messages: list[dict]) -> str:
    """``session`` (a session dict) and its ``messages`` (message dicts, in
    order) as Markdown: a title heading, then one section per message.

    Each section starts ``**User**``, ``**Assistant**``, ``**System**`` or
    ``**Tool**``; a cancelled or failed message says so after the name.
    """
    title = session["title"] or f"Session {session['id']}"
    parts = [f"# {title}"]
    for msg in messages:
        heading = f"**{_ROLE_HEADINGS.get(msg['role'], msg['role'].title())}**"
        if msg["status"] != "complete":
            heading += f" _({msg['status']})_"
        parts.append(f"{heading}\n\n{msg['content']}")
    return "\n\n".join(parts) + "\n"
