"""Session methods: the conversations kept in SQLite."""

from __future__ import annotations

from typing import Any

from assistant.daemon import params
from assistant.daemon.methods import MethodTable
from assistant.daemon.store import StoreError
from assistant.protocol import ErrorCode, RPCError

rpc = MethodTable()


async def existing(d, sid: str) -> dict[str, Any]:
    """The session ``sid``; SESSION_NOT_FOUND if there is none."""
    sess = await d.db(d.store.get_session, sid)
    if sess is None:
        raise RPCError(ErrorCode.SESSION_NOT_FOUND, f"no session {sid!r}")
    return sess


@rpc.method("sessions.list", params.SessionsList)
async def sessions_list(d, req, p: params.SessionsList) -> dict[str, Any]:
    return {"sessions": await d.db(d.store.list_sessions, p.limit)}


@rpc.method("sessions.get", params.SessionId)
async def sessions_get(d, req, p: params.SessionId) -> dict[str, Any]:
    sess = await existing(d, p.id)
    sess["messages"] = await d.db(d.store.messages, p.id)
    return sess


@rpc.method("sessions.create", params.SessionsCreate)
async def sessions_create(d, req, p: params.SessionsCreate) -> dict[str, Any]:
    if p.id is not None and await d.db(d.store.get_session, p.id) is not None:
        raise RPCError(ErrorCode.INVALID_PARAMS, f"session {p.id!r} already exists")
    return await d.db(d.store.create_session, id=p.id, title=p.title, model=p.model, system_prompt=p.system,
                      settings=p.settings)


# wire key -> (store column, JSON type); only the keys a request gives are changed
_UPDATABLE = (("title", "title", str), ("model", "model", str), ("system", "system_prompt", str),
              ("settings", "settings", dict))


@rpc.method("sessions.update", params.SessionId)
async def sessions_update(d, req, p: params.SessionId) -> dict[str, Any]:
    await existing(d, p.id)
    changes = {column: params.check_value(key, req.params[key], params.ArgSpec(types))
               for key, column, types in _UPDATABLE if key in req.params}
    await d.db(d.store.update_session, p.id, **changes)
    return await existing(d, p.id)


@rpc.method("sessions.delete", params.SessionId)
async def sessions_delete(d, req, p: params.SessionId) -> dict[str, Any]:
    if not await d.db(d.store.delete_session, p.id):
        raise RPCError(ErrorCode.SESSION_NOT_FOUND, f"no session {p.id!r}")
    return {"deleted": p.id}


@rpc.method("sessions.rewind", params.SessionsRewind)
async def sessions_rewind(d, req, p: params.SessionsRewind) -> dict[str, Any]:
    """Delete a message and every later one of the session (the TUI's regenerate)."""
    await existing(d, p.id)
    try:
        deleted = await d.db(d.store.delete_messages_from, p.id, p.message_id)
    except StoreError as exc:
        raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    return {"deleted": deleted}


@rpc.method("sessions.export", params.SessionId)
async def sessions_export(d, req, p: params.SessionId) -> dict[str, Any]:
    await existing(d, p.id)
    return {"markdown": await d.db(d.store.export_markdown, p.id)}
