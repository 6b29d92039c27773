"""A tiny random-weight media projector (``mmproj-*.gguf``) for the tiny Gemma 4
target of tests/gemma4_files.py: vision ``gemma4uv`` and audio ``gemma4ua`` in one
``clip`` file, written with tests/gguf_writer.py (about 200 KB).

The layout is Gemma 4 "unified"'s as llama.cpp reads it (llama-cpp-python 0.3.36,
tools/mtmd/clip.cpp, models/gemma4uv.cpp, models/gemma4ua.cpp; see
shared/notes/gemma4-gguf-facts.md): no transformer layers (``block_count`` 0).

- vision: each ``(3P)x(3P)`` RGB patch (``P`` = ``clip.vision.patch_size``; the
  unified model folds its 3x3 pooling into the patch) is layer-normed
  (``v.patch_norm.1``), embedded (``v.patch_embd``, EV wide), normed, given learned
  x and y position embeddings (``v.position_embd``: 2 tables), normed again, then
  RMS-normed and projected to the text model's width E (``mm.input_projection``);
- audio: raw 16 kHz samples in 640-sample frames, RMS-normed and projected to E
  (``mm.a.input_projection``): one token per 40 ms.

Random weights: the plumbing (counts, positions, KV cache, prefix reuse) is real,
what the model "sees" is noise.

:func:`write_media_pair` is the fixture other tests use: a target and its
projector in a folder, the projector named as llama.cpp's tools publish them
(``mmproj-<model>.gguf``) so sibling discovery finds it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gemma4_files import Gemma4Shape, write_target
from gguf_writer import random_weights, write_gguf

AUDIO_FRAME = 640  # samples per audio token (gemma4ua: 40 ms at 16 kHz)


@dataclass(frozen=True)
class ProjectorShape:
    """The sizes of a ``gemma4uv`` + ``gemma4ua`` projector into a text model ``n_embd`` wide."""

    n_embd: int = 64  # the text model's hidden size (the projection's output)
    vision_embd: int = 32  # EV
    patch_size: int = 2  # P; the effective patch is 3P (the unified model's 3x3 pooling)
    image_size: int = 96
    positions: int = 256  # rows of each position table: patches per side it can place
    vision: bool = True
    audio: bool = True


def projector_metadata(shape: ProjectorShape, *, name: str = "tiny-gemma4-mmproj") -> dict:
    """The ``clip`` metadata of the projector."""
    meta: dict = {"general.architecture": "clip", "general.name": name, "general.file_type": 0,
                  "clip.has_vision_encoder": shape.vision, "clip.has_audio_encoder": shape.audio}
    if shape.vision:
        meta.update({
            "clip.vision.projector_type": "gemma4uv",
            "clip.vision.image_size": shape.image_size, "clip.vision.patch_size": shape.patch_size,
            "clip.vision.embedding_length": shape.vision_embd, "clip.vision.feed_forward_length": 0,
            "clip.vision.block_count": 0, "clip.vision.attention.head_count": 1,
            "clip.vision.projection_dim": shape.n_embd, "clip.vision.attention.layer_norm_epsilon": 1e-6,
            "clip.vision.image_mean": [0.5, 0.5, 0.5], "clip.vision.image_std": [0.5, 0.5, 0.5],
        })
    if shape.audio:
        meta.update({
            "clip.audio.projector_type": "gemma4ua",
            "clip.audio.embedding_length": AUDIO_FRAME, "clip.audio.feed_forward_length": 0,
            "clip.audio.block_count": 0, "clip.audio.attention.head_count": 1,
            "clip.audio.projection_dim": shape.n_embd, "clip.audio.attention.layer_norm_epsilon": 1e-6,
            "clip.audio.num_mel_bins": AUDIO_FRAME,
        })
    return meta


def projector_tensor_shapes(shape: ProjectorShape) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (numpy row-major order) of the projector."""
    t: dict[str, tuple[int, ...]] = {}
    if shape.vision:
        ev, patch = shape.vision_embd, (3 * shape.patch_size) ** 2 * 3
        t.update({
            "v.patch_norm.1.weight": (patch,), "v.patch_norm.1.bias": (patch,),
            "v.patch_embd.weight": (ev, patch), "v.patch_embd.bias": (ev,),
            "v.patch_norm.2.weight": (ev,), "v.patch_norm.2.bias": (ev,),
            "v.position_embd.weight": (2, shape.positions, ev),
            "v.patch_norm.3.weight": (ev,), "v.patch_norm.3.bias": (ev,),
            "mm.input_projection.weight": (shape.n_embd, ev),
        })
    if shape.audio:
        t["mm.a.input_projection.weight"] = (shape.n_embd, AUDIO_FRAME)
    return t


def write_projector(path: Path, shape: ProjectorShape | None = None, *, seed: int = 2,
                    meta_overrides: dict | None = None) -> Path:
    """A tiny random projector GGUF at ``path`` (F32 throughout: about 200 KB).
    ``meta_overrides`` replaces metadata keys (a projector that must not pair)."""
    shape = shape or ProjectorShape()
    rng = np.random.default_rng(seed)
    w, norm = random_weights(rng)
    tensors = {}
    for name, shp in projector_tensor_shapes(shape).items():
        if name.endswith(".bias"):
            arr = (0.01 * rng.standard_normal(shp)).astype(np.float32)
        elif len(shp) == 1:
            arr = norm(shp[0])
        elif name == "v.position_embd.weight":
            arr = (0.1 * rng.standard_normal(shp)).astype(np.float32)
        else:
            arr = w(*shp)
        tensors[name] = (arr, "F32")
    meta = projector_metadata(shape)
    meta.update(meta_overrides or {})
    return write_gguf(path, meta, tensors)


def write_media_pair(directory: Path, *, target_shape: Gemma4Shape | None = None,
                     projector_shape: ProjectorShape | None = None, name: str = "tiny-gemma4",
                     projector_name: str | None = None, seed: int = 0) -> tuple[Path, Path]:
    """(model, projector): a tiny Gemma 4 target ``<name>.gguf`` and its projector
    ``mmproj-<name>.gguf`` (or ``projector_name``) beside it, in ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target_shape = target_shape or Gemma4Shape()
    projector_shape = projector_shape or ProjectorShape(n_embd=target_shape.n_embd)
    model = write_target(directory / f"{name}.gguf", target_shape, seed=seed, name=name)
    projector = write_projector(directory / (projector_name or f"mmproj-{name}.gguf"), projector_shape)
    return model, projector


def png_bytes(width: int = 48, height: int = 48, *, text: str | None = None, seed: int = 0) -> bytes:
    """A PNG image: random colours, or ``text`` drawn on white (Pillow)."""
    import io

    from PIL import Image, ImageDraw

    if text is None:
        rng = np.random.default_rng(seed)
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    else:
        img = Image.new("RGB", (width, height), "white")
        ImageDraw.Draw(img).text((4, 4), text, fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, *, rate: int = 16000, freq: float = 440.0, channels: int = 1) -> bytes:
    """A 16-bit PCM WAV of a sine tone (the standard library's ``wave``)."""
    import io
    import wave

    n = int(seconds * rate)
    t = np.arange(n) / rate
    samples = (0.3 * np.sin(2 * np.pi * freq * t) * 32767).astype("<i2")
    if channels > 1:
        samples = np.repeat(samples[:, None], channels, axis=1)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(channels)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes(samples.tobytes())
    return buf.getvalue()
