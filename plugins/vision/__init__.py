"""vision: read images for a model that cannot see them (a built-in plugin).

Loaded through the plugin system like any third-party plugin (entry point
``vision`` in the ``assistant.plugins`` group). Skills:

- ``vision.ocr {"path"}`` -> ``{"text", "lines": [{"text", "box", "score"}], "width", "height",
  "format", "mode", "frames", "notes"}``: the text in the image (RapidOCR, PP-OCRv4), rows
  joined by newlines; ``box`` is four ``[x, y]`` corners in the image's pixels.
- ``vision.describe {"path"}`` -> ``{"text", "method": "model"|"ocr", "notes"}``: the model
  itself describes the image when it reads images natively; otherwise the image's facts
  (format, size, colour, frames) and its OCR text, said plainly.

The daemon uses ``vision.ocr`` as the fallback for image parts sent to a model that
cannot take them. Settings (``plugins: {vision: {...}}``, docs/plugins.md): ``threads``,
``max_bytes``, ``max_pixels``, ``min_score``, ``describe_with_model``, ``describe_prompt``,
``describe_max_tokens``.

Files are checked before they are decoded (size, then the pixel count the header
claims); every problem is an ``INVALID_PARAMS`` error naming the file. OCR runs in a
worker thread, one image at a time, so the daemon keeps serving meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any

from assistant import hookimpl

from . import images, ocr

__version__ = "1.0.0"

DEFAULTS: dict[str, Any] = {
    "threads": 2,  # onnxruntime's threads for OCR
    "max_bytes": images.MAX_BYTES,
    "max_pixels": images.MAX_PIXELS,
    "min_score": 0.5,  # OCR lines less confident than this are left out
    "describe_with_model": True,  # vision.describe asks the model when it reads images natively
    "describe_prompt": "Describe this image plainly: what it shows, and any text in it.",
    "describe_max_tokens": 300,
}

PATH_SCHEMA = {
    "type": "object",
    "properties": {"path": {"type": "string", "minLength": 1,
                            "description": "the image file (PNG, JPEG, GIF, WebP, BMP, TIFF, ...); absolute or ~"}},
    "required": ["path"],
    "additionalProperties": False,
}


def settings_of(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The plugin's settings with defaults filled in, checked (ValueError naming the key)."""
    s = {**DEFAULTS, **(raw or {})}
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"plugins.vision.{unknown[0]}: unknown setting (known: {', '.join(sorted(DEFAULTS))})")
    for key in ("threads", "max_bytes", "max_pixels", "describe_max_tokens"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"plugins.vision.{key}: expected a positive integer, got {s[key]!r}")
    if isinstance(s["min_score"], bool) or not isinstance(s["min_score"], (int, float)) \
            or not 0 <= s["min_score"] <= 1:
        raise ValueError(f"plugins.vision.min_score: expected a number from 0 to 1, got {s['min_score']!r}")
    if not isinstance(s["describe_with_model"], bool):
        raise ValueError(f"plugins.vision.describe_with_model: expected true or false, got "
                         f"{s['describe_with_model']!r}")
    if not isinstance(s["describe_prompt"], str) or not s["describe_prompt"].strip():
        raise ValueError("plugins.vision.describe_prompt: expected a non-empty string")
    return s


def _invalid(message: str):
    from assistant.protocol import ErrorCode, RPCError

    return RPCError(ErrorCode.INVALID_PARAMS, message)


class Vision:
    """The skills, over one plugin context and its settings."""

    def __init__(self, context: Any, settings: dict[str, Any]):
        self.context = context
        self.settings = settings
        self._one_at_a_time = asyncio.Lock()  # OCR is CPU-bound: queue here, not in threads

    def _ocr_blocking(self, path: str) -> dict[str, Any]:
        s = self.settings
        try:
            image, facts = images.open_image(path, max_bytes=s["max_bytes"], max_pixels=s["max_pixels"])
        except images.ImageFileError as exc:
            raise _invalid(str(exc)) from None
        lines = ocr.read(image, threads=s["threads"], min_score=float(s["min_score"]))
        return {"text": ocr.join_lines(lines), "lines": [ln.as_dict() for ln in lines],
                "width": facts.width, "height": facts.height, "format": facts.format, "mode": facts.mode,
                "frames": facts.frames, "notes": facts.notes, "_facts": facts}

    async def _ocr(self, path: str) -> dict[str, Any]:
        async with self._one_at_a_time:
            return await asyncio.to_thread(self._ocr_blocking, path)

    async def ocr(self, path: str) -> dict[str, Any]:
        """The text in an image, line by line with boxes and scores (RapidOCR)."""
        result = await self._ocr(path)
        result.pop("_facts")
        return result

    async def describe(self, path: str) -> dict[str, Any]:
        """What an image shows: by the model when it can see, else its facts and OCR text."""
        notes: list[str] = []
        if self.settings["describe_with_model"]:
            # Checked first, as OCR would: a bad file is the same clear error either way.
            try:
                images.input_file(path, max_bytes=self.settings["max_bytes"])
            except images.ImageFileError as exc:
                raise _invalid(str(exc)) from None
            text, why = await self._ask_model(path)
            if text is not None:
                return {"text": text, "method": "model", "notes": notes}
            notes.append(why)
        result = await self._ocr(path)
        facts: images.ImageFacts = result["_facts"]
        return {"text": plain_description(facts, result["text"]), "method": "ocr",
                "notes": notes + facts.notes}

    async def _ask_model(self, path: str) -> tuple[str | None, str]:
        """The model's description, or (None, why not). ``media_fallback: false`` asks the
        daemon for the model's own eyes only: a model that cannot see answers
        MEDIA_UNSUPPORTED instead of reading our OCR text back to us."""
        from assistant.protocol import RPCError

        message = [{"type": "text", "text": self.settings["describe_prompt"]},
                   {"type": "image", "path": str(path)}]
        try:
            reply = await self.context.chat(messages=[{"role": "user", "content": message}], temperature=0,
                                            max_tokens=self.settings["describe_max_tokens"], media_fallback=False)
        except RPCError as exc:
            return None, f"the model did not read the image itself ({exc.message}), so this is OCR"
        stats = reply.get("stats") or {}
        if "native" not in str(stats.get("media", "")):
            return None, "the model cannot read images itself, so this is OCR"
        return reply.get("text", "").strip(), ""


def plain_description(facts: images.ImageFacts, text: str) -> str:
    """An image's facts and its text, said plainly (what ``vision.describe`` gives without a seeing model)."""
    if text.strip():
        return f"{facts.sentence()} The text in it reads:\n{text.strip()}"
    return f"{facts.sentence()} No text was found in it."


_vision: Vision | None = None


@hookimpl
def register_skills(register, context, settings):
    global _vision
    _vision = Vision(context, settings_of(settings))
    register("vision.ocr", _vision.ocr, description="Read the text in an image (OCR): lines with boxes and scores.",
             parameters=PATH_SCHEMA)
    register("vision.describe", _vision.describe,
             description="Describe an image: the model itself when it can see, else the image's facts and OCR text.",
             parameters=PATH_SCHEMA)
