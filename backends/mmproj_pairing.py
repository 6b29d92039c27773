"""Whether a media projector (llama.cpp's ``mmproj-*.gguf``: a ``clip`` file that
turns images and audio into a text model's input embeddings) belongs to a model,
from the two GGUF headers alone (nothing is loaded), and which ``mmproj-*.gguf``
beside a model file does (:func:`find_sibling`), as llama.cpp's tools publish
them (``mmproj-<model>-f16.gguf`` next to the model's GGUF).

A projector pairs with a model when (:func:`projector_pairing`):

- it is a projector: ``general.architecture`` is ``clip`` and it has a vision
  or an audio encoder (``clip.has_vision_encoder`` / ``clip.has_audio_encoder``);
- each encoder's output embedding is as wide as the text model's input
  (``{arch}.embedding_length``): read from the projection tensor where
  llama.cpp does for that projector type (``clip_n_mmproj_embd``: Gemma 3's
  and Gemma 4's ``mm.input_projection`` / ``mm.a.input_projection``), else
  from ``clip.{vision,audio}.projection_dim``. libmtmd refuses a mismatch
  too, but only once the model is loaded and with a line in its log;
- a projector type made for one model family (Gemma 3's, Gemma 4's) is
  paired with that family's text architecture: two models of the same width
  would otherwise "pair" and read noise;
- the text model's llama.cpp graph takes embeddings at all: GLM-4 files
  without M-RoPE sections abort the process on the first image.

Every difference is named in :attr:`ProjectorPairing.differences`, and the
error of :func:`check_projector` names both files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import siblings
from .base import ModelLoadError
from .gguf import GGUFHeader, read_header

SIBLING_GLOB = "mmproj-*.gguf"

# projector type -> (its projection tensor, the ggml dimension that is the output width)
_PROJECTION_TENSORS = {
    "gemma3": ("mm.input_projection.weight", 0),
    "gemma3nv": ("mm.input_projection.weight", 0),
    "gemma4v": ("mm.input_projection.weight", 1),
    "gemma4uv": ("mm.input_projection.weight", 1),
    "gemma4a": ("mm.a.input_projection.weight", 1),
    "gemma4ua": ("mm.a.input_projection.weight", 1),
}

# projector type -> the text architectures it was made for (types not named: any)
_FAMILIES = {
    "gemma3": ("gemma3",), "gemma3nv": ("gemma3n",), "gemma3na": ("gemma3n",),
    "gemma4v": ("gemma4",), "gemma4uv": ("gemma4",), "gemma4a": ("gemma4",), "gemma4ua": ("gemma4",),
}

# Text architectures whose llama.cpp graph aborts the process on embeddings input unless the
# file has M-RoPE sections (src/models/glm4.cpp, glm4-moe.cpp: "does not support multimodal")
_MROPE_ONLY = ("glm4", "glm4moe")

_MODALITIES = (("vision", "image"), ("audio", "audio"))


@dataclass(frozen=True)
class ProjectorPairing:
    """How a projector pairs with a model: ``kinds`` are the media it reads
    ("image", "audio"), ``types`` its projector type per kind, ``differences``
    every reason it does not pair (``ok`` when there is none)."""

    projector: str
    model: str
    kinds: tuple[str, ...] = ()
    types: tuple[tuple[str, str], ...] = ()  # (kind, projector type)
    differences: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences

    def why(self) -> str:
        """One sentence: what it reads, or every reason it does not pair."""
        if self.ok:
            what = ", ".join(f"{k} ({t})" for k, t in self.types) or "nothing"
            return f"projector {self.projector} pairs with {self.model}: {what}"
        return f"projector {self.projector} does not belong to model {self.model}: " + "; ".join(self.differences)


def _header(path: str | os.PathLike, what: str) -> GGUFHeader:
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ModelLoadError(f"{what} {p} does not exist")
    if not p.is_file():  # a FIFO would block the open; a folder is not a GGUF file
        raise ModelLoadError(f"{what} {p} is not a regular file")
    try:
        return read_header(p)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{what}: {exc}") from None


def _projector_type(meta: dict[str, Any], modality: str) -> str | None:
    value = meta.get("clip.projector_type") or meta.get(f"clip.{modality}.projector_type")
    return str(value).lower() if value else None


def _output_width(header: GGUFHeader, modality: str, ptype: str | None) -> int | None:
    """The width of the embeddings the encoder for ``modality`` writes, as llama.cpp reads it."""
    spec = _PROJECTION_TENSORS.get(ptype or "")
    if spec is not None:
        tensor = header.tensor(spec[0])
        if tensor is not None and len(tensor["shape"]) > spec[1]:
            return int(tensor["shape"][spec[1]])
    value = header.meta.get(f"clip.{modality}.projection_dim")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _pairing(model: GGUFHeader, projector: GGUFHeader) -> ProjectorPairing:
    meta = projector.meta
    arch = meta.get("general.architecture")
    if arch != "clip":
        return ProjectorPairing(str(projector.path), str(model.path),
                                differences=(f"it is not a projector: its architecture is {arch!r}, "
                                             "a projector's is 'clip'",))
    t_arch = model.arch
    n_embd = model.arch_key("embedding_length")
    kinds, types, diffs = [], [], []
    for modality, kind in _MODALITIES:
        if not meta.get(f"clip.has_{modality}_encoder"):
            continue
        ptype = _projector_type(meta, modality)
        kinds.append(kind)
        types.append((kind, ptype or "unknown type"))
        width = _output_width(projector, modality, ptype)
        if width is not None and isinstance(n_embd, int) and width != n_embd:
            diffs.append(f"its {modality} output embedding size is {width}, the model's n_embd "
                         f"({t_arch}.embedding_length) is {n_embd}")
        family = _FAMILIES.get(ptype or "")
        if family is not None and t_arch not in family:
            diffs.append(f"its {modality} projector type {ptype} is made for {', '.join(family)} models, "
                         f"the model's architecture is {t_arch!r}")
    if not kinds:
        diffs.append("it has neither a vision nor an audio encoder (clip.has_vision_encoder / "
                     "clip.has_audio_encoder)")
    elif t_arch in _MROPE_ONLY and not model.arch_key("rope.dimension_sections"):
        diffs.append(f"the model's architecture {t_arch} takes media embeddings only when converted with "
                     f"M-RoPE sections ({t_arch}.rope.dimension_sections), which this file has not "
                     "(llama.cpp would stop the process)")
    return ProjectorPairing(str(projector.path), str(model.path), tuple(kinds), tuple(types), tuple(diffs))


def projector_pairing(model_path: str | os.PathLike, projector_path: str | os.PathLike, *,
                      model_header: GGUFHeader | None = None) -> ProjectorPairing:
    """How the projector at ``projector_path`` pairs with the model at ``model_path``
    (headers only). ModelLoadError when either file cannot be read as GGUF."""
    model = model_header if model_header is not None else _header(model_path, "model file")
    return _pairing(model, _header(projector_path, "projector"))


def check_projector(model_path: str | os.PathLike, projector_path: str | os.PathLike) -> ProjectorPairing:
    """The pairing when the projector belongs to the model; ModelLoadError naming
    both files and every difference when it does not (or cannot be read)."""
    try:
        pairing = projector_pairing(model_path, projector_path)
    except ModelLoadError as exc:
        raise ModelLoadError(f"projector {projector_path} for model {model_path}: {exc}") from None
    if not pairing.ok:
        raise ModelLoadError(pairing.why())
    return pairing


def find_sibling(model_path: str | os.PathLike, *,
                 model_header: GGUFHeader | None = None) -> tuple[str | None, list[str]]:
    """(the first ``mmproj-*.gguf`` beside ``model_path`` that pairs with it, or None;
    one line per candidate saying why it was taken or not). Never raises: a
    candidate that does not pair, or cannot be read, is a line (``siblings.find_sibling``)."""
    return siblings.find_sibling(
        model_path, SIBLING_GLOB,
        read_model=lambda model: model_header if model_header is not None else _header(model, "model file"),
        pair=lambda header, cand: _pairing(header, _header(cand, "projector")),
        why=lambda pairing: ", ".join(pairing.kinds))
