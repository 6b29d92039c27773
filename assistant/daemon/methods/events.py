"""Event methods: subscribe a connection to the daemon's events (``event`` notifications)."""

from __future__ import annotations

from typing import Any

from assistant.daemon import params
from assistant.daemon.methods import MethodTable

rpc = MethodTable()


@rpc.method("events.subscribe", params.EventsSubscribe)
async def events_subscribe(d, req, p: params.EventsSubscribe) -> dict[str, Any]:
    req.conn.subscriptions.update(p.types)
    return {"subscribed": sorted(req.conn.subscriptions), "recent": d.events.recent(p.types, p.backlog)}


@rpc.method("events.unsubscribe", params.EventsUnsubscribe)
async def events_unsubscribe(d, req, p: params.EventsUnsubscribe) -> dict[str, Any]:
    if p.types is None:
        req.conn.subscriptions.clear()
    else:
        req.conn.subscriptions.difference_update(p.types)  # strings: checked by params.EventsUnsubscribe
    return {"subscribed": sorted(req.conn.subscriptions)}
