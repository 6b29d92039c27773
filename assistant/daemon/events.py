"""The event bus: what happened in the daemon, for clients and plugins.

An event is ``{"type", "time", "source", "data"}``. Publishing one sends it
to every connection subscribed to a matching pattern (``events.subscribe``),
keeps it in a bounded backlog for late subscribers, and hands it to the
plugins' ``on_event`` hooks.
"""

from __future__ import annotations

import asyncio
import collections
import fnmatch
import time
from typing import Any, Callable

from assistant.daemon.server import RPCServer

BACKLOG = 500


class EventBus:
    """Publishes events from the event loop or any thread."""

    def __init__(self, server: RPCServer, on_event: Callable[[dict[str, Any]], None]):
        self.server = server
        self.on_event = on_event  # the plugins' hook, scheduled by the daemon
        self.backlog: collections.deque[dict[str, Any]] = collections.deque(maxlen=BACKLOG)

    def emit(self, type_: str, data: dict[str, Any] | None = None, *, source: str = "daemon") -> dict[str, Any]:
        """Publish an event and return it. Thread-safe: from another thread
        (sync plugin hooks run in threads) it is handed to the loop."""
        event = {"type": type_, "time": time.time(), "source": source, "data": data or {}}
        try:
            in_loop = asyncio.get_running_loop() is self.server.loop
        except RuntimeError:
            in_loop = False
        if in_loop or self.server.loop is None:
            self._publish(event)
        else:
            self.server.loop.call_soon_threadsafe(self._publish, event)
        return event

    def _publish(self, event: dict[str, Any]) -> None:
        self.backlog.append(event)
        self.server.broadcast(event["type"], "event", event)
        self.on_event(event)

    def recent(self, patterns: list[str], limit: int) -> list[dict[str, Any]]:
        """The last ``limit`` events whose type matches one of ``patterns``."""
        if not limit:
            return []
        matching = [e for e in self.backlog if any(fnmatch.fnmatchcase(e["type"], p) for p in patterns)]
        return matching[-limit:]
