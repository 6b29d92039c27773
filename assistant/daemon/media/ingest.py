"""A message's parts made into the parts a session keeps: every medium read, checked and stored.

``ingest`` is blocking (file reads, base64, Pillow, fsync): the chat path runs
it on a thread, before the user's message is stored, so a medium that fails
its checks leaves nothing behind but the error (and at most an orphaned
file in the content-addressed store, never a half-written one).

A kept part: ``{"type": "text", "text"}``, or for a medium
``{"type": "image"|"audio", "sha256", "mime", "name"}`` with what the checks
found (``width``/``height``/``frames`` of an image, ``duration`` of a
recording, in seconds) and a ``note`` where the user should be told
something (an animated GIF reduced to its first frame).
"""

from __future__ import annotations

from typing import Any

from assistant.daemon.media import checks
from assistant.daemon.media.checks import Limits
from assistant.daemon.media.parts import Source
from assistant.daemon.media.store import MediaStore, MediaStoreError
from assistant.protocol import ErrorCode, RPCError

__all__ = ["ingest", "text_of", "media_of", "is_media"]

_KEPT_INFO = ("width", "height", "frames", "duration")


def ingest(content: list[Any], store: MediaStore, limits: Limits) -> list[dict[str, Any]]:
    """``content`` (``parts.parse_content``'s list) as kept parts, each medium stored."""
    out: list[dict[str, Any]] = []
    for item in content:
        if isinstance(item, Source):
            out.append(_medium(item, store, limits))
        else:
            out.append(dict(item))
    return out


def _medium(src: Source, store: MediaStore, limits: Limits) -> dict[str, Any]:
    if src.sha256 is not None:  # one the daemon keeps already: it was checked when it came in
        try:
            store.find(src.sha256, src.mime or "")
        except MediaStoreError as exc:
            raise checks.refuse(ErrorCode.MEDIA_INVALID, src.where, str(exc)) from None
        kind = "image" if (src.mime or "").startswith("image/") else "audio"
        if kind != src.kind:
            raise checks.refuse(ErrorCode.MEDIA_INVALID, src.where, f"the part says {src.kind}, but the stored "
                                f"medium is {src.mime}")
        part = {"type": kind, "sha256": src.sha256, "mime": src.mime}
        if src.name:
            part["name"] = src.name
        return part
    if src.path is not None:
        data = checks.read_path(src.path, limits, src.where)
    else:
        data = checks.decode_base64(src.data or "", limits, src.where)
    checked = checks.check(data, src.kind, limits, src.where)
    try:
        sha, _path = store.put(checked.data, checked.mime)
    except (OSError, MediaStoreError) as exc:
        raise RPCError(ErrorCode.INTERNAL_ERROR, f"{src.where}: the medium could not be stored: {exc}") from None
    part: dict[str, Any] = {"type": checked.kind, "sha256": sha, "mime": checked.mime}
    if src.name:
        part["name"] = src.name
    part.update({k: checked.info[k] for k in _KEPT_INFO if k in checked.info})
    if checked.note:
        part["note"] = checked.note
    return part


def is_media(part: dict[str, Any]) -> bool:
    """Whether a kept part is a medium (not text)."""
    return part.get("type") in ("image", "audio")


def text_of(parts: list[dict[str, Any]]) -> str:
    """A message's text: its text parts, one per line (the ``content`` a session keeps beside the parts)."""
    return "\n".join(p["text"] for p in parts if p.get("type") == "text" and p.get("text"))


def media_of(parts: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A message's media parts."""
    return [p for p in parts or () if is_media(p)]


def display_name(part: dict[str, Any]) -> str:
    """A medium's name as text shows it: the one given, else a short hash with its extension."""
    return part.get("name") or f"{part['sha256'][:12]}.{checks.EXTENSIONS.get(part.get('mime', ''), 'bin')}"
