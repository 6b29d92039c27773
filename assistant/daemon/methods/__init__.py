"""The daemon's JSON-RPC methods, grouped by area, each registered beside its handler.

A module of methods makes ``rpc = MethodTable()`` and decorates each handler
with the wire name and its parameter dataclass (``assistant.daemon.params``):

    @rpc.method("sessions.list", params.SessionsList)
    async def sessions_list(daemon, req, p): ...

The handler gets the daemon, the ``Request`` (its id, connection and cancel
flag) and the parsed parameters (None where the method declares none).
``install`` puts every area's methods on the server; ``CORE_METHODS`` are
their names, which plugins cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from assistant.daemon.params import parse

if TYPE_CHECKING:
    from assistant.daemon.daemon import Daemon
    from assistant.daemon.server import Request

Handler = Callable[["Daemon", "Request", Any], Awaitable[Any]]


@dataclass(frozen=True)
class Method:
    name: str
    handler: Handler
    params: type | None


class MethodTable:
    """The methods of one area, in the order they are written."""

    def __init__(self) -> None:
        self.entries: list[Method] = []

    def method(self, name: str, params: type | None = None) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.entries.append(Method(name, handler, params))
            return handler
        return register


def _areas() -> list[MethodTable]:
    from assistant.daemon.methods import chat, core, events, models, plugins, sessions

    return [core.rpc, models.rpc, sessions.rpc, chat.rpc, plugins.rpc, events.rpc]


def all_methods() -> list[Method]:
    return [m for table in _areas() for m in table.entries]


def install(daemon: "Daemon") -> None:
    """Register every core method on the daemon's server, bound to the daemon."""
    for m in all_methods():
        daemon.server.method(m.name, _bind(daemon, m))


def _bind(daemon: "Daemon", m: Method):
    async def call(req: "Request") -> Any:
        p = parse(m.params, req.params) if m.params is not None else None
        return await m.handler(daemon, req, p)
    call.__name__ = m.handler.__name__
    return call


CORE_METHODS = tuple(m.name for m in all_methods())
