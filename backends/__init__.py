"""Inference backends behind one interface (see ``backends.base``).

Backends are looked up by name in a :class:`BackendRegistry`; their modules
are imported only when used, so a machine without a backend's library can
still run everything else. There is no global registry: whoever runs models
(the daemon) fills one from what the plugins registered, the built-ins
included (the core plugin registers ``BUILTIN_BACKENDS``).
"""

from __future__ import annotations

import importlib
import types
from typing import Iterable, Mapping

from .base import Backend, BackendUnavailable

# name -> "module:Class". The core plugin registers these through the
# register_backends hook, like any plugin's backends. Read-only: registries
# are filled from it, it is never filled.
BUILTIN_BACKENDS: Mapping[str, str] = types.MappingProxyType({
    "llama.cpp": "backends.llamacpp:LlamaCppBackend",
    "mlx": "backends.mlx_backend:MLXBackend",
    # An OpenAI-compatible server named by a model alias (backend: remote, url).
    "remote": "backends.remote:RemoteBackend",
})


class BackendRegistry:
    """Backends by name: a Backend subclass, or "module:Class" imported on first use."""

    def __init__(self, backends: Mapping[str, type[Backend] | str] | None = None):
        self._targets: dict[str, type[Backend] | str] = {}
        for name, target in (backends or {}).items():
            self.register(name, target)

    @classmethod
    def builtin(cls) -> "BackendRegistry":
        """A registry of the built-in backends only (for tools and tests that load no plugins)."""
        return cls(BUILTIN_BACKENDS)

    def register(self, name: str, target: type[Backend] | str) -> None:
        """Make a backend available by name; a later registration of the name replaces it."""
        if not (isinstance(target, str) or (isinstance(target, type) and issubclass(target, Backend))):
            raise TypeError(f"backend {name!r}: expected a Backend subclass or 'module:Class', got {target!r}")
        self._targets[name] = target

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._targets)

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def get(self, name: str) -> type[Backend]:
        """The backend class called ``name``.

        Raises ``BackendUnavailable`` naming the known backends for an unknown
        name, and with the import error for a module that cannot be imported."""
        target = self._targets.get(name)
        if target is None:
            raise BackendUnavailable(f"unknown backend {name!r}; known backends: {', '.join(self._targets)}")
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            try:
                target = getattr(importlib.import_module(module), attr)
            except Exception as exc:  # noqa: BLE001 - a broken backend module must not take its caller down
                raise BackendUnavailable(f"backend {name!r} could not be imported from {module}: "
                                         f"{type(exc).__name__}: {exc}") from exc
            self._targets[name] = target  # imported once
        return target

    def availability(self, names: Iterable[str] | None = None) -> dict[str, tuple[bool, str]]:
        """{name: (can it run here?, why)} for ``names`` (default: all), in registration order.

        Asks each backend class (``Backend.availability``), importing it; a
        backend whose module is broken, or whose check raises, is just
        unavailable, with the error as the reason."""
        wanted = self.names() if names is None else [n for n in names if n in self._targets]
        result = {}
        for name in wanted:
            try:
                result[name] = self.get(name).availability()
            except Exception as exc:  # noqa: BLE001 - see the docstring
                result[name] = (False, str(exc) if isinstance(exc, BackendUnavailable)
                                else f"{type(exc).__name__}: {exc}")
        return result
