"""Which models an HTTP client may name, and what the listings say about them.

HTTP clients name models by alias only: the config's ``models:`` entries and
the built-in aliases, or nothing (the config's default model, whatever it
is). Never a path: over JSON-RPC the daemon's own user may load any file,
but a network client naming a path could make the daemon open any file the
daemon's user can read. Ollama's clients add a tag (``name:latest``), which
is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from typing import Any

from assistant.config.models import BUILTINS, list_models
from assistant.daemon.http.errors import HttpError


def aliases(config: Any) -> list[str]:
    """Every name a client may use, config aliases first."""
    names = list(getattr(config, "models", None) or {})
    return names + [n for n in BUILTINS if n not in names]


def resolve(config: Any, name: Any, *, param: str = "model") -> str | None:
    """The alias ``name`` stands for (None: the default model); HttpError 400/404 otherwise."""
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise HttpError(400, f"'{param}' must be a string (a model alias)", param=param)
    known = aliases(config)
    if name in known:
        return name
    if name.endswith(":latest") and name[: -len(":latest")] in known:
        return name[: -len(":latest")]
    shown = name if len(name) <= 80 else name[:80] + "..."
    raise HttpError(404, f"the model {shown!r} does not exist; models are named by alias: {', '.join(known)}",
                    code="model_not_found", param=param)


async def listing(config: Any) -> list[dict[str, Any]]:
    """The aliases a client may use, with what ``list_models`` knows of them (off the loop: it stats
    files), leaving out those that cannot be used (their file is missing)."""
    loop = asyncio.get_running_loop()
    entries = await loop.run_in_executor(None, list_models, config)
    out = []
    for entry in entries:
        remote = entry.get("backend") == "remote"  # no file here: the server has it
        if not remote and (entry.get("error") or (not entry.get("present") and not entry.get("builtin"))):
            continue
        out.append(entry)
    return out


def modified(entry: dict[str, Any]) -> float:
    """When the model's file changed (now, if it cannot be known)."""
    try:
        return os.stat(entry["path"]).st_mtime if entry.get("path") else time.time()
    except OSError:
        return time.time()


def digest(entry: dict[str, Any]) -> str:
    """A stable id of the model's file (its path, size and time: hashing gigabytes is not worth it)."""
    seed = f"{entry.get('path')}|{entry.get('size_bytes')}|{modified(entry):.0f}"
    return hashlib.sha256(seed.encode()).hexdigest()
