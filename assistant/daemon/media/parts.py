"""A message's content parts as clients send them, checked and normalised.

A content value is a string, or a list of parts (docs/protocol.md, "Media"):

- ``{"type": "text", "text": "..."}``
- ``{"type": "image" | "audio", "path": "/abs/or/~/path"}``, or ``"data": "<base64>"``,
  or ``"sha256": "<hex>"`` (a medium the daemon already keeps, as ``sessions.get``
  shows it); optional ``"name"``, optional ``"mime"`` (a hint; the bytes decide)
- OpenAI's ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``
  (``image_url`` may be the URL string itself) and
  ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"|"mp3"|"flac"}}``

Paths (and ``file://`` URLs) and stored hashes are taken only where the
caller is ``local`` (the JSON-RPC socket, whose peer is the same user: the
daemon reads what that user could read); over HTTP only inline data is, and
an ``http(s)://`` URL never is (the daemon fetches nothing). A bad shape is
``INVALID_PARAMS`` naming the part (``prompt[1]``, ``messages[0].content[2]``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from assistant.daemon.media.store import is_sha256
from assistant.protocol import ErrorCode, RPCError

__all__ = ["Source", "parse_content", "has_media", "MAX_MEDIA_PARTS", "MAX_NAME_CHARS"]

MAX_MEDIA_PARTS = 32  # in one request: each may be media.max_bytes to read, check and store
MAX_NAME_CHARS = 120
_AUDIO_FORMATS = ("wav", "mp3", "flac")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\[\]]")


@dataclass(frozen=True)
class Source:
    """One media part as a client gave it, not read yet: exactly one of ``path``
    (expanded, absolute), ``data`` (base64 text) or ``sha256`` (already stored)."""

    kind: str  # "image" | "audio"
    where: str  # the part, as errors name it: "prompt[1]"
    name: str | None = None
    path: str | None = None
    data: str | None = None
    sha256: str | None = None
    mime: str | None = None  # a stored medium's type (with ``sha256``)


def _invalid(where: str, message: str) -> RPCError:
    return RPCError(ErrorCode.INVALID_PARAMS, f"parameter {where!r}: {message}", {"part": where})


def clean_name(value: Any, where: str) -> str | None:
    """A medium's display name: a string, its last path component, no control
    characters or brackets (it goes into text the model reads), at most 120 characters."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid(where, f"'name' must be a string, got {type(value).__name__}")
    name = _UNPRINTABLE.sub("", value.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:MAX_NAME_CHARS] or None


def has_media(value: Any) -> bool:
    """Whether a content value (a string or a list of parts) holds any non-text part."""
    return isinstance(value, list) and any(not (isinstance(p, dict) and p.get("type") == "text") for p in value)


def parse_content(value: Any, where: str, *, local: bool, allow_empty: bool = False) -> str | list[Any]:
    """``value`` as a string, or a list of text parts (``{"type": "text", "text"}``) and
    ``Source`` objects, in order. ``local``: paths and stored hashes are taken."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _invalid(where, f"expected a string or a list of content parts, got {type(value).__name__}")
    if not value and not allow_empty:
        raise _invalid(where, "the list of content parts is empty")
    out: list[Any] = []
    media = 0
    for i, part in enumerate(value):
        at = f"{where}[{i}]"
        parsed = _part(part, at, local)
        if isinstance(parsed, Source):
            media += 1
            if media > MAX_MEDIA_PARTS:
                raise _invalid(where, f"more than {MAX_MEDIA_PARTS} media parts in one message")
        out.append(parsed)
    return out


def _part(part: Any, where: str, local: bool) -> dict[str, str] | Source:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _invalid(where, "a content part must be an object with a 'type' (text, image, audio, image_url, "
                              "input_audio)")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _invalid(where, "a text part needs 'text': a string")
        return {"type": "text", "text": part["text"]}
    name = clean_name(part.get("name"), where)
    if kind in ("image", "audio"):
        given = [k for k in ("path", "data", "sha256", "url") if part.get(k) is not None]
        if len(given) != 1:
            raise _invalid(where, f"an {kind} part needs exactly one of 'path' (a file), 'data' (base64) or "
                                  f"'sha256' (a stored medium); got {', '.join(given) or 'none'}")
        key = given[0]
        value = part[key]
        if not isinstance(value, str) or not value:
            raise _invalid(where, f"'{key}' must be a non-empty string")
        if key == "url":
            return _url(kind, value, where, name, local)
        if key == "data":
            return Source(kind, where, name, data=_strip_data_url(value, where))
        if key == "sha256":
            if not local:
                raise _invalid(where, "a stored medium ('sha256') can be named only over the daemon's socket; "
                                      "send the data inline")
            mime = part.get("mime")
            if not is_sha256(value) or not isinstance(mime, str):
                raise _invalid(where, "a stored medium needs 'sha256' (64 lowercase hex digits) and its 'mime'")
            return Source(kind, where, name, sha256=value, mime=mime)
        return _path(kind, value, where, name, local)
    if kind == "image_url":
        inner = part.get("image_url")
        url = inner.get("url") if isinstance(inner, dict) else inner
        if not isinstance(url, str) or not url:
            raise _invalid(where, "an image_url part needs image_url.url: a data: URL")
        return _url("image", url, where, name, local)
    if kind == "input_audio":
        inner = part.get("input_audio")
        if not isinstance(inner, dict) or not isinstance(inner.get("data"), str) or not inner["data"]:
            raise _invalid(where, "an input_audio part needs input_audio.data: base64 audio")
        fmt = inner.get("format")
        if fmt is not None and fmt not in _AUDIO_FORMATS:
            raise _invalid(where, f"input_audio.format {fmt!r} is not taken (wav, mp3, flac)")
        return Source("audio", where, name, data=inner["data"])
    raise _invalid(where, f"unknown content part type {kind!r} (text, image, audio, image_url, input_audio)")


def _strip_data_url(value: str, where: str) -> str:
    """Base64 text, from a bare string or a ``data:...;base64,`` URL."""
    if value.startswith("data:"):
        head, sep, body = value.partition(",")
        if not sep or not head.endswith(";base64"):
            raise _invalid(where, "a data: URL must be base64 (data:<type>;base64,<data>)")
        return body
    return value


def _url(kind: str, url: str, where: str, name: str | None, local: bool) -> Source:
    if url.startswith("data:"):
        return Source(kind, where, name, data=_strip_data_url(url, where))
    scheme = urlsplit(url).scheme.lower() if ":" in url[:12] else ""
    if scheme == "file":
        if not local:
            raise _invalid(where, "file: URLs are not taken over HTTP (the daemon discloses no files); "
                                  "send the data inline as a data: URL")
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise _invalid(where, f"a file: URL must name a local file, not one on {parts.netloc!r}")
        return _path(kind, unquote(parts.path), where, name, local)
    if scheme in ("http", "https"):
        raise _invalid(where, "the daemon does not fetch URLs (no server-side requests); send the data inline "
                              "as a data: URL" + (" or a local path" if local else ""))
    if scheme and len(scheme) > 1:  # (one letter: a Windows drive, left to the path check)
        raise _invalid(where, f"{scheme}: URLs are not taken; send the data inline as a data: URL")
    return _path(kind, url, where, name, local)


def _path(kind: str, path: str, where: str, name: str | None, local: bool) -> Source:
    if not local:
        raise _invalid(where, "file paths are not taken over HTTP (the daemon discloses no files); "
                              "send the data inline (base64, or a data: URL)")
    if "\x00" in path:
        raise _invalid(where, "a path cannot hold a NUL character")
    expanded = os.path.expanduser(path)
    if not os.path.isabs(expanded):
        raise _invalid(where, f"a path must be absolute (or start with ~): {path!r}; the daemon's working "
                              "directory is not the client's")
    return Source(kind, where, name or clean_name(os.path.basename(expanded), where), path=expanded)
