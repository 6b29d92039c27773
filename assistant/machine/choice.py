"""Which backend runs a model: the one answer ``assistant doctor`` and the daemon share.

A backend is asked for by name from a request (``--backend``), a model
alias, a profile or the top-level ``backend:`` key; ``auto`` (or nothing)
lets the machine decide. :func:`choose_backend` turns that into a backend
that is registered and can run here, or a :class:`BackendChoiceError` that
says why not. It is a pure function of its arguments: the caller measures
the machine and asks the backend registry what is available
(``backends.BackendRegistry.availability``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends import BackendRegistry

from assistant.machine.hardware import Machine

if TYPE_CHECKING:
    from assistant.plugin_host import PluginHost

log = logging.getLogger("assistant.backends")

AUTO = "auto"


def backend_registry(plugins: PluginHost) -> BackendRegistry:
    """The one registry of backends: what plugins registered through
    ``register_backends``, the core plugin's built-ins first.

    ``plugins`` must be loaded and collected (``PluginHost.collect``). A
    registration that is not a Backend subclass or "module:Class" is logged
    and left out."""
    registry = BackendRegistry()
    for name, (target, plugin) in plugins.backends.items():
        try:
            registry.register(name, target)
        except TypeError as exc:
            log.error("plugin %s: register_backends: %s", plugin, exc)
    return registry


@dataclass(frozen=True)
class BackendChoice:
    """The backend picked (``name``) and why, in words for ``doctor`` and logs."""

    name: str
    reason: str


class BackendChoiceError(ValueError):
    """No backend can serve the request: the name is unknown, or the backend cannot run here.

    ``str(err)`` is the message for users. ``choice`` is what would have been
    picked when the backend exists but is unavailable (``doctor`` still shows
    it, with the reason it cannot run); None for an unknown name."""

    def __init__(self, message: str, choice: BackendChoice | None = None):
        super().__init__(message)
        self.message = message
        self.choice = choice


def choose_backend(requested: str | None, machine: Machine,
                   availability: dict[str, tuple[bool, str]]) -> BackendChoice:
    """The backend for ``requested`` on ``machine``.

    ``availability`` is {registered backend: (can run here?, why)}.
    ``auto`` or None picks mlx on darwin-arm64 when it is available and
    llama.cpp everywhere else; any other registered name (built-in or a
    plugin's) is taken as pinned. Raises :class:`BackendChoiceError` for a
    name that is not registered, or a choice that is not available."""
    requested = requested or AUTO
    if requested == AUTO:
        choice = _auto(machine, availability)
    elif requested in availability:
        choice = BackendChoice(requested, "pinned in config")
    else:
        raise BackendChoiceError(f"unknown backend {requested!r}; known backends: "
                                 f"{', '.join([AUTO, *availability])}")
    ok, why = availability.get(choice.name, (False, "not installed"))
    if not ok:
        raise BackendChoiceError(f"backend {choice.name!r} is not available: {why}", choice)
    return choice


def _auto(machine: Machine, availability: dict[str, tuple[bool, str]]) -> BackendChoice:
    mlx_ok, mlx_why = availability.get("mlx", (False, "not checked"))
    if machine.os == "darwin" and machine.arch == "arm64":
        if mlx_ok:
            return BackendChoice("mlx", "auto: Apple Silicon (darwin-arm64) with mlx-lm installed")
        return BackendChoice("llama.cpp", f"auto: Apple Silicon, but MLX is unavailable ({mlx_why}); "
                                          f"llama.cpp runs on Metal")
    if machine.os == "darwin" and machine.apple_silicon:
        return BackendChoice("llama.cpp", f"auto: Apple Silicon, but this Python is {machine.arch} (Rosetta), "
                                          f"which MLX does not support; install a native arm64 Python to use MLX")
    return BackendChoice("llama.cpp", f"auto: llama.cpp on {machine.platform_tag} "
                                      f"(MLX is only picked on Apple Silicon)")
