"""Image and audio attachments: check the path, make the message's content parts.

An attached file goes to the daemon as a content part of the chat message
(``{"type": "image"|"audio", "path": <absolute path>, "name": <file name>}``
beside the text part); the daemon decides how the model gets it: natively
when the model sees or hears (its ``modalities``), else through a fallback
skill's text (``vision.ocr`` for images, ``audio.transcribe`` for audio).
The reply's ``stats.media`` says which path ran. This module checks what the
client can check before sending (the path exists, is a readable regular
file, is not empty, is an image or audio file by its first bytes or else its
name, fits the daemon's size limit when the daemon says it), predicts the
path from what the TUI knows of the model, and words the result. Every
problem is an :class:`AttachmentError` with a sentence for the user. No
Textual here.
"""

from __future__ import annotations

import mimetypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".avif"}
AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".aiff"}
KINDS = ("image", "audio")
# The skill the daemon falls back on when the model cannot take the medium itself.
FALLBACK_SKILL = {"image": "vision.ocr", "audio": "audio.transcribe"}
# What the fallback turns the medium into, and the model's own sense for it.
FALLBACK_TEXT = {"image": "OCR text", "audio": "transcript"}
NATIVE_TEXT = {"image": "read by the model", "audio": "heard by the model"}
CANNOT = {"image": "the model cannot see images", "audio": "the model cannot hear audio"}
# stats.media's words for the fallbacks, and the kind each applies to.
PATH_KIND = {"ocr": "image", "transcript": "audio"}
SNIFF_BYTES = 512  # enough for every signature below and to tell text from binary


class AttachmentError(Exception):
    """A path that cannot be attached; the message says why, for people."""


@dataclass
class Attachment:
    """A checked file waiting to go with the next message."""

    path: Path  # absolute
    kind: str  # "image" | "audio"
    size: int = 0

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"

    def part(self) -> dict[str, Any]:
        """The content part the daemon reads (over the Unix socket a path is allowed: the
        daemon runs as the same user and reads what the user could read)."""
        return {"type": self.kind, "path": str(self.path), "name": self.name}


def media_kind(path: Path) -> str | None:
    """The kind a file's name says (extension, then the MIME type it guesses), or None."""
    ext = path.suffix.lower()
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in AUDIO_EXTENSIONS:
        return "audio"
    guess, _ = mimetypes.guess_type(path.name)
    if guess and guess.startswith("image/"):
        return "image"
    if guess and guess.startswith("audio/"):
        return "audio"
    return None


def sniff(head: bytes) -> str | None:
    """The kind the file's first bytes say (the formats the daemon and its decoders know), or None."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
                        b"II*\x00", b"MM\x00*")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio"
    if head.startswith((b"fLaC", b"ID3", b"OggS")):
        return "audio"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # an MPEG/AAC frame (JPEG is FF D8)
        return "audio"
    if head[4:8] == b"ftyp":  # ISO media: the brand says which
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
            return "image"
        if brand in (b"M4A ", b"M4B "):
            return "audio"
    return None


def looks_like_text(head: bytes) -> bool:
    """True for bytes that are plainly text (UTF-8, no NULs, no control characters but
    whitespace): a notes file renamed ``.png``, say."""
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[:exc.start].decode("utf-8")
    return all(c.isprintable() or c in "\t\n\r\f" for c in text)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_path(text: str, cwd: Path | None = None, max_bytes: int | None = None) -> tuple[Path, str, int]:
    """(absolute path, media kind, size in bytes), or AttachmentError saying what is wrong.

    ``max_bytes``: the daemon's limit when it says one (``media.max_bytes``); the daemon
    checks again, this only says it before the file is sent."""
    text = text.strip().strip("'\"")
    if not text:
        raise AttachmentError("Give the path of an image or audio file.")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    try:
        st = path.stat()
    except FileNotFoundError:
        raise AttachmentError(f"No such file: {path}") from None
    except OSError as exc:
        raise AttachmentError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise AttachmentError(f"{path} is a folder; attach a file.")
    if not stat.S_ISREG(st.st_mode):  # a FIFO or a device: reading it could block or never end
        raise AttachmentError(f"{path} is not a regular file; attach an image or audio file.")
    if not os.access(path, os.R_OK):
        raise AttachmentError(f"Cannot read {path}: permission denied.")
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as exc:
        raise AttachmentError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    if not head:
        raise AttachmentError(f"{path.name} is empty; attach an image or audio file.")
    if max_bytes and st.st_size > max_bytes:
        raise AttachmentError(f"{path.name} is {_human(st.st_size)}; the daemon takes files up to "
                              f"{_human(max_bytes)} (media.max_bytes in its config).")
    by_name = media_kind(path)
    kind = sniff(head)
    if kind is None:
        if by_name is None:
            raise AttachmentError(f"{path.name} is not an image or audio file; attach .png, .jpg, .webp, "
                                  ".wav, .mp3, .flac, ...")
        if looks_like_text(head):
            raise AttachmentError(f"{path.name} is named like an {by_name} file but holds text.")
        kind = by_name  # a format this check does not know: the daemon reads the bytes and says
    return path, kind, st.st_size


def prepare(text: str, cwd: Path | None = None, max_bytes: int | None = None) -> Attachment:
    """The attachment for the path the user typed, or AttachmentError."""
    path, kind, size = check_path(text, cwd, max_bytes)
    return Attachment(path=path, kind=kind, size=size)


def message_content(text: str, atts: Iterable[Attachment]) -> str | list[dict[str, Any]]:
    """The chat message: ``text`` alone, or one part per attachment followed by the text part
    (media before the question, as Gemma's and most chat templates expect; ``assistant ask
    --image`` sends the same)."""
    atts = list(atts)
    if not atts:
        return text
    return [a.part() for a in atts] + ([{"type": "text", "text": text}] if text.strip() else [])


def content_text(content: Any) -> str:
    """A message's content for the screen: a string as it is; parts as their text, and a
    line per medium (``[image cat.png]``), as sent or as the session stores them."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return "" if content is None else str(content)
    texts, media = [], []
    for part in content:
        if not isinstance(part, dict):
            continue
        ptype = part.get("type")
        if ptype == "text":
            texts.append(str(part.get("text", "")))
        elif ptype in ("image", "audio", "image_url", "input_audio"):
            kind = "audio" if ptype in ("audio", "input_audio") else "image"
            name = part.get("name") or (Path(str(part["path"])).name if part.get("path") else None) or (
                str(part["sha256"])[:12] if part.get("sha256") else None)
            media.append(f"[{kind} {name}]" if name else f"[{kind}]")
    return "\n".join(t for t in ["\n".join(texts).strip(), " ".join(media)] if t)


def content_kinds(content: Any) -> list[str]:
    """The kinds of media in a message's content (in order, each once)."""
    kinds: list[str] = []
    for part in content if isinstance(content, list) else []:
        ptype = part.get("type") if isinstance(part, dict) else None
        kind = {"image": "image", "image_url": "image", "audio": "audio", "input_audio": "audio"}.get(ptype)
        if kind and kind not in kinds:
            kinds.append(kind)
    return kinds


def modalities(loaded_entry: dict[str, Any] | None) -> list[str] | None:
    """What a loaded model takes (``models.list``'s ``info.modalities``); None when unknown
    (not loaded, or a daemon that does not say)."""
    info = (loaded_entry or {}).get("info") or {}
    mods = info.get("modalities")
    return [str(m) for m in mods] if isinstance(mods, list) else None


def has_fallback(kind: str, skills: Iterable[dict[str, Any]]) -> bool:
    return any(s.get("name") == FALLBACK_SKILL[kind] for s in skills)


def expected_path(kind: str, model_modalities: list[str] | None, skills: Iterable[dict[str, Any]]) -> str:
    """Before sending: how the model will get a medium of ``kind``, from what the TUI knows
    (the loaded model's modalities, the daemon's skills). The daemon decides in the end."""
    skill = FALLBACK_SKILL[kind]
    fallback = has_fallback(kind, skills)
    if model_modalities is None:  # the model is not loaded yet: its projector is not known
        if fallback:
            return f"{NATIVE_TEXT[kind]} if it can, else {FALLBACK_TEXT[kind]} by {skill}"
        return f"{NATIVE_TEXT[kind]} if it can (no {skill} skill to fall back on)"
    if kind in model_modalities:
        return NATIVE_TEXT[kind]
    if fallback:
        return f"{FALLBACK_TEXT[kind]} by {skill} ({CANNOT[kind]})"
    return f"{CANNOT[kind]} and no {skill} skill is installed: the daemon will refuse it"


def media_note(kinds: Iterable[str], media: str | None) -> str:
    """After the reply: which path each kind of medium in the message took, from the reply's
    ``stats.media`` ("native", "ocr", "transcript", "remote", several joined by "+"), e.g.
    "image: OCR text · audio: heard by the model"; "" when the daemon did not say."""
    if not media:
        return ""
    paths = {p.strip() for p in str(media).split("+") if p.strip()}
    notes = []
    for kind in kinds:
        fallback = next((p for p, k in PATH_KIND.items() if k == kind and p in paths), None)
        if fallback:
            notes.append(f"{kind}: {FALLBACK_TEXT[kind]}")
        elif "native" in paths:
            notes.append(f"{kind}: {NATIVE_TEXT[kind]}")
        elif "remote" in paths:  # a remote engine got the medium as it is
            notes.append(f"{kind}: sent to the remote model")
    return " · ".join(notes)
