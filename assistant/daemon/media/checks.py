"""One medium's bytes: read within the limits, then checked, before anything else sees them.

Nothing here trusts a name, an extension or a declared type: the kind and
format are sniffed from the bytes. Sizes are checked before the work they
bound: a file's size (``fstat``) before it is read, a base64 text's length
before it is decoded, an image's pixel count (from its header) before its
pixels are decoded, an audio file's duration (from its header) before anyone
decodes it. Blocking (file reads, Pillow): callers run these off the event loop.

Accepted: images PNG and JPEG (kept as they are) and GIF, WebP, BMP (the
first frame, converted to PNG, so a backend reads only PNG and JPEG); audio
WAV (PCM, float, A-law, mu-law), MP3 (MPEG layer III) and FLAC.

Every refusal is an ``RPCError``: ``MEDIA_INVALID`` (unreadable, not a
medium, truncated, a codec not taken), ``MEDIA_TOO_LARGE`` (over a limit),
with ``data = {"part": where}`` naming the part.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass, field
from typing import Any

from assistant.protocol import ErrorCode, RPCError

# The config's defaults (assistant/config's ``media`` section); used where a config has none.
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_AUDIO_SECONDS = 3600.0

IMAGE_MIMES = {"PNG": "image/png", "JPEG": "image/jpeg"}
AUDIO_MIMES = ("audio/wav", "audio/mpeg", "audio/flac")
# The file name extension a stored medium gets, by its (sniffed) type.
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "audio/wav": "wav", "audio/mpeg": "mp3", "audio/flac": "flac"}
# Pillow opens only these (the fewer decoders reachable from a client's bytes, the better).
_PILLOW_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP")


@dataclass(frozen=True)
class Limits:
    """The config's ``media`` limits: bytes of one medium, pixels of one image, seconds of one recording."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS

    @classmethod
    def from_config(cls, config: Any) -> "Limits":
        """The limits of ``config.media`` (its defaults where the config has no such section)."""
        media = getattr(config, "media", None)
        return cls(int(getattr(media, "max_bytes", DEFAULT_MAX_BYTES)),
                   int(getattr(media, "max_pixels", DEFAULT_MAX_PIXELS)),
                   float(getattr(media, "max_audio_seconds", DEFAULT_MAX_AUDIO_SECONDS)))


@dataclass
class Checked:
    """A medium that passed: its ``kind`` ("image"/"audio"), sniffed ``mime``, the
    ``data`` to store (an image in a format a backend does not read is its first
    frame as PNG), facts about it (``info``: width/height/frames, or
    duration/sample_rate/channels) and a ``note`` to tell the user (an animated
    GIF reduced to its first frame), if any."""

    kind: str
    mime: str
    data: bytes
    info: dict[str, Any] = field(default_factory=dict)
    note: str | None = None


def refuse(code: ErrorCode, where: str, message: str) -> RPCError:
    """The error for part ``where``: its message starts with the part, its data names it."""
    return RPCError(code, f"{where}: {message}", {"part": where})


def _mb(n: float) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


# -- reading ---------------------------------------------------------------------


def read_path(path: str, limits: Limits, where: str) -> bytes:
    """The bytes of the regular file at ``path`` (``~`` expanded; the caller
    checked it is absolute), at most ``limits.max_bytes``.

    Opened with ``O_NONBLOCK`` (a FIFO never blocks the open) and checked with
    ``fstat`` on the open descriptor (no swap between a check and the open):
    a directory, FIFO, socket or device is refused before a byte is read, and
    a file over the limit by its size; a file that grows while being read is
    still cut at the limit."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"no such file: {path}") from None
    except PermissionError:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"cannot read {path}: permission denied") from None
    except IsADirectoryError:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"{path} is a directory, not a file") from None
    except OSError as exc:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise refuse(ErrorCode.MEDIA_INVALID, where, f"{path} is a directory, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise refuse(ErrorCode.MEDIA_INVALID, where, f"{path} is not a regular file (a FIFO, socket or device)")
        if st.st_size > limits.max_bytes:
            raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"{path} is {_mb(st.st_size)}, over media.max_bytes "
                         f"({_mb(limits.max_bytes)})")
        chunks, total = [], 0
        while True:
            try:
                chunk = os.read(fd, min(1 << 20, limits.max_bytes + 1 - total))
            except OSError as exc:
                raise refuse(ErrorCode.MEDIA_INVALID, where, f"cannot read {path}: {exc.strerror or exc}") from None
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limits.max_bytes:
                raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"{path} is over media.max_bytes "
                             f"({_mb(limits.max_bytes)})")
        return b"".join(chunks)
    finally:
        os.close(fd)


_WHITESPACE = re.compile(r"\s+")


def decode_base64(text: str, limits: Limits, where: str) -> bytes:
    """``text`` (standard or URL-safe base64, whitespace ignored) decoded; its
    length is checked against ``limits.max_bytes`` before anything is decoded."""
    if len(text) // 4 * 3 > limits.max_bytes + 4 * 1024 * 1024:  # far over, whitespace or not: no copy made
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the data is about {_mb(len(text) * 3 / 4)}, over "
                     f"media.max_bytes ({_mb(limits.max_bytes)})")
    compact = _WHITESPACE.sub("", text)
    if len(compact) * 3 // 4 - 2 > limits.max_bytes:
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the data is about {_mb(len(compact) * 3 / 4)}, over "
                     f"media.max_bytes ({_mb(limits.max_bytes)})")
    if "-" in compact or "_" in compact:
        compact = compact.replace("-", "+").replace("_", "/")
    if len(compact) % 4:
        compact += "=" * (-len(compact) % 4) if len(compact) % 4 != 1 else ""
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"the data is not valid base64 ({exc})") from None
    if len(data) > limits.max_bytes:
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the data is {_mb(len(data))}, over media.max_bytes "
                     f"({_mb(limits.max_bytes)})")
    return data


# -- sniffing --------------------------------------------------------------------


def sniff(data: bytes) -> tuple[str | None, str]:
    """(kind, format) from the first bytes: ("image", "PNG"), ("audio", "WAV"), ...;
    kind None for what is not taken, with its format as words ("Ogg audio", "text")."""
    head = data[:64]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "WEBP"
    if head[:2] == b"BM" and len(head) >= 26:
        return "image", "BMP"
    if head[:4] in (b"RIFF", b"RIFX", b"RF64") and head[8:12] == b"WAVE":
        return "audio", "WAV"
    if head[:4] == b"fLaC":
        return "audio", "FLAC"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "audio", "MP3"
    if head[:4] == b"OggS":
        return None, "Ogg (Vorbis/Opus) audio"
    if head[4:8] == b"ftyp":
        return None, "an MP4/M4A/HEIC container"
    if head[:4] == b"\x1aE\xdf\xa3":
        return None, "a WebM/Matroska container"
    if head[:4] in (b"FORM",):
        return None, "AIFF audio"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return None, "a TIFF image"
    if head[:4] == b"%PDF":
        return None, "a PDF document"
    if not data:
        return None, "empty"
    try:
        sample = data[:4096].decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < 4092:  # not a character cut at the sample's end
            return None, "of an unknown type"
        sample = data[:exc.start].decode("utf-8")
    return (None, "text") if all(c.isprintable() or c in "\t\r\n" for c in sample) else (None, "of an unknown type")


_TAKEN = "images: PNG, JPEG, GIF, WebP, BMP; audio: WAV, MP3, FLAC"


def check(data: bytes, kind: str | None, limits: Limits, where: str) -> Checked:
    """``data`` checked as a medium of ``kind`` ("image", "audio"; None: whichever it is)."""
    if not data:
        raise refuse(ErrorCode.MEDIA_INVALID, where, "the file is empty")
    if len(data) > limits.max_bytes:
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"{_mb(len(data))}, over media.max_bytes "
                     f"({_mb(limits.max_bytes)})")
    found, fmt = sniff(data)
    if found is None:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"not an image or audio file this daemon reads (it is {fmt}; "
                     f"taken: {_TAKEN})")
    if kind is not None and found != kind:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"the part says {kind}, but the bytes are {fmt} {found}")
    if found == "image":
        return check_image(data, fmt, limits, where)
    return check_audio(data, fmt, limits, where)


# -- images ----------------------------------------------------------------------


def check_image(data: bytes, fmt: str, limits: Limits, where: str) -> Checked:
    """An image decoded by Pillow: its pixel count checked from the header first
    (and Pillow's own decompression-bomb limit set to ``max_pixels``), then every
    pixel decoded, so a truncated or corrupt file is refused here, not in a backend."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise refuse(ErrorCode.MEDIA_UNSUPPORTED, where, "images need Pillow (pip install Pillow)") from None
    # Pillow's limit is process-wide (its ``DecompressionBombError`` past twice it); the pixel
    # count is checked below against ours before any decode, so this is a second guard.
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
            width, height = img.size
            if width * height > limits.max_pixels:
                raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the image is {width}x{height} = "
                             f"{width * height:,} pixels, over media.max_pixels ({limits.max_pixels:,})")
            frames = int(getattr(img, "n_frames", 1) or 1)
            img.load()  # the first frame, whole: a truncated file fails here
            info = {"width": width, "height": height, "format": fmt}
            note = None
            if frames > 1:
                info["frames"] = frames
                note = f"an animated {fmt} of {frames} frames: only its first frame is used"
            if fmt in IMAGE_MIMES:
                return Checked("image", IMAGE_MIMES[fmt], data, info, note)
            out = io.BytesIO()
            first = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
            first.save(out, format="PNG")
            return Checked("image", "image/png", out.getvalue(), {**info, "converted_from": fmt}, note)
    except RPCError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the image is over media.max_pixels "
                     f"({limits.max_pixels:,}): {exc}") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, MemoryError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message or isinstance(exc, EOFError):
            raise refuse(ErrorCode.MEDIA_INVALID, where, f"the {fmt} image is truncated or corrupt ({message})") \
                from None
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"the {fmt} image cannot be decoded ({message})") from None


# -- audio -----------------------------------------------------------------------

# WAV format tags taken (what miniaudio's dr_wav and ffmpeg both decode without doubt).
_WAV_CODECS = {1: "PCM", 3: "IEEE float", 6: "A-law", 7: "mu-law"}
_WAV_NAMES = {2: "Microsoft ADPCM", 0x11: "IMA ADPCM", 0x31: "GSM 6.10", 0x50: "MPEG", 0x55: "MPEG layer 3",
              0xFF: "AAC", 0x161: "WMA", 0x2000: "AC-3"}


def check_audio(data: bytes, fmt: str, limits: Limits, where: str) -> Checked:
    """An audio file's header read (never its samples): codec, rate, channels, duration;
    the duration against ``media.max_audio_seconds``."""
    reader = {"WAV": _wav_info, "MP3": _mp3_info, "FLAC": _flac_info}[fmt]
    try:
        info = reader(data)
    except _Bad as exc:
        raise refuse(exc.code, where, f"{fmt}: {exc}") from None
    except (struct.error, IndexError, ValueError) as exc:
        raise refuse(ErrorCode.MEDIA_INVALID, where, f"the {fmt} file is truncated or corrupt ({exc})") from None
    seconds = info["duration"]
    if seconds > limits.max_audio_seconds:
        raise refuse(ErrorCode.MEDIA_TOO_LARGE, where, f"the recording is {seconds:,.1f} s long, over "
                     f"media.max_audio_seconds ({limits.max_audio_seconds:g} s)")
    mime = {"WAV": "audio/wav", "MP3": "audio/mpeg", "FLAC": "audio/flac"}[fmt]
    return Checked("audio", mime, data, {"format": fmt, **info})


class _Bad(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.MEDIA_INVALID):
        super().__init__(message)
        self.code = code


def _wav_info(data: bytes) -> dict[str, Any]:
    if data[:4] != b"RIFF":
        raise _Bad(f"{data[:4].decode('latin-1')!r} WAV files are not taken (little-endian RIFF only)")
    if len(data) < 12:
        raise _Bad("the file is truncated (no RIFF header)")
    pos, fmt_chunk, data_size, data_start = 12, None, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if size < 16 or body + 16 > len(data):
                raise _Bad("the file is truncated (in its format chunk)")
            fmt_chunk = data[body:body + min(size, 40)]
        elif cid == b"data":
            data_start, data_size = body, size
            break
        pos = body + size + (size & 1)
    if fmt_chunk is None:
        raise _Bad("no format chunk: the file is truncated or not a WAV file")
    tag, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if tag == 0xFFFE and len(fmt_chunk) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the codec is the subformat's first bytes
        tag = struct.unpack_from("<H", fmt_chunk, 24)[0]
    if tag not in _WAV_CODECS:
        name = _WAV_NAMES.get(tag, f"codec 0x{tag:04x}")
        raise _Bad(f"the codec is {name}, which is not taken (WAV must be PCM, float, A-law or mu-law; "
                   "convert it, e.g. ffmpeg -i in.wav -c:a pcm_s16le out.wav)")
    if not channels or not rate or not block_align:
        raise _Bad(f"the header is corrupt ({channels} channels, {rate} Hz, block size {block_align})")
    if data_start is None:
        raise _Bad("no data chunk: the file is truncated or holds no audio")
    held = len(data) - data_start
    if data_size in (0xFFFFFFFF, 0) and held > 0:  # a streaming writer's "to the end"
        data_size = held
    if data_size == 0:
        raise _Bad("the file holds no audio (its data chunk is empty)")
    if data_size > held:
        raise _Bad(f"the file is truncated: its header says {data_size:,} bytes of samples, it holds {held:,}")
    return {"codec": _WAV_CODECS[tag], "sample_rate": rate, "channels": channels, "bits": bits,
            "duration": round(data_size / block_align / rate, 3)}


# MPEG audio frame header tables: bitrates (kbps) for layer III, by MPEG-1 / MPEG-2 and 2.5.
_MP3_BITRATES = {1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
                 2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def _mp3_frame(data: bytes, pos: int) -> tuple[int, int, int, int, int] | None:
    """(frame length, sample rate, samples per frame, bitrate bps, channels) of a layer III
    frame header at ``pos``, or None where none is."""
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
    version, layer = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_i, rate_i, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer != 1 or bitrate_i in (0, 15) or rate_i == 3:
        return None  # reserved version, not layer III, free/bad bitrate, reserved rate
    rate = _MP3_RATES[version][rate_i]
    bitrate = _MP3_BITRATES[1 if version == 3 else 2][bitrate_i] * 1000
    samples = 1152 if version == 3 else 576
    length = samples // 8 * bitrate // rate + padding
    channels = 1 if (b3 >> 6) == 3 else 2
    return length, rate, samples, bitrate, channels


def _mp3_info(data: bytes) -> dict[str, Any]:
    pos = 0
    if data[:3] == b"ID3":
        if len(data) < 10:
            raise _Bad("the file is truncated (in its ID3 tag)")
        size = 0
        for b in data[6:10]:
            size = (size << 7) | (b & 0x7F)
        pos = 10 + size + (10 if data[5] & 0x10 else 0)
        if pos >= len(data):
            raise _Bad("the file holds an ID3 tag and no audio (truncated?)")
    limit = min(len(data), pos + 64 * 1024)  # some junk before the first frame is common; more is not MP3
    frame = None
    while pos < limit:
        frame = _mp3_frame(data, pos)
        if frame is not None:
            nxt = pos + frame[0]
            if nxt + 4 > len(data) or _mp3_frame(data, nxt) is not None:
                break  # a second frame where the first says (or the file ends): real frames, not chance bytes
            frame = None
        pos = data.find(b"\xff", pos + 1, limit)
        if pos < 0:
            break
    if frame is None:
        raise _Bad("no MPEG layer III audio frame found (not an MP3 file, or another MPEG layer)")
    length, rate, samples, bitrate, channels = frame
    if pos + length > len(data):
        raise _Bad("the file is truncated (inside its first audio frame)")
    duration = _xing_duration(data, pos, rate, samples, channels)
    if duration is None:  # constant bitrate: the size says the duration
        duration = (len(data) - pos) * 8 / bitrate
    return {"codec": "MPEG layer III", "sample_rate": rate, "channels": channels, "bitrate": bitrate,
            "duration": round(duration, 3)}


def _xing_duration(data: bytes, pos: int, rate: int, samples: int, channels: int) -> float | None:
    """A VBR file's duration from its Xing/Info (or VBRI) header's frame count, if it has one."""
    mpeg1 = samples == 1152
    side = (32 if channels == 2 else 17) if mpeg1 else (17 if channels == 2 else 9)
    at = pos + 4 + side
    if data[at:at + 4] in (b"Xing", b"Info") and len(data) >= at + 12:
        flags = struct.unpack_from(">I", data, at + 4)[0]
        if flags & 1:
            return struct.unpack_from(">I", data, at + 8)[0] * samples / rate
    at = pos + 4 + 32
    if data[at:at + 4] == b"VBRI" and len(data) >= at + 18:
        return struct.unpack_from(">I", data, at + 14)[0] * samples / rate
    return None


def _flac_info(data: bytes) -> dict[str, Any]:
    if len(data) < 4 + 4 + 34:
        raise _Bad("the file is truncated (in its STREAMINFO header)")
    if data[4] & 0x7F != 0 or struct.unpack(">I", b"\x00" + data[5:8])[0] < 34:
        raise _Bad("the first metadata block is not STREAMINFO: the file is corrupt")
    info = data[8:8 + 34]
    packed = int.from_bytes(info[10:18], "big")
    rate = packed >> 44
    channels = ((packed >> 41) & 7) + 1
    bits = ((packed >> 36) & 31) + 1
    total = packed & ((1 << 36) - 1)
    if rate == 0:
        raise _Bad("the header says 0 Hz: the file is corrupt")
    pos = 4
    while True:  # the metadata blocks, then the first frame
        if pos + 4 > len(data):
            raise _Bad("the file is truncated (in its metadata)")
        last, size = data[pos] & 0x80, struct.unpack(">I", b"\x00" + data[pos + 1:pos + 4])[0]
        pos += 4 + size
        if last:
            break
    if pos + 2 > len(data):
        raise _Bad("the file holds no audio frames (truncated after its metadata)")
    if data[pos] != 0xFF or data[pos + 1] & 0xFE != 0xF8:
        raise _Bad("no audio frame where the metadata ends: the file is corrupt")
    if total:
        duration = total / rate
    else:  # unknown length: at least what the bytes would hold uncompressed
        duration = (len(data) - pos) / (rate * channels * max(1, bits // 8))
    return {"codec": "FLAC", "sample_rate": rate, "channels": channels, "bits": bits, "duration": round(duration, 3)}
