"""At chat time: each media part of the conversation read natively, turned into text, or refused.

Per part, in order of preference:

- **native**: the model's backend reads the kind (``Backend.media_support``):
  the part becomes ``Backend.media_marker()`` in the message text and a
  ``MediaInput`` (the stored file) for ``Backend.tokenize_media``;
- **fallback**: a skill turns it into text (``vision.ocr`` for images,
  ``audio.transcribe`` for audio; off with ``media.fallback: false``), marked
  as such in the text the model reads (``[Image scan.png — text read by OCR:
  ...]``, ``[Audio memo.wav — transcript: ...]``). The text is cached by
  sha256 (``media_text``, in the store) so history is not read again every turn;
- neither: ``MEDIA_UNSUPPORTED``, saying what would help.

The result says which paths ran (``Routed.label``: the reply's ``stats.media``,
"native", "ocr", "transcript", several joined by "+").
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from backends.media import MediaInput

from assistant.daemon.media.ingest import display_name, is_media, media_of
from assistant.daemon.media.store import MediaStore, MediaStoreError
from assistant.protocol import ErrorCode, RPCError

__all__ = ["Routed", "route", "FALLBACKS", "ORDER", "fallback_text", "remote_messages", "needs_routing"]

# kind -> (the fallback skill, the stats name of that path)
FALLBACKS = {"image": ("vision.ocr", "ocr"), "audio": ("audio.transcribe", "transcript")}
ORDER = ("native", "ocr", "transcript", "remote")
_PLUGINS = {"vision.ocr": "vision", "audio.transcribe": "audio"}


@dataclass
class Routed:
    """The conversation as the model gets it: text ``messages`` (a marker where each
    native medium goes), the native ``media`` in marker order, and the paths taken."""

    messages: list[dict[str, Any]]
    media: list[MediaInput] = field(default_factory=list)
    paths: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str | None:
        """``stats.media``: the paths taken, in a fixed order, joined by "+" (None: no media)."""
        return "+".join(p for p in ORDER if p in self.paths) or None


def needs_routing(messages: list[dict[str, Any]]) -> bool:
    """Whether any message holds media parts."""
    return any(media_of(m.get("parts")) for m in messages)


def fallback_text(kind: str, name: str, text: str) -> str:
    """A medium as the fallback's text, marked so the model (and a reader) knows what it is."""
    text = text.strip()
    if kind == "image":
        return f"[Image {name} — text read by OCR: {text}]" if text else f"[Image {name} — OCR found no text]"
    return f"[Audio {name} — transcript: {text}]" if text else f"[Audio {name} — transcript: (no speech found)]"


CacheGet = Callable[[str, str], Awaitable[str | None]]
CachePut = Callable[[str, str, str], Awaitable[None]]
SkillCall = Callable[[str, dict[str, Any]], Awaitable[Any]]


async def route(messages: list[dict[str, Any]], *, native: frozenset[str], marker: str, store: MediaStore,
                skills: Any, call_skill: SkillCall, cache_get: CacheGet, cache_put: CachePut,
                fallback: bool = True, model: str = "the model") -> Routed:
    """``messages`` ({role, content, parts?}) routed part by part (see the module docstring).
    ``native``: the kinds the backend reads; ``skills``: the skills installed (a
    container of names); ``fallback``: the config's ``media.fallback``."""
    plan = _plan(messages, native, skills, fallback, model)
    escape = bool(plan["native"])
    out = Routed([])
    for m in messages:
        parts = m.get("parts")
        if not media_of(parts):
            content = m["content"]
            out.messages.append({"role": m["role"], "content": _escaped(content, marker) if escape else content})
            continue
        pieces: list[str] = []
        for part in parts:
            if not is_media(part):
                text = part.get("text") or ""
                if text:
                    pieces.append(_escaped(text, marker) if escape else text)
                continue
            if part["type"] in native:
                path = _stored(store, part)
                out.media.append(MediaInput(part["type"], str(path), part["sha256"], part["mime"]))
                out.paths.add("native")
                pieces.append(marker)
            else:
                skill, method = FALLBACKS[part["type"]]
                text = await _fallback(part, skill, method, store, call_skill, cache_get, cache_put)
                out.paths.add(method)
                pieces.append(_escaped(text, marker) if escape else text)
            if part.get("note"):
                out.notes.append(f"{display_name(part)}: {part['note']}")
        out.messages.append({"role": m["role"], "content": "\n".join(pieces)})
    return out


def _plan(messages: list[dict[str, Any]], native: frozenset[str], skills: Any, fallback: bool,
          model: str) -> dict[str, bool]:
    """Checked before any skill runs: every medium has a way in, else MEDIA_UNSUPPORTED."""
    kinds = {p["type"] for m in messages for p in media_of(m.get("parts"))}
    for kind in sorted(kinds - set(native)):
        skill, _method = FALLBACKS[kind]
        if fallback and skill in skills:
            continue
        why = ("media.fallback is off in the config" if not fallback else
               f"no fallback skill {skill} is installed (the {_PLUGINS[skill]} plugin provides it)")
        plural = "images" if kind == "image" else "audio"
        raise RPCError(ErrorCode.MEDIA_UNSUPPORTED,
                       f"{model} cannot take {plural} itself and {why}; use a model that reads {plural} "
                       f"(a projector: mmproj) or install the fallback",
                       {"kind": kind, "model": model, "fallback": skill if fallback else None})
    return {"native": bool(kinds & set(native))}


def _escaped(text: str, marker: str) -> str:
    """A client's text with the media marker made harmless: only the daemon places markers
    (a marker typed by a user would otherwise take a medium's place)."""
    return text.replace(marker, marker[:1] + "\u200b" + marker[1:]) if marker and marker in text else text


def _stored(store: MediaStore, part: dict[str, Any]) -> Any:
    try:
        return store.find(part["sha256"], part["mime"])
    except MediaStoreError as exc:
        raise RPCError(ErrorCode.MEDIA_INVALID, f"{display_name(part)}: {exc}",
                       {"sha256": part.get("sha256")}) from None


async def _fallback(part: dict[str, Any], skill: str, method: str, store: MediaStore, call_skill: SkillCall,
                    cache_get: CacheGet, cache_put: CachePut) -> str:
    """The fallback's marked text of one medium: from the cache, else from its skill (then cached)."""
    name = display_name(part)
    cached = await cache_get(part["sha256"], method)
    if cached is None:
        path = _stored(store, part)
        try:
            result = await call_skill(skill, {"path": str(path)})
        except RPCError as exc:
            raise RPCError(exc.code, f"{name}: the fallback {skill} failed: {exc.message}",
                           {"skill": skill, "sha256": part["sha256"]}) from None
        text = result.get("text") if isinstance(result, dict) else None
        if not isinstance(text, str):
            raise RPCError(ErrorCode.SKILL_FAILED, f"{name}: the fallback {skill} returned no text",
                           {"skill": skill})
        cached = text
        await cache_put(part["sha256"], method, text)
    return fallback_text(part["type"], name, cached)


def remote_messages(messages: list[dict[str, Any]], store: MediaStore) -> tuple[list[dict[str, Any]], set[str]]:
    """The conversation for a remote (OpenAI-compatible) server: media as OpenAI content
    parts (``image_url`` data URLs, ``input_audio``); the server decides what it takes.
    Blocking (reads the stored files)."""
    out, kinds = [], set()
    for m in messages:
        parts = m.get("parts")
        if not media_of(parts):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        content: list[dict[str, Any]] = []
        for part in parts:
            if not is_media(part):
                if part.get("text"):
                    content.append({"type": "text", "text": part["text"]})
                continue
            data = base64.b64encode(_stored(store, part).read_bytes()).decode("ascii")
            kinds.add(part["type"])
            if part["type"] == "image":
                content.append({"type": "image_url", "image_url": {"url": f"data:{part['mime']};base64,{data}"}})
            else:
                fmt = {"audio/wav": "wav", "audio/mpeg": "mp3", "audio/flac": "flac"}[part["mime"]]
                content.append({"type": "input_audio", "input_audio": {"data": data, "format": fmt}})
        out.append({"role": m["role"], "content": content})
    return out, kinds
