"""A session as Markdown (``session.export``), with its media beside it.

A message with media (its ``parts``) shows each image as an image link and
each recording as a link, to ``media/<sha256>.<ext>`` relative to the
Markdown file; :func:`write` puts the Markdown at a path and copies the media
files from the daemon's media store into that ``media/`` folder (named by
content, so exports in one folder share it and never clash).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from assistant.daemon.files import write_atomically
from assistant.daemon.media.checks import EXTENSIONS

__all__ = ["markdown", "media_files", "write", "MEDIA_DIR"]

MEDIA_DIR = "media"

_ROLE_HEADINGS = {
    "system": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


def _file_name(part: dict[str, Any]) -> str:
    return f"{part['sha256']}.{EXTENSIONS.get(part.get('mime', ''), 'bin')}"


def _label(part: dict[str, Any]) -> str:
    name = part.get("name") or _file_name(part)
    return name.replace("[", "(").replace("]", ")")


def _media_line(part: dict[str, Any], media_dir: str) -> str:
    link = f"{media_dir}/{_file_name(part)}"
    if part["type"] == "image":
        return f"![{_label(part)}]({link})" + (f"\n\n_{part['note']}_" if part.get("note") else "")
    seconds = part.get("duration")
    return f"[Audio: {_label(part)}]({link})" + (f" ({seconds:g} s)" if isinstance(seconds, (int, float)) else "")


def _body(msg: dict, media_dir: str) -> str:
    parts = msg.get("parts")
    if not parts:
        return msg["content"]
    pieces = []
    for part in parts:
        if part.get("type") in ("image", "audio") and isinstance(part.get("sha256"), str):
            pieces.append(_media_line(part, media_dir))
        elif part.get("type") == "text" and part.get("text"):
            pieces.append(part["text"])
    return "\n\n".join(pieces)


def markdown(session: dict, messages: list[dict], media_dir: str = MEDIA_DIR) -> str:
    """``session`` (a session dict) and its ``messages`` (message dicts, in
    order) as Markdown: a title heading, then one section per message.

    Each section starts ``**User**``, ``**Assistant**``, ``**System**`` or
    ``**Tool**``; a cancelled or failed message says so after the name. Media
    link to ``<media_dir>/<sha256>.<ext>``.
    """
    title = session["title"] or f"Session {session['id']}"
    parts = [f"# {title}"]
    for msg in messages:
        heading = f"**{_ROLE_HEADINGS.get(msg['role'], msg['role'].title())}**"
        if msg["status"] != "complete":
            heading += f" _({msg['status']})_"
        parts.append(f"{heading}\n\n{_body(msg, media_dir)}")
    return "\n\n".join(parts) + "\n"


def media_files(messages: list[dict]) -> list[dict[str, Any]]:
    """The media of ``messages``, once each: ``{sha256, mime, name, file}`` (``file``:
    its path relative to the Markdown, ``media/<sha256>.<ext>``)."""
    seen: dict[str, dict[str, Any]] = {}
    for msg in messages:
        for part in msg.get("parts") or ():
            if part.get("type") in ("image", "audio") and isinstance(part.get("sha256"), str) \
                    and part["sha256"] not in seen:
                seen[part["sha256"]] = {"sha256": part["sha256"], "mime": part.get("mime"), "name": part.get("name"),
                                        "file": f"{MEDIA_DIR}/{_file_name(part)}"}
    return list(seen.values())


def write(path: Path, text: str, files: list[tuple[Path, str]]) -> list[str]:
    """Write the Markdown ``text`` at ``path`` and copy each (stored file, relative name) of
    ``files`` beside it; returns the relative names copied (a file already there with the
    same size is content-addressed, so it is the same: not copied again). Files are 0600,
    written to a temporary name and renamed; the media folder is created 0700."""
    folder = path.parent
    copied = []
    if files:
        media = folder / MEDIA_DIR
        media.mkdir(mode=0o700, exist_ok=True)
        for source, rel in files:
            target = folder / rel
            if target.is_file() and target.stat().st_size == source.stat().st_size:
                continue
            with open(source, "rb") as src:
                write_atomically(target, lambda out, src=src: shutil.copyfileobj(src, out))
            copied.append(rel)
    write_atomically(path, text.encode("utf-8"))
    return copied
