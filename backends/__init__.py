"""Inference backends behind one interface (see ``backends.base``).

Backends are looked up by name; their modules are imported only when used,
so a machine without a backend's library can still run everything else.
"""

from __future__ import annotations

import importlib

from .base import Backend, BackendUnavailable

# name -> "module:Class". The core plugin registers these through the
# register_backends hook, like any plugin's backends.
BUILTIN_BACKENDS: dict[str, str] = {
    "llama.cpp": "backends.llamacpp:LlamaCppBackend",
    "mlx": "backends.mlx_backend:MLXBackend",
}

# name -> a Backend subclass or a "module:Class" string imported on first use
_registry: dict[str, type[Backend] | str] = dict(BUILTIN_BACKENDS)


def register_backend(name: str, target: type[Backend] | str) -> None:
    """Make a backend available by name (the plugin host calls this)."""
    _registry[name] = target


def backend_names() -> list[str]:
    return list(_registry)


def get_backend_class(name: str) -> type[Backend]:
    """The backend class called ``name``; BackendUnavailable names the choices."""
    target = _registry.get(name)
    if target is None:
        raise BackendUnavailable(f"unknown backend {name!r}; known backends: {', '.join(_registry)}")
    if isinstance(target, str):
        module, _, cls = target.partition(":")
        target = getattr(importlib.import_module(module), cls)
        _registry[name] = target
    return target
