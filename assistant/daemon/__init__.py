"""The daemon side of the socket: everything ``assistant serve`` runs.

- ``daemon``: the ``Daemon``, which composes the parts below and runs them
- ``process``: one daemon per socket (lock, runtime dir, stale socket)
- ``server``: JSON-RPC 2.0 over the Unix socket (framing, dispatch, peer uid)
- ``methods/``: the RPC methods by area, each registered beside its handler
- ``params``: typed request parameters, checked at the edge
- ``registry``: the model registry, the one load path (targets and draft models)
- ``worker``: one loaded model and its single thread
- ``events``: the event bus (subscribed clients, plugins' on_event)
- ``conversation``, ``chat_settings``, ``tools``: what a chat request sends and how it decodes
- ``store``: SQLite persistence
"""

from __future__ import annotations

from typing import Any

__all__ = ["Daemon", "DaemonError", "VERSION"]


def __getattr__(name: str) -> Any:
    # Imported on first use (PEP 562): importing one part (the store, the
    # parameter layer) does not pull in the whole daemon.
    if name in ("Daemon", "VERSION"):
        from assistant.daemon import daemon

        return getattr(daemon, name)
    if name == "DaemonError":
        from assistant.daemon.process import DaemonError

        return DaemonError
    raise AttributeError(name)
