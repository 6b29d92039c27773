"""A local AI assistant: an asyncio daemon that owns a local model, a JSON-RPC
protocol over a Unix socket, a CLI, a terminal UI and pluggy plugins."""

from importlib import metadata

try:
    __version__ = metadata.version("local-assistant")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+source"
