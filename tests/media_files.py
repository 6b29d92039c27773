"""Test media made by the tests themselves: images with text, tones, speech, broken files.

Nothing here is a fixture file committed to the repository: every medium is written on the
spot, so a test says in code what it feeds the daemon. Importable by any test module::

    from media_files import text_png, tone_wav, spoken_wav, truncated

Pillow is imported lazily (the module imports without it); ``spoken_wav`` needs the
``espeak-ng`` program (``.ci/run`` installs it with apt) and skips the calling test with a
reason where it is missing.
"""

from __future__ import annotations

import math
import shutil
import struct
import subprocess
import wave
import zlib
from pathlib import Path

__all__ = ["text_png", "tone_wav", "spoken_wav", "truncated", "bomb_png", "animated_gif", "espeak_ng"]


def text_png(path: str | Path, text: str, size: int = 48) -> Path:
    """Render ``text`` (lines split on newlines) black on white into a PNG at ``path``.

    ``size`` is the font's pixel height; Pillow's default font (the FreeType one it ships,
    Pillow >= 10.1) at 48 px reads reliably with OCR. The image is as large as the text plus a
    margin, so a test knows what the OCR should find and nothing else is on the page.
    """
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = measure.multiline_textbbox((0, 0), text, font=font, spacing=size // 2)
    margin = size
    image = Image.new("RGB", (right - left + 2 * margin, bottom - top + 2 * margin), "white")
    ImageDraw.Draw(image).multiline_text((margin - left, margin - top), text, fill="black", font=font,
                                         spacing=size // 2)
    image.save(path, format="PNG")
    return path


def tone_wav(path: str | Path, seconds: float, rate: int = 16000, *, freq: float = 440.0,
             amplitude: float = 0.3) -> Path:
    """Write a mono 16-bit PCM sine tone of ``seconds`` at ``rate`` Hz to ``path``.

    Written one second at a time, so a two-hour recording (about 230 MB at 16 kHz) costs the
    test disk, never memory.
    """
    path = Path(path)
    total = int(round(seconds * rate))
    # One period-aligned second of samples, repeated: exact for integer frequencies.
    second = b"".join(struct.pack("<h", int(amplitude * 32767 * math.sin(2 * math.pi * freq * i / rate)))
                      for i in range(rate))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        written = 0
        while written < total:
            n = min(rate, total - written)
            w.writeframes(second[: 2 * n])
            written += n
    return path


def espeak_ng() -> str:
    """The path of the ``espeak-ng`` program, or skip the calling test saying why."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        import pytest  # imported here so that bench scripts can use this module without pytest

        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng; .ci/run installs it where it can)")
    return exe


def spoken_wav(path: str | Path, text: str, *, words_per_minute: int = 150) -> Path:
    """Speak ``text`` with espeak-ng into a WAV at ``path`` (mono 16-bit, 22050 Hz as espeak-ng writes).

    Skips the calling test with a reason where espeak-ng is missing.
    """
    path = Path(path)
    exe = espeak_ng()
    subprocess.run([exe, "-v", "en-us", "-s", str(words_per_minute), "-w", str(path), text],
                   check=True, capture_output=True, timeout=60)
    return path


def truncated(path: str | Path, keep: int | float) -> Path:
    """Cut the file at ``path`` in place to its first ``keep`` bytes (an int) or fraction (a float < 1).

    A truncated PNG, JPEG or WAV is the commonest real broken medium: a download or copy cut
    short. Returns ``path``.
    """
    path = Path(path)
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else int(keep)
    path.write_bytes(data[: max(0, n)])
    return path


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(path: str | Path, width: int = 30000, height: int = 30000) -> Path:
    """A PNG of a few hundred bytes whose header claims ``width`` x ``height`` pixels (RGB).

    Its one IDAT holds only a sliver of the data such an image needs, so the file is cheap to
    make and a reader that trusts the header before its pixel limit would try to allocate
    gigabytes (30000 x 30000 x 3 = 2.7 GB): the decompression-bomb case.
    """
    path = Path(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" + b"\xff" * 3 * min(width, 1024))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def animated_gif(path: str | Path, texts: list[str], size: int = 48) -> Path:
    """An animated GIF with one frame per text (each rendered like ``text_png``), same canvas size."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    font = ImageFont.load_default(size=size)
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), t, font=font) for t in texts]
    width = max(b[2] - b[0] for b in boxes) + 2 * size
    height = max(b[3] - b[1] for b in boxes) + 2 * size
    frames = []
    for text, (left, top, _, _) in zip(texts, boxes):
        frame = Image.new("L", (width, height), 255)
        ImageDraw.Draw(frame).text((size - left, size - top), text, fill=0, font=font)
        frames.append(frame.convert("P"))
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=500, loop=0)
    return path
