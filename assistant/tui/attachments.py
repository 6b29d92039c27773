"""Image and audio attachments: check the path, find the skill for its media.

A file is sent to a plugin skill for its kind of media: skills whose names
start with ``vision.`` take images, ``audio.`` take audio (the built-in
vision and audio plugins register them). The skill's result (a description,
a transcript) goes into the message to the model. Every problem is an
:class:`AttachmentError` with a sentence for the user. No Textual here.
"""

from __future__ import annotations

import json
import mimetypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic"}
AUDIO_EXTENSIONS = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".aiff"}
SKILL_PREFIX = {"image": "vision.", "audio": "audio."}
PLUGIN_HINT = {"image": "a vision plugin", "audio": "an audio plugin"}
PLURAL = {"image": "images", "audio": "audio files"}
# Argument names a skill may use for the file and for the user's words.
PATH_ARGS = ("path", "file", "image", "audio", "image_path", "audio_path", "file_path")
PROMPT_ARGS = ("prompt", "question", "instruction", "text")


class AttachmentError(Exception):
    """A path that cannot be attached; the message says why, for people."""


@dataclass
class Attachment:
    path: Path
    kind: str  # "image" | "audio"
    skill: dict[str, Any]  # the skill's description from skills.list

    @property
    def label(self) -> str:
        return f"{self.kind} {self.path.name} -> {self.skill['name']}"


def media_kind(path: Path) -> str | None:
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


def check_path(text: str, cwd: Path | None = None) -> tuple[Path, str]:
    """(absolute path, media kind) or AttachmentError."""
    text = text.strip().strip("'\"")
    if not text:
        raise AttachmentError("Give the path of an image or audio file.")
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        path = (cwd or Path.cwd()) / path
    if not path.exists():
        raise AttachmentError(f"No such file: {path}")
    if path.is_dir():
        raise AttachmentError(f"{path} is a folder; attach a file.")
    if not os.access(path, os.R_OK):
        raise AttachmentError(f"Cannot read {path}: permission denied.")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise AttachmentError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    kind = media_kind(path)
    if kind is None:
        raise AttachmentError(f"{path.name} is not an image or audio file (by its extension); "
                              "attach .png, .jpg, .webp, .wav, .mp3, .flac, ...")
    return path, kind


def find_skill(kind: str, skills: list[dict[str, Any]]) -> dict[str, Any]:
    """The skill for this media, or AttachmentError saying that none handles it."""
    prefix = SKILL_PREFIX[kind]
    matching = sorted((s for s in skills if str(s.get("name", "")).startswith(prefix)), key=lambda s: s["name"])
    if not matching:
        raise AttachmentError(f"No skill handles {PLURAL[kind]}: install or enable {PLUGIN_HINT[kind]} "
                              f"(one that offers a `{prefix}*` skill) to attach {PLURAL[kind]}.")
    # Prefer a skill that takes a path argument.
    for s in matching:
        if _pick(s, PATH_ARGS):
            return s
    return matching[0]


def prepare(text: str, skills: list[dict[str, Any]], cwd: Path | None = None) -> Attachment:
    path, kind = check_path(text, cwd)
    return Attachment(path=path, kind=kind, skill=find_skill(kind, skills))


def skill_arguments(att: Attachment, prompt: str) -> dict[str, Any]:
    """Arguments for the skill: the path under the name its schema uses, and the
    user's words when it takes some."""
    path_arg = _pick(att.skill, PATH_ARGS) or "path"
    args: dict[str, Any] = {path_arg: str(att.path)}
    prompt_arg = _pick(att.skill, PROMPT_ARGS)
    if prompt_arg and prompt.strip():
        args[prompt_arg] = prompt
    return args


def message_with_result(att: Attachment, prompt: str, result: Any) -> str:
    """The message sent to the model: the user's words and what the skill made of the file."""
    if isinstance(result, dict):
        for key in ("text", "description", "transcript", "caption", "result"):
            if isinstance(result.get(key), str):
                result = result[key]
                break
    body = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, indent=2)
    what = "description" if att.kind == "image" else "transcript"
    head = f"[Attached {att.kind} {att.path.name}; {what} by {att.skill['name']}:]\n{body.strip()}"
    return f"{prompt.strip()}\n\n{head}" if prompt.strip() else head


def _pick(skill: dict[str, Any], names: tuple[str, ...]) -> str | None:
    props = (skill.get("parameters") or {}).get("properties") or {}
    for n in names:
        if n in props:
            return n
    return None
