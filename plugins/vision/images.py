"""Opening an image a skill was asked to read, checked before anything is decoded.

The order matters against hostile files: the file's size is checked before it
is opened, Pillow reads only the header first, and the pixel count the header
claims is checked against ``max_pixels`` before a single pixel is decoded, so
a few hundred bytes claiming 30000 x 30000 pixels (2.7 GB as RGB) are refused
at the header, never allocated. The type comes from the bytes, never the name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from assistant import plugin_api
from assistant.plugin_api import size_words

MAX_BYTES = 20 * 1024 * 1024  # as the daemon's media.max_bytes default
MAX_PIXELS = 40_000_000  # as the daemon's media.max_pixels default


# What Pillow may open. Pillow knows many more formats, picked by content; some are
# risky to hand a stranger's file: EPS and PDF-like ones run Ghostscript, others are
# rarely tested decoders. The images people send and scan are these.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "PPM", "ICO", "TGA", "JPEG2000")


class ImageFileError(ValueError):
    """The file cannot be read as an image; the message says why, naming the file."""


@dataclass
class ImageFacts:
    """What an image is, before any reading of what it shows."""

    path: str
    format: str  # Pillow's name for it: "PNG", "JPEG", "GIF", ...
    mime: str
    width: int
    height: int
    mode: str  # Pillow's mode: "RGB", "RGBA", "L" (grey), "P" (palette), "1" (black and white), ...
    frames: int
    bytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "mime": self.mime, "width": self.width, "height": self.height,
                "mode": self.mode, "frames": self.frames, "bytes": self.bytes}

    def sentence(self) -> str:
        """The facts said plainly, e.g. "A PNG image, 677 x 213 pixels, in colour, 12 KB." """
        colour = _MODE_WORDS.get(self.mode, f"in mode {self.mode}")
        frames = f", animated ({self.frames} frames; this reads the first)" if self.frames > 1 else ""
        return (f"A {self.format} image, {self.width} x {self.height} pixels, {colour}{frames}, "
                f"{size_words(self.bytes)}.")


_MODE_WORDS = {
    "1": "black and white", "L": "in greyscale", "LA": "in greyscale with transparency",
    "P": "in colour (a palette)", "PA": "in colour (a palette) with transparency", "RGB": "in colour",
    "RGBA": "in colour with transparency", "CMYK": "in colour (CMYK, for print)", "YCbCr": "in colour",
    "I": "in greyscale (32-bit)", "I;16": "in greyscale (16-bit)", "F": "in greyscale (floating point)",
}


def input_file(path: Any, *, max_bytes: int, what: str = "image") -> Path:
    """The file a skill's ``path`` argument names, checked (``plugin_api.input_file``)."""
    return plugin_api.input_file(path, max_bytes=max_bytes, what=what, error=ImageFileError)


def open_image(path: Any, *, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS):
    """Decode the image at ``path`` after the checks above; returns ``(image, facts)``.

    ``image`` is an RGB ``PIL.Image`` of the first frame, turned upright by its EXIF
    orientation (a phone photo of a page), with transparency flattened onto white
    (dark text on a transparent background would otherwise become black on black).
    An animated image gives its first frame and says so in ``facts.notes``.
    Raises ``ImageFileError`` with a message that names the file and the problem.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = input_file(path, max_bytes=max_bytes)
    size = p.stat().st_size
    try:
        im = Image.open(p, formats=FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{path}: refused before decoding: {exc}") from None
    except UnidentifiedImageError:
        with open(p, "rb") as f:
            head = f.read(8)
        raise ImageFileError(f"{path}: not an image file Pillow can read (it starts with {head!r}; images are "
                             f"{', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageFileError(f"{path}: not a readable image: {exc}") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageFileError(f"{path}: the image claims {width} x {height} = {width * height:,} pixels, over the "
                                 f"{max_pixels:,} limit (plugin setting max_pixels); refused before decoding")
        fmt = im.format or "unknown"
        mime = Image.MIME.get(fmt, "application/octet-stream")
        mode = im.mode
        frames = _frame_count(im, p)
        notes = []
        if frames > 1:
            notes.append(f"animated {fmt} with {frames} frames: read the first frame only")
        try:
            im.seek(0)
            im.load()
            upright = ImageOps.exif_transpose(im)
            rgb = _flatten(upright)
        except Image.DecompressionBombError as exc:
            raise ImageFileError(f"{path}: refused: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, EOFError...
            detail = str(exc) or type(exc).__name__
            if "truncated" in detail or isinstance(exc, EOFError):
                raise ImageFileError(f"{path}: the {fmt} file is truncated (cut short): {detail}") from None
            raise ImageFileError(f"{path}: the {fmt} data cannot be decoded: {detail}") from None
    facts = ImageFacts(str(path), fmt, mime, width, height, mode, frames, size, notes)
    return rgb, facts


def _frame_count(im, path: Path) -> int:
    """How many frames the image has, without decoding them.

    Pillow's ``n_frames`` reads it from the header for PNG, WebP and TIFF, but for a
    GIF it seeks through (and decodes) every frame: a small GIF of many frames on a
    large canvas would cost minutes. GIF blocks are walked here instead.
    """
    if im.format == "GIF":
        return gif_frames(path.read_bytes())
    try:
        return max(1, int(getattr(im, "n_frames", 1) or 1))
    except Exception:  # noqa: BLE001 - a later frame is broken; the first may still read
        return 1


def gif_frames(data: bytes) -> int:
    """The number of images in a GIF, by walking its blocks (at least 1; a cut-off file counts what is there)."""
    if len(data) < 13:
        return 1
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    frames = 0

    def skip_sub_blocks(i: int) -> int:
        while i < len(data) and data[i]:
            i += data[i] + 1
        return i + 1

    while pos < len(data):
        kind = data[pos]
        if kind == 0x2C:  # an image descriptor, maybe a local colour table, then LZW data
            frames += 1
            if pos + 10 > len(data):
                break
            packed = data[pos + 9]
            pos += 10 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)
            pos = skip_sub_blocks(pos + 1)  # past the LZW minimum code size
        elif kind == 0x21:  # an extension: its label, then data sub-blocks
            pos = skip_sub_blocks(pos + 2)
        else:  # 0x3B, the trailer, or garbage
            break
    return max(frames, 1)


def _flatten(im):
    """RGB, with any transparency composited onto white."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # High bit-depth greyscale: scale to 8 bits rather than clip to white.
        import numpy as np

        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo) if hi > lo else 1.0)
        return Image.fromarray(a.clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")
