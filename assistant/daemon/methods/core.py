"""Connection and daemon methods: initialize, status, cancel, shutdown."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from assistant import __version__
from assistant.daemon import params
from assistant.daemon.methods import MethodTable
from assistant.protocol import PROTOCOL_VERSION, ErrorCode, RPCError

rpc = MethodTable()


@rpc.method("initialize", params.Initialize)
async def initialize(d, req, p: params.Initialize) -> dict[str, Any]:
    version = PROTOCOL_VERSION if p.protocol_version is None else p.protocol_version
    if version != PROTOCOL_VERSION:
        raise RPCError(ErrorCode.INCOMPATIBLE_VERSION,
                       f"client speaks protocol {version}, this daemon speaks {PROTOCOL_VERSION}; "
                       "upgrade the older side", {"protocol_version": PROTOCOL_VERSION})
    req.conn.client_name = p.client
    req.conn.initialized = True
    return {
        "protocol_version": PROTOCOL_VERSION,
        "daemon_version": __version__,
        "pid": os.getpid(),
        "capabilities": sorted(d.server.methods),
        "features": ["batch"],  # JSON-RPC 2.0 batch requests (docs/protocol.md)
        "plugins": [r.name for r in d.plugins.records.values() if r.status == "loaded"],
        "default_model": d.config.model,
        # a client checks sizes before sending (the daemon checks again); its other limits are read there
        "media": {"max_bytes": d.config.media.max_bytes},
    }


@rpc.method("status")
async def status(d, req, _p) -> dict[str, Any]:
    return {
        "daemon_version": __version__,
        "protocol_version": PROTOCOL_VERSION,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - d.started, 1),
        "socket": str(d.socket_path),
        "database": str(d.db_path),
        "config": str(d.config.source) if d.config.source else None,
        "default_model": d.config.model,
        "models": d.models.describe(),
        "loading": d.models.loading(),
        "connections": len(d.server.connections),
        "requests_in_flight": d.server.in_flight(exclude=req),
        # the HTTP API: {"url", "in_flight"} (its requests admitted and not finished), None when off
        "http": d.http.describe() if d.http is not None else None,
    }


@rpc.method("shutdown")
async def shutdown(d, req, _p) -> dict[str, Any]:
    asyncio.get_running_loop().call_later(0.05, d.request_stop)
    return {"stopping": True}


@rpc.method("cancel", params.Cancel)
async def cancel(d, req, p: params.Cancel) -> dict[str, Any]:
    other = req.conn.requests.get(p.id)
    if other is None or other is req:
        raise RPCError(ErrorCode.REQUEST_NOT_FOUND, f"no request {p.id!r} in flight on this connection")
    other.cancel.set()
    return {"cancelled": True}
