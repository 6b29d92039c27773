"""Inference backends behind one interface (see ``backends.base``).

Backends are looked up by name; their modules are imported only when used,
so a machine without a backend's library can still run everything else.
"""

from __future__ import annotations

import importlib

from .base import Backend, BackendUnavailable

# name -> "module:Class". The plugin system adds to this through register_backends.
BUILTIN_BACKENDS: dict[str, str] = {
    "llama.cpp": "backends.llamacpp:LlamaCppBackend",
}


def backend_names() -> list[str]:
    return list(BUILTIN_BACKENDS)


def get_backend_class(name: str) -> type[Backend]:
    """The backend class called ``name``; BackendUnavailable names the choices."""
    target = BUILTIN_BACKENDS.get(name)
    if target is None:
        raise BackendUnavailable(f"unknown backend {name!r}; known backends: {', '.join(BUILTIN_BACKENDS)}")
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
