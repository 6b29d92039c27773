"""Reading an audio file a skill was asked to transcribe: checked, then decoded in chunks.

Decoding goes through PyAV (FFmpeg; faster-whisper's own dependency), so WAV,
FLAC, MP3, Ogg/Opus, M4A/AAC and the audio of video files all read. Nothing
holds a whole recording: ``chunks`` resamples to 16 kHz mono as it decodes
and hands over ``chunk_seconds`` at a time (a two-hour file is 460 MB as float
samples; a five-minute chunk is 19 MB), cutting at the quietest moment near
the chunk's end so a word is rarely split between two chunks.

Checks, before any decoding: a regular file, not empty, under ``max_bytes``;
for WAV, the header against the file (a data chunk promising more bytes than
the file holds is a truncated file); a container FFmpeg recognises, with an
audio stream whose codec it can decode; the duration against ``max_seconds``
(from the header, and again while decoding, for files that do not say).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from assistant import plugin_api

SAMPLE_RATE = 16000  # what Whisper takes
MAX_BYTES = 2 * 1024 ** 3
MAX_SECONDS = 3 * 3600
CHUNK_SECONDS = 300
CUT_WINDOW_S = 3.0  # how far back from a chunk's end to look for a quiet moment to cut at
QUIET_FRAME_S = 0.05  # energy is measured per frame this long
PAUSE_S = 0.3  # ... and cuts go in the middle of the quietest stretch this long


# What FFmpeg may open: audio (and audio-and-video) containers only, on the local file
# protocol only. FFmpeg picks a demuxer by content, not by name, and some demuxers open
# further inputs named in the file (HLS playlists fetch URLs, ffconcat lists read other
# files): a "recording" that is really a playlist must not make the daemon fetch or read
# anything else.
OPEN_OPTIONS = {
    "format_whitelist": "wav,w64,flac,mp3,ogg,mov,matroska,aac,aiff,caf,au,wv,ape,tta,amr,asf,avi,mpeg,mpegts,"
                        "ac3,eac3,dts,truehd,mlp",
    "protocol_whitelist": "file",
}


def _open(path: Path):
    import av

    return av.open(str(path), options=dict(OPEN_OPTIONS), metadata_errors="ignore")


class AudioFileError(ValueError):
    """The file cannot be read as audio (or is over a limit); the message says why, naming the file."""


@dataclass
class AudioInfo:
    """What a recording is, from its headers."""

    format: str  # FFmpeg's container name: "wav", "flac", "mp3", "ogg", "mov,mp4,m4a,3gp,3g2,mj2", ...
    codec: str  # "pcm_s16le", "flac", "mp3", "opus", "aac", ...
    duration: float | None  # seconds, None when the file does not say
    sample_rate: int
    channels: int
    bytes: int


def input_file(path: Any, *, max_bytes: int) -> Path:
    """The file a skill's ``path`` names, checked (``plugin_api.input_file``)."""
    return plugin_api.input_file(path, max_bytes=max_bytes, what="audio", error=AudioFileError)


def wav_problem(path: Path) -> str | None:
    """What is wrong with a RIFF/WAVE file's structure, or None (also for other formats).

    FFmpeg reads a truncated WAV without complaint (it takes the duration from the
    file's size), so a recording cut short would pass as a shorter one: the data
    chunk's declared size is checked against the bytes there. A size of 0 or
    0xFFFFFFFF is what streaming recorders write before they know it: not a truncation.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            if head[:4] == b"RIFF" and len(head) < 12:
                return f"the WAV file is truncated: {size} bytes, not even a whole header"
            return None
        pos = 12
        seen_fmt = False
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                if not seen_fmt:
                    return "the WAV file is truncated: it ends before its format chunk"
                if chunk or pos != size:
                    return "the WAV file is truncated: it ends before its data chunk"
                return "the WAV file holds no data chunk (no audio)"
            kind, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            body = pos + 8
            if kind == b"fmt ":
                seen_fmt = True
            elif kind == b"data":
                if head[:4] == b"RF64" or length in (0, 0xFFFFFFFF):
                    return None
                held = size - body
                if held < length:
                    return (f"the WAV file is truncated: its header promises {length:,} bytes of audio, the "
                            f"file holds {max(held, 0):,}")
                return None
            pos = body + length + (length & 1)  # chunks are word-aligned
            f.seek(pos)


def wav_format_tag(path: Path) -> int | None:
    """A WAV file's format tag (1 is PCM), or None when it is not a WAV with a format chunk."""
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            kind, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if kind == b"fmt ":
                fmt = f.read(2)
                return struct.unpack("<H", fmt)[0] if len(fmt) == 2 else None
            f.seek(length + (length & 1), os.SEEK_CUR)


def probe(path: Path) -> AudioInfo:
    """The recording's container, codec and duration, or AudioFileError saying what it is not."""
    import av

    problem = wav_problem(path)
    if problem:
        raise AudioFileError(f"{path}: {problem}")
    try:
        container = _open(path)
    except (av.error.FFmpegError, ValueError) as exc:
        with open(path, "rb") as f:
            head = f.read(8)
        raise AudioFileError(f"{path}: not an audio file FFmpeg can read (it starts with {head!r}): "
                             f"{_ffmpeg_message(exc)}") from None
    with container:
        streams = container.streams.audio
        if not streams:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise AudioFileError(f"{path}: no audio in it (a {container.format.name} file holding "
                                 f"{', '.join(kinds)})")
        stream = streams[0]
        ctx = stream.codec_context
        if ctx is None:
            tag = wav_format_tag(path)
            what = f"WAV format tag 0x{tag:04X}" if tag is not None else f"in a {container.format.name} file"
            raise AudioFileError(f"{path}: unsupported audio codec ({what}): FFmpeg has no decoder for it")
        duration = None
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        return AudioInfo(container.format.name, ctx.name, duration, int(ctx.sample_rate or 0),
                         int(ctx.channels or 0), path.stat().st_size)


def _ffmpeg_message(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(":")[0] if text else type(exc).__name__


def chunks(path: Path, *, chunk_seconds: float = CHUNK_SECONDS, max_seconds: float = MAX_SECONDS
           ) -> Iterator[tuple[float, Any]]:
    """Decode ``path`` as 16 kHz mono float32 and yield ``(offset_seconds, samples)``
    about ``chunk_seconds`` at a time (the last one shorter).

    Cuts fall at the quietest ``QUIET_FRAME_S`` within ``CUT_WINDOW_S`` of each
    chunk's nominal end. More than ``max_seconds`` of audio raises AudioFileError
    (checked as it decodes: some files do not say how long they are).
    """
    import av
    import numpy as np

    chunk_len = int(chunk_seconds * SAMPLE_RATE)
    window = min(int(CUT_WINDOW_S * SAMPLE_RATE), chunk_len // 2)
    pending: list[Any] = []
    held = 0
    offset = 0  # samples already yielded
    try:
        container = _open(path)
    except (av.error.FFmpegError, ValueError) as exc:
        raise AudioFileError(f"{path}: cannot open it: {_ffmpeg_message(exc)}") from None
    with container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in _frames(container, stream, resampler):
                samples = frame.to_ndarray().reshape(-1)
                pending.append(samples)
                held += samples.shape[0]
                if (offset + held) / SAMPLE_RATE > max_seconds:
                    raise AudioFileError(f"{path}: longer than the {max_seconds:g} s limit (plugin setting "
                                         "max_seconds)")
                while held >= chunk_len + window:
                    buf = np.concatenate(pending)
                    cut = _quiet_cut(buf, chunk_len, window)
                    yield offset / SAMPLE_RATE, buf[:cut].astype(np.float32) / 32768.0
                    offset += cut
                    pending, held = [buf[cut:]], buf.shape[0] - cut
        except av.error.FFmpegError as exc:
            at = (offset + held) / SAMPLE_RATE
            raise AudioFileError(f"{path}: the audio cannot be decoded at {at:.1f} s: {_ffmpeg_message(exc)}") \
                from None
    if held:
        buf = np.concatenate(pending)
        yield offset / SAMPLE_RATE, buf.astype(np.float32) / 32768.0


def _frames(container: Any, stream: Any, resampler: Any) -> Iterator[Any]:
    for frame in container.decode(stream):
        frame.pts = None  # the resampler would otherwise check timestamps it does not need
        yield from resampler.resample(frame)
    yield from resampler.resample(None)  # flush


def _quiet_cut(buf: Any, chunk_len: int, window: int) -> int:
    """The sample index to cut ``buf`` at: the middle of the quietest ``PAUSE_S`` stretch
    in ``[chunk_len - window, chunk_len + window)``.

    A stretch, not a single short frame: the silence inside a word (the closure of a
    "t") is short; a pause between words or sentences is longer.
    """
    import numpy as np

    frame = int(QUIET_FRAME_S * SAMPLE_RATE)
    span = max(1, int(PAUSE_S / QUIET_FRAME_S))  # frames per stretch
    lo, hi = chunk_len - window, chunk_len + window
    region = buf[lo:hi].astype(np.float32)
    n = region.shape[0] // frame
    if n < span:
        return chunk_len
    energy = (region[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    stretch = np.convolve(energy, np.ones(span), mode="valid")  # stretch[i]: frames i .. i + span - 1
    # Of equally quiet stretches (silence, a steady tone), the one nearest the nominal end.
    quiet = np.flatnonzero(stretch <= stretch.min() * 1.0001 + 1e-12)
    middle = (chunk_len - lo - (span * frame) // 2) / frame  # the stretch index centred on chunk_len
    best = int(quiet[np.argmin(np.abs(quiet - middle))])
    return lo + (best * frame) + (span * frame) // 2
