"""Session methods: the conversations kept in SQLite."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from assistant.daemon import params
from assistant.daemon.media.store import MediaStore, MediaStoreError
from assistant.daemon.store import export
from assistant.daemon.methods import MethodTable
from assistant.daemon.store import SessionExists, SessionNotFound, StoreError
from assistant.protocol import ErrorCode, RPCError

rpc = MethodTable()


async def store_call(d, fn, *args: Any, **kwargs: Any) -> Any:
    """A store call on the database thread, its session errors as protocol errors.

    A session can be deleted by another client between any two store calls
    of a request (a chat's, an update's): that is SESSION_NOT_FOUND, not an
    internal error; two creates of one id racing is INVALID_PARAMS."""
    try:
        return await d.db(fn, *args, **kwargs)
    except SessionNotFound as exc:
        raise RPCError(ErrorCode.SESSION_NOT_FOUND, str(exc)) from None
    except SessionExists as exc:
        raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None


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
    # A taken id is SessionExists, checked in the insert's own transaction (so two racing creates cannot both pass).
    return await store_call(d, d.store.create_session, id=p.id, title=p.title, model=p.model,
                            system_prompt=p.system, settings=p.settings)


# wire key -> (store column, JSON type); only the keys a request gives are changed
_UPDATABLE = (("title", "title", str), ("model", "model", str), ("system", "system_prompt", str),
              ("settings", "settings", dict))


@rpc.method("sessions.update", params.SessionId)
async def sessions_update(d, req, p: params.SessionId) -> dict[str, Any]:
    await existing(d, p.id)
    changes = {column: params.check_value(key, req.params[key], params.ArgSpec(types))
               for key, column, types in _UPDATABLE if key in req.params}
    # update_session checks again in its own transaction: a delete in between is SESSION_NOT_FOUND
    return await store_call(d, d.store.update_session, p.id, **changes)


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


def media_store(d) -> MediaStore:
    """The daemon's content-addressed media store (``<data_dir>/media``)."""
    return MediaStore(Path(d.data_dir) / "media")


@rpc.method("sessions.export", params.SessionsExport)
async def sessions_export(d, req, p: params.SessionsExport) -> dict[str, Any]:
    """The session as Markdown, and its media (``media``: each once, with ``file``, its
    path relative to the Markdown, and ``path``, where the daemon keeps it). With
    ``path``, the daemon writes the Markdown there and copies the media into a
    ``media/`` folder beside it (the client is the daemon's own user: the socket's
    peer is checked), so the export reads on its own."""
    await existing(d, p.id)
    session, messages = await store_call(d, d.store.export_snapshot, p.id)
    store = media_store(d)
    files = export.media_files(messages)
    for f in files:
        try:
            f["path"] = str(store.find(f["sha256"], f["mime"] or ""))
        except MediaStoreError:
            f["path"] = None  # deleted from the store by hand: the link stays, the file is gone
    out: dict[str, Any] = {"markdown": export.markdown(session, messages), "media": files}
    if p.path is not None:
        target = Path(os.path.expanduser(p.path))
        if target.is_dir():
            raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter 'path': {target} is a directory; name the "
                           "Markdown file to write")
        copies = [(Path(f["path"]), f["file"]) for f in files if f["path"] is not None]
        try:
            await asyncio.get_running_loop().run_in_executor(None, export.write, target, out["markdown"], copies)
        except OSError as exc:
            raise RPCError(ErrorCode.INVALID_PARAMS, f"cannot write the export to {target}: "
                           f"{exc.strerror or exc}") from None
        out["path"] = str(target)
    return out
