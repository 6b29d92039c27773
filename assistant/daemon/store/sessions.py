"""``Store``: sessions and their messages, the chat history, on a ``Database``.

Everything returned is a plain dict of JSON-ready values (str, float, int,
None, dict), so the RPC layer can hand it straight to a client. Every write
is one transaction, committed (fsynced) before its method returns.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

from assistant.daemon.store import export
from assistant.daemon.store.database import Database, SessionExists, SessionNotFound, StoreError
from assistant.daemon.store.plugin_data import PluginData
from assistant.daemon.store.schema import ROLES, STATUSES

__all__ = ["Store"]

# Marks "argument not passed" in update_session, where None is a real value
# (it clears the field).
_UNSET: Any = object()

_SESSION_COLUMNS = (
    "s.id, s.title, s.created, s.updated, s.model, s.system_prompt, s.settings, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id)"
)
_MESSAGE_COLUMNS = "id, session_id, role, content, created, stats, status, parts"


def _dump_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{what} is not JSON-serialisable: {e}") from e


def _session_dict(row: sqlite3.Row | tuple) -> dict:
    sid, title, created, updated, model, system_prompt, settings, count = row
    return {
        "id": sid,
        "title": title,
        "created": created,
        "updated": updated,
        "model": model,
        "system_prompt": system_prompt,
        "settings": json.loads(settings) if settings else {},
        "message_count": count,
    }


def _message_dict(row: sqlite3.Row | tuple) -> dict:
    mid, session_id, role, content, created, stats, status, parts = row
    out = {
        "id": mid,
        "session_id": session_id,
        "role": role,
        "content": content,
        "created": created,
        "stats": json.loads(stats) if stats is not None else None,
        "status": status,
    }
    if parts is not None:  # a message with media: its content parts (``content`` is their text)
        out["parts"] = json.loads(parts)
    return out


def _fetch_session(conn: sqlite3.Connection, session_id: str) -> dict | None:
    row = conn.execute(
        f"SELECT {_SESSION_COLUMNS} FROM sessions s WHERE s.id = ?", (session_id,)
    ).fetchone()
    return _session_dict(row) if row else None


def _fetch_messages(conn: sqlite3.Connection, session_id: str) -> list[dict]:
    rows = conn.execute(
        f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id",
        (session_id,),
    ).fetchall()
    return [_message_dict(r) for r in rows]


class Store(Database):
    """The sessions-and-messages database.

    The daemon uses it from one dedicated thread; the lock makes it safe from
    any thread all the same. Usable as a context manager (closes on exit).
    ``plugin_data`` is what plugins keep in the same database (PluginData).
    """

    def __init__(self, path: Path | str) -> None:
        """Open ``path``, creating it (and a 0700 parent dir) if missing.

        Raises StoreError, naming the path, when the file is not an SQLite
        database, cannot be opened, or was written by a newer schema.
        """
        super().__init__(path)
        self.plugin_data = PluginData(self)

    def _insert_session(
        self,
        conn: sqlite3.Connection,
        session_id: str,
        title: str | None,
        model: str | None,
        system_prompt: str | None,
        settings: dict | None,
    ) -> None:
        if settings is not None and not isinstance(settings, dict):
            raise StoreError(f"settings must be a dict, not {type(settings).__name__}")
        now = self._now()
        conn.execute(
            "INSERT INTO sessions (id, title, created, updated, model, system_prompt, settings) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (session_id, title, now, now, model, system_prompt,
             _dump_json(settings or {}, "settings")),
        )

    # ---------------------------------------------------------------- sessions

    def create_session(
        self,
        id: str | None = None,
        title: str | None = None,
        model: str | None = None,
        system_prompt: str | None = None,
        settings: dict | None = None,
    ) -> dict:
        """Create a session and return it. ``id`` defaults to a random 12-hex id.

        Raises SessionExists if a session with that id already exists.
        """
        session_id = id if id is not None else uuid.uuid4().hex[:12]
        if not isinstance(session_id, str) or not session_id:
            raise StoreError("a session id must be a non-empty string")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionExists(f"session {session_id!r} already exists")
            self._insert_session(conn, session_id, title, model, system_prompt, settings)
            return _fetch_session(conn, session_id)  # type: ignore[return-value]

    def get_session(self, id: str) -> dict | None:
        """The session with this id (including ``message_count``), or None."""
        with self._read() as conn:
            return _fetch_session(conn, id)

    def ensure_session(self, id: str, **defaults: Any) -> dict:
        """Return session ``id``, creating it with ``defaults`` if it is missing.

        ``defaults`` are create_session's keyword arguments (title, model,
        system_prompt, settings); they are ignored when the session exists.
        """
        allowed = {"title", "model", "system_prompt", "settings"}
        unknown = set(defaults) - allowed
        if unknown:
            raise StoreError(f"unknown session fields: {', '.join(sorted(unknown))}")
        if not isinstance(id, str) or not id:
            raise StoreError("a session id must be a non-empty string")
        with self._write() as conn:
            existing = _fetch_session(conn, id)
            if existing is not None:
                return existing
            self._insert_session(
                conn,
                id,
                defaults.get("title"),
                defaults.get("model"),
                defaults.get("system_prompt"),
                defaults.get("settings"),
            )
            return _fetch_session(conn, id)  # type: ignore[return-value]

    def list_sessions(self, limit: int = 100) -> list[dict]:
        """Sessions, most recently updated first, each with ``message_count``."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM sessions s "
                # rowid breaks ties deterministically (newest insert first).
                "ORDER BY s.updated DESC, s.rowid DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [_session_dict(r) for r in rows]

    def update_session(
        self,
        id: str,
        *,
        title: str | None = _UNSET,
        model: str | None = _UNSET,
        system_prompt: str | None = _UNSET,
        settings: dict | None = _UNSET,
    ) -> dict:
        """Change only the fields passed (None clears one); bump ``updated``.

        ``settings`` replaces the whole dict. Returns the updated session;
        raises SessionNotFound if it does not exist.
        """
        changes: dict[str, Any] = {}
        if title is not _UNSET:
            changes["title"] = title
        if model is not _UNSET:
            changes["model"] = model
        if system_prompt is not _UNSET:
            changes["system_prompt"] = system_prompt
        if settings is not _UNSET:
            if settings is not None and not isinstance(settings, dict):
                raise StoreError(f"settings must be a dict, not {type(settings).__name__}")
            changes["settings"] = _dump_json(settings or {}, "settings")
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (id,)).fetchone():
                raise SessionNotFound(f"no session {id!r}")
            changes["updated"] = self._now()
            # Column names come from the fixed set above, never from input.
            assignments = ", ".join(f"{col} = ?" for col in changes)
            conn.execute(
                f"UPDATE sessions SET {assignments} WHERE id = ?", (*changes.values(), id)
            )
            return _fetch_session(conn, id)  # type: ignore[return-value]

    def delete_session(self, id: str) -> bool:
        """Delete a session and (by cascade) its messages. False if it did not exist."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM sessions WHERE id = ?", (id,))
            return cur.rowcount > 0

    # ---------------------------------------------------------------- messages

    def add_message(
        self,
        session_id: str,
        role: str,
        content: str,
        stats: dict | None = None,
        status: str = "complete",
        parts: list | None = None,
    ) -> dict:
        """Append a message, bump the session's ``updated``, and return it.

        ``parts``: a message with media keeps its content parts (a list of
        JSON objects: text parts and media named by sha256, see
        ``assistant.daemon.media``) beside ``content``, its text.

        Committed (fsynced) before returning, so it may be acknowledged to a
        client. Raises SessionNotFound for a missing session (one deleted
        meanwhile among them), StoreError for an unknown role or status, or
        stats or parts that are not JSON-serialisable.
        """
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        if not isinstance(content, str):
            raise StoreError(f"message content must be a string, not {type(content).__name__}")
        stats_json = _dump_json(stats, "stats") if stats is not None else None
        if parts is not None and (not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts)):
            raise StoreError("message parts must be a list of objects")
        parts_json = _dump_json(parts, "parts") if parts is not None else None
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise SessionNotFound(f"no session {session_id!r}")
            now = self._now()
            cur = conn.execute(
                "INSERT INTO messages (session_id, role, content, created, stats, status, parts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (session_id, role, content, now, stats_json, status, parts_json),
            )
            conn.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))
            row = conn.execute(
                f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = ?", (cur.lastrowid,)
            ).fetchone()
            return _message_dict(row)

    def messages(self, session_id: str) -> list[dict]:
        """The session's messages in the order they were added ([] if none or no session)."""
        with self._read() as conn:
            return _fetch_messages(conn, session_id)

    def delete_messages_from(self, session_id: str, message_id: int) -> int:
        """Delete message ``message_id`` of the session and every later one (to
        regenerate or edit a turn); bump ``updated``. Returns how many went.
        Raises StoreError for a missing session or a message not in it."""
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM messages WHERE id = ? AND session_id = ?",
                                (int(message_id), session_id)).fetchone():
                raise StoreError(f"no message {message_id!r} in session {session_id!r}")
            cur = conn.execute("DELETE FROM messages WHERE session_id = ? AND id >= ?",
                               (session_id, int(message_id)))
            conn.execute("UPDATE sessions SET updated = ? WHERE id = ?", (self._now(), session_id))
            return cur.rowcount

    def export_markdown(self, session_id: str, media_dir: str | None = None) -> str:
        """The conversation as Markdown: a title heading, then one section per message.

        Each section starts ``**User**``, ``**Assistant**``, ``**System**`` or
        ``**Tool**``; a cancelled or failed message says so after the name.
        A medium is a link to ``<media_dir>/<sha256>.<ext>`` (``media/`` by default),
        where ``export.copy_media`` puts the files. Raises SessionNotFound if the
        session does not exist.
        """
        # Session and messages in one read, so the export is one consistent snapshot.
        session, messages = self.export_snapshot(session_id)
        return export.markdown(session, messages, media_dir=media_dir or export.MEDIA_DIR)

    def export_snapshot(self, session_id: str) -> tuple[dict, list[dict]]:
        """The session and its messages, read in one transaction (what an export shows)."""
        with self._read() as conn:
            session = _fetch_session(conn, session_id)
            if session is None:
                raise SessionNotFound(f"no session {session_id!r}")
            return session, _fetch_messages(conn, session_id)

    # ------------------------------------------------------------ media text

    def media_text(self, sha256: str, method: str) -> str | None:
        """The fallback's text of a medium (``method``: "ocr", "transcript"), if kept."""
        with self._read() as conn:
            row = conn.execute("SELECT text FROM media_text WHERE sha256 = ? AND method = ?",
                               (sha256, method)).fetchone()
        return row[0] if row else None

    def put_media_text(self, sha256: str, method: str, text: str) -> None:
        """Keep the fallback's text of a medium (replacing an older one)."""
        if not isinstance(text, str):
            raise StoreError(f"media text must be a string, not {type(text).__name__}")
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO media_text (sha256, method, text, created) VALUES (?, ?, ?, ?)",
                         (sha256, method, text, self._now()))
