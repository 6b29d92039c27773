"""A local AI assistant: an asyncio daemon that owns a local model, a JSON-RPC
protocol over a Unix socket, a CLI, a terminal UI and pluggy plugins.

Plugins mark their hook functions with ``@assistant.hookimpl``."""

from importlib import metadata

from .hookspecs import hookimpl, hookspec

try:
    __version__ = metadata.version("local-assistant")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"

__all__ = ["hookimpl", "hookspec", "__version__"]
