"""Companion files found beside a model: the first ``<prefix>-*.gguf`` that pairs with it.

llama.cpp's tools publish a model's companions next to it (an MTP drafter as
``mtp-*.gguf``, a media projector as ``mmproj-*.gguf``). Both are looked for the
same way (backends/mtp_pairing.py, backends/mmproj_pairing.py): every candidate
is checked against the model's header, the first that pairs is taken, and each
one gets a line saying why it was taken or not (``assistant doctor`` prints them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .base import ModelLoadError

__all__ = ["find_sibling"]


def find_sibling(model_path: str | os.PathLike, pattern: str, *, read_model: Callable[[Path], Any],
                 pair: Callable[[Any, Path], Any], why: Callable[[Any], str]) -> tuple[str | None, list[str]]:
    """(the first file matching ``pattern`` beside ``model_path`` that pairs with it, or
    None; one line per candidate). ``read_model(model)`` reads the model's header once;
    ``pair(header, candidate)`` gives a pairing (``ok``, ``differences``); ``why(pairing)``
    says what a taken one pairs by. Never raises: a model or candidate that cannot be
    read (``ModelLoadError``, ``OSError`` listing the folder) is a line."""
    model = Path(os.path.expanduser(str(model_path)))
    try:
        if not model.is_file():
            return None, []
        candidates = sorted(p for p in model.parent.glob(pattern) if p.resolve() != model.resolve())
    except OSError as exc:
        return None, [f"cannot list {model.parent}: {exc.strerror or exc}"]
    if not candidates:
        return None, []
    try:
        header = read_model(model)
    except ModelLoadError as exc:
        return None, [f"not looked at the {pattern} files beside it: {exc}"]
    found, lines = None, []
    for cand in candidates:
        try:
            pairing = pair(header, cand)
        except ModelLoadError as exc:
            lines.append(f"{cand.name}: ignored: {exc}")
            continue
        if not pairing.ok:
            lines.append(f"{cand.name}: ignored: does not pair: " + "; ".join(pairing.differences))
        elif found is None:
            found = str(cand)
            lines.append(f"{cand.name}: taken: pairs with {model.name} ({why(pairing)})")
        else:
            lines.append(f"{cand.name}: pairs too, not taken: {Path(found).name} was found first")
    return found, lines
