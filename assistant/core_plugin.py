"""The core plugin: built-in backends and drafters register through the same
hooks a third-party plugin uses. It is always loaded, even with --no-plugins."""

from __future__ import annotations

from assistant.hookspecs import hookimpl


@hookimpl
def register_backends(register):
    from backends import BUILTIN_BACKENDS

    for name, target in BUILTIN_BACKENDS.items():
        register(name, target)  # "module:Class", imported when first used


@hookimpl
def register_drafters(register):
    """The built-in drafters (ngram, draft, mtp); ``auto`` and ``off`` are modes, never registered."""
    from assistant.inference.speculative import BUILTIN_DRAFTERS

    for name, factory in BUILTIN_DRAFTERS.items():
        register(name, factory)
