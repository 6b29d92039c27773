"""A local AI assistant: an asyncio daemon that owns a local model, a JSON-RPC
protocol over a Unix socket, a CLI, a terminal UI and pluggy plugins.

Plugins mark their hook functions with ``@assistant.hookimpl``; hooks that
deal with the running daemon get an ``assistant.PluginContext`` (the plugin
API, ``assistant.plugin_api``)."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from assistant.hookspecs import hookimpl, hookspec
    from assistant.plugin_api import PluginContext

__all__ = ["hookimpl", "hookspec", "PluginContext", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): pluggy and importlib.metadata cost ~50 ms,
    # which every command (and the TUI's first frame) would pay otherwise.
    if name in ("hookimpl", "hookspec"):
        from assistant import hookspecs

        return getattr(hookspecs, name)
    if name == "PluginContext":
        from assistant.plugin_api import PluginContext

        return PluginContext
    if name == "__version__":
        from importlib import metadata

        try:
            version = metadata.version("local-assistant")
        except metadata.PackageNotFoundError:  # running from a source tree
            version = "0.0.0+source"
        globals()["__version__"] = version
        return version
    raise AttributeError(f"module 'assistant' has no attribute {name!r}")
