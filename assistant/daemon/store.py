"""SQLite persistence of sessions and messages.

One database file in the user's data dir (``paths.database_path()``), in WAL
mode with ``synchronous=FULL``: every write commits (and so is fsynced to the
WAL) before its method returns, so a message acknowledged to a client
survives a kill -9 of the daemon or a power cut. See DESIGN.md,
"Persistence and config".

Everything returned is a plain dict of JSON-ready values (str, float, int,
None, dict), so the RPC layer can hand it straight to a client.

The schema evolves through ``MIGRATIONS``: entry *i* takes a database from
``PRAGMA user_version`` *i* to *i + 1*. Later core features append an entry;
never edit one that has shipped. Plugins own their tables through their own,
per-plugin migrations (``PluginData.migrate``, reached through
``PluginContext.migrate``), not through this list.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["Store", "StoreError", "PluginData", "MIGRATIONS", "SCHEMA_VERSION", "ROLES", "STATUSES",
           "CORE_TABLES"]


class StoreError(Exception):
    """Anything the store cannot do: a bad file, a missing session, bad input."""


ROLES = ("system", "user", "assistant", "tool")
# Checked in Python rather than by a CHECK constraint: adding a status later
# is then a one-line change, where changing a CHECK in SQLite means rebuilding
# the table.
STATUSES = ("complete", "cancelled", "error")

# Each entry is the list of statements that moves the schema up one version.
# They run in one transaction together with the user_version bump, so a crash
# mid-migration leaves the database at the old version, not half-migrated.
MIGRATIONS: list[list[str]] = [
    # 0 -> 1: sessions and messages.
    [
        """
        CREATE TABLE sessions (
            id            TEXT PRIMARY KEY,
            title         TEXT,
            created       REAL NOT NULL,
            updated       REAL NOT NULL,
            model         TEXT,
            system_prompt TEXT,
            settings      TEXT  -- JSON object
        )
        """,
        """
        CREATE TABLE messages (
            id         INTEGER PRIMARY KEY AUTOINCREMENT,
            session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            role       TEXT NOT NULL CHECK (role IN ('system','user','assistant','tool')),
            content    TEXT NOT NULL,
            created    REAL NOT NULL,
            stats      TEXT,  -- JSON or NULL
            status     TEXT NOT NULL DEFAULT 'complete'  -- complete|cancelled|error
        )
        """,
        "CREATE INDEX messages_session_id ON messages(session_id, id)",
        "CREATE INDEX sessions_updated ON sessions(updated)",
    ],
    # 1 -> 2: was the filewatch plugin's tables (automation_runs,
    # automation_state). They are the plugin's own migrations now
    # (plugins/filewatch/history.py, through its PluginContext); databases
    # that ran this step keep the tables and their data, new ones get them
    # when filewatch first starts. Empty, not removed: user_version 2 must
    # keep meaning what it meant.
    [],
    # 2 -> 3: what plugins own in the core database: their key-value state
    # (PluginContext.state) and a record of the migrations each plugin ran
    # (PluginContext.migrate).
    [
        """
        CREATE TABLE plugin_state (
            plugin TEXT NOT NULL,
            key    TEXT NOT NULL,
            value  TEXT NOT NULL,  -- JSON
            PRIMARY KEY (plugin, key)
        )
        """,
        """
        CREATE TABLE plugin_migrations (
            plugin  TEXT NOT NULL,
            version INTEGER NOT NULL,  -- 1 for the plugin's first migration, ...
            applied REAL NOT NULL,
            PRIMARY KEY (plugin, version)
        )
        """,
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

# Tables the core owns. Plugin code running in the database (migrations and
# PluginContext.db) may read them but not change them: a guard against a
# plugin bug damaging the chat history, not a security boundary (a plugin
# runs in the daemon's process).
CORE_TABLES = frozenset({"sessions", "messages", "plugin_state", "plugin_migrations"})

# Marks "argument not passed" in update_session, where None is a real value
# (it clears the field).
_UNSET: Any = object()

_ROLE_HEADINGS = {
    "system": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


class Store:
    """The sessions-and-messages database.

    The daemon uses it from one dedicated thread; the lock makes it safe from
    any thread all the same. Usable as a context manager (closes on exit).
    """

    def __init__(self, path: Path | str) -> None:
        """Open ``path``, creating it (and a 0700 parent dir) if missing.

        Raises StoreError, naming the path, when the file is not an SQLite
        database, cannot be opened, or was written by a newer schema.
        """
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._last_ts = 0.0
        self.plugin_data = PluginData(self)

        parent = self.path.parent
        if not parent.exists():
            try:
                parent.mkdir(parents=True, mode=0o700)
                # mkdir's mode is masked by the umask; the chat history is
                # private, so set it outright.
                os.chmod(parent, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise StoreError(f"cannot create the directory for the database {self.path}: {e}") from e

        try:
            # isolation_level=None: no implicit transactions. We issue BEGIN
            # IMMEDIATE / COMMIT ourselves so a write is committed (and
            # fsynced) before its method returns, never left pending.
            conn = sqlite3.connect(
                str(self.path),
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from e

        try:
            # The first statement is the one that reads the header, so a
            # file that is not a database fails here ("file is not a database").
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self.journal_mode = str(mode).lower()
            conn.execute("PRAGMA synchronous=FULL")
            # Per-connection and off by default; ON DELETE CASCADE needs it.
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
            self._migrate()
        except StoreError:
            conn.close()
            self._conn = None
            raise
        except sqlite3.DatabaseError as e:
            conn.close()
            self._conn = None
            raise StoreError(
                f"{self.path} is not a usable SQLite database ({e}); "
                "move it aside to start with an empty history"
            ) from e
        except sqlite3.Error as e:
            conn.close()
            self._conn = None
            raise StoreError(f"cannot open the database {self.path}: {e}") from e

        # Best effort: the database holds the user's conversations.
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    # ---------------------------------------------------------------- plumbing

    def _migrate(self) -> None:
        conn = self._require_conn()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this "
                f"version of the assistant understands ({SCHEMA_VERSION})"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[target - 1]:
                    conn.execute(statement)
                # PRAGMA does not take bound parameters; target is our int.
                conn.execute(f"PRAGMA user_version = {int(target)}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the store {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._require_conn()
            try:
                yield conn
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e

    @contextlib.contextmanager
    def _write(self, wrap_errors: bool = True) -> Iterator[sqlite3.Connection]:
        """One transaction, committed before the caller's method returns.

        sqlite3 errors become StoreError unless ``wrap_errors`` is False (plugin
        code gets its own SQL's errors as they are)."""
        with self._lock:
            conn = self._require_conn()
            try:
                # IMMEDIATE takes the write lock up front, so a check-then-
                # write (does the session exist? insert) cannot interleave
                # with another connection's write.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as e:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if wrap_errors and isinstance(e, sqlite3.Error):
                    raise StoreError(f"{self.path}: {e}") from e
                raise

    def _now(self) -> float:
        # Strictly increasing within this store: two writes inside the
        # clock's resolution, or a clock stepped backwards, must not reorder
        # "most recently updated first".
        now = time.time()
        if now <= self._last_ts:
            now = self._last_ts + 1e-6
        self._last_ts = now
        return now

    @staticmethod
    def _dump_json(value: Any, what: str) -> str:
        try:
            return json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            raise StoreError(f"{what} is not JSON-serialisable: {e}") from e

    @staticmethod
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

    @staticmethod
    def _message_dict(row: sqlite3.Row | tuple) -> dict:
        mid, session_id, role, content, created, stats, status = row
        return {
            "id": mid,
            "session_id": session_id,
            "role": role,
            "content": content,
            "created": created,
            "stats": json.loads(stats) if stats is not None else None,
            "status": status,
        }

    _SESSION_COLUMNS = (
        "s.id, s.title, s.created, s.updated, s.model, s.system_prompt, s.settings, "
        "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id)"
    )
    _MESSAGE_COLUMNS = "id, session_id, role, content, created, stats, status"

    def _fetch_session(self, conn: sqlite3.Connection, session_id: str) -> dict | None:
        row = conn.execute(
            f"SELECT {self._SESSION_COLUMNS} FROM sessions s WHERE s.id = ?", (session_id,)
        ).fetchone()
        return self._session_dict(row) if row else None

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
             self._dump_json(settings or {}, "settings")),
        )

    # ---------------------------------------------------------------- lifecycle

    @property
    def schema_version(self) -> int:
        """The database's ``PRAGMA user_version`` (== SCHEMA_VERSION once open)."""
        with self._read() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    @property
    def closed(self) -> bool:
        """True once close() has run."""
        return self._conn is None

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close. Safe to call twice.

        The checkpoint is tidiness, not durability: committed data is already
        safe in the WAL. TRUNCATE leaves a zero-length -wal file behind, so a
        backup of the .db alone is complete.
        """
        with self._lock:
            conn = self._conn
            if conn is None:
                return
            self._conn = None
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                # Another process may hold the DB; the WAL is still valid and
                # the next open replays it, so a failed checkpoint loses nothing.
                pass
            finally:
                conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

        Raises StoreError if a session with that id already exists.
        """
        session_id = id if id is not None else uuid.uuid4().hex[:12]
        if not isinstance(session_id, str) or not session_id:
            raise StoreError("a session id must be a non-empty string")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise StoreError(f"session {session_id!r} already exists")
            self._insert_session(conn, session_id, title, model, system_prompt, settings)
            return self._fetch_session(conn, session_id)  # type: ignore[return-value]

    def get_session(self, id: str) -> dict | None:
        """The session with this id (including ``message_count``), or None."""
        with self._read() as conn:
            return self._fetch_session(conn, id)

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
            existing = self._fetch_session(conn, id)
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
            return self._fetch_session(conn, id)  # type: ignore[return-value]

    def list_sessions(self, limit: int = 100) -> list[dict]:
        """Sessions, most recently updated first, each with ``message_count``."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {self._SESSION_COLUMNS} FROM sessions s "
                # rowid breaks ties deterministically (newest insert first).
                "ORDER BY s.updated DESC, s.rowid DESC LIMIT ?",
                (int(limit),),
            ).fetchall()
        return [self._session_dict(r) for r in rows]

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
        raises StoreError if it does not exist.
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
            changes["settings"] = self._dump_json(settings or {}, "settings")
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (id,)).fetchone():
                raise StoreError(f"no session {id!r}")
            changes["updated"] = self._now()
            # Column names come from the fixed set above, never from input.
            assignments = ", ".join(f"{col} = ?" for col in changes)
            conn.execute(
                f"UPDATE sessions SET {assignments} WHERE id = ?", (*changes.values(), id)
            )
            return self._fetch_session(conn, id)  # type: ignore[return-value]

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
    ) -> dict:
        """Append a message, bump the session's ``updated``, and return it.

        Committed (fsynced) before returning, so it may be acknowledged to a
        client. Raises StoreError for a missing session, an unknown role or
        status, or stats that are not JSON-serialisable.
        """
        if role not in ROLES:
            raise StoreError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if status not in STATUSES:
            raise StoreError(f"unknown status {status!r}; expected one of {', '.join(STATUSES)}")
        if not isinstance(content, str):
            raise StoreError(f"message content must be a string, not {type(content).__name__}")
        stats_json = self._dump_json(stats, "stats") if stats is not None else None
        with self._write() as conn:
            if not conn.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone():
                raise StoreError(f"no session {session_id!r}")
            now = self._now()
            cur = conn.execute(
                "INSERT INTO messages (session_id, role, content, created, stats, status) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, role, content, now, stats_json, status),
            )
            conn.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))
            row = conn.execute(
                f"SELECT {self._MESSAGE_COLUMNS} FROM messages WHERE id = ?", (cur.lastrowid,)
            ).fetchone()
            return self._message_dict(row)

    def messages(self, session_id: str) -> list[dict]:
        """The session's messages in the order they were added ([] if none or no session)."""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {self._MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        return [self._message_dict(r) for r in rows]

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

    def export_markdown(self, session_id: str) -> str:
        """The conversation as Markdown: a title heading, then one section per message.

        Each section starts ``**User**``, ``**Assistant**``, ``**System**`` or
        ``**Tool**``; a cancelled or failed message says so after the name.
        Raises StoreError if the session does not exist.
        """
        with self._read() as conn:
            session = self._fetch_session(conn, session_id)
            if session is None:
                raise StoreError(f"no session {session_id!r}")
            rows = conn.execute(
                f"SELECT {self._MESSAGE_COLUMNS} FROM messages WHERE session_id = ? ORDER BY id",
                (session_id,),
            ).fetchall()
        title = session["title"] or f"Session {session_id}"
        parts = [f"# {title}"]
        for msg in map(self._message_dict, rows):
            heading = f"**{_ROLE_HEADINGS.get(msg['role'], msg['role'].title())}**"
            if msg["status"] != "complete":
                heading += f" _({msg['status']})_"
            parts.append(f"{heading}\n\n{msg['content']}")
        return "\n\n".join(parts) + "\n"


# -- what plugins keep in the core database --------------------------------------

# Actions a plugin's SQL may not take on a core table, and which authorizer
# argument names the table (1: arg1, 2: arg2).
_TABLE_ARG = {
    sqlite3.SQLITE_INSERT: 1, sqlite3.SQLITE_UPDATE: 1, sqlite3.SQLITE_DELETE: 1, sqlite3.SQLITE_DROP_TABLE: 1,
    sqlite3.SQLITE_ALTER_TABLE: 2, sqlite3.SQLITE_CREATE_INDEX: 2, sqlite3.SQLITE_DROP_INDEX: 2,
    sqlite3.SQLITE_CREATE_TRIGGER: 2, sqlite3.SQLITE_DROP_TRIGGER: 2,
}
# Pragmas whose setting would break the store's rules (schema version, WAL, durability, cascades).
_STORE_PRAGMAS = frozenset({"user_version", "schema_version", "journal_mode", "synchronous", "foreign_keys",
                            "writable_schema", "locking_mode"})


def _plugin_authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _source: str | None) -> int:
    if action == sqlite3.SQLITE_TRANSACTION:
        return sqlite3.SQLITE_DENY  # the store owns the transaction (BEGIN ... COMMIT around the plugin's code)
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None and (arg1 or "").lower() in _STORE_PRAGMAS:
        return sqlite3.SQLITE_DENY
    where = _TABLE_ARG.get(action)
    table = arg1 if where == 1 else arg2 if where == 2 else None
    if table is not None and table.lower() in CORE_TABLES:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


@contextlib.contextmanager
def _plugin_guard(conn: sqlite3.Connection) -> Iterator[None]:
    """While plugin SQL runs: core tables read-only, no transaction control, no store pragmas."""
    conn.set_authorizer(_plugin_authorizer)
    try:
        yield
    finally:
        conn.set_authorizer(None)


class PluginData:
    """Plugin-owned data in the core database, each plugin under its own name:
    key-value state (``plugin_state``), the plugin's own tables (made by its
    migrations, recorded in ``plugin_migrations``) and transactions on them.

    ``store.plugin_data``; the daemon calls it on the store's thread for each
    plugin's ``PluginContext``. Every write commits before returning.
    """

    def __init__(self, store: Store) -> None:
        self._store = store

    def state_get(self, plugin: str, key: str) -> str | None:
        """The JSON text stored under ``key``, or None."""
        with self._store._read() as conn:
            row = conn.execute("SELECT value FROM plugin_state WHERE plugin = ? AND key = ?", (plugin, key)).fetchone()
        return row[0] if row else None

    def state_set(self, plugin: str, key: str, value: str) -> None:
        """Store JSON text under ``key``."""
        with self._store._write() as conn:
            conn.execute("INSERT INTO plugin_state (plugin, key, value) VALUES (?, ?, ?) "
                         "ON CONFLICT (plugin, key) DO UPDATE SET value = excluded.value", (plugin, key, value))

    def state_delete(self, plugin: str, key: str) -> bool:
        with self._store._write() as conn:
            return conn.execute("DELETE FROM plugin_state WHERE plugin = ? AND key = ?", (plugin, key)).rowcount > 0

    def state_keys(self, plugin: str, prefix: str = "") -> list[str]:
        # substr rather than LIKE: a prefix holding % or _ means itself.
        with self._store._read() as conn:
            rows = conn.execute("SELECT key FROM plugin_state WHERE plugin = ? AND substr(key, 1, ?) = ? "
                                "ORDER BY key", (plugin, len(prefix), prefix)).fetchall()
        return [r[0] for r in rows]

    def migrations(self, plugin: str) -> list[int]:
        """The numbers of the plugin's migrations this database has run."""
        with self._store._read() as conn:
            rows = conn.execute("SELECT version FROM plugin_migrations WHERE plugin = ? ORDER BY version",
                                (plugin,)).fetchall()
        return [r[0] for r in rows]

    def migrate(self, plugin: str, migrations: Any) -> list[int]:
        """Run the plugin's migrations not yet run here, in order; each in one
        transaction with its record. Entry *i* of ``migrations`` (an SQL
        statement or a list of them) is migration *i + 1*. Returns the numbers
        run. StoreError names the plugin and the migration that failed (it is
        rolled back); TypeError for an entry that is not SQL text."""
        steps = [[m] if isinstance(m, str) else m for m in migrations]
        if not all(isinstance(step, (list, tuple)) and all(isinstance(q, str) for q in step) for step in steps):
            raise TypeError(f"plugin {plugin!r}: migrations are SQL statements: each entry a string or a list "
                            "of strings")
        known = self.migrations(plugin)
        if known and known[-1] > len(steps):
            raise StoreError(f"{self._store.path}: plugin {plugin!r} has run migration {known[-1]} here, but "
                             f"this version of it has only {len(steps)}; is an older version installed?")
        applied = []
        for version, statements in enumerate(steps, 1):
            if version in known:
                continue
            try:
                with self._store._write(wrap_errors=False) as conn:
                    # Checked again inside the write lock: another daemon on this database may have run it.
                    if conn.execute("SELECT 1 FROM plugin_migrations WHERE plugin = ? AND version = ?",
                                    (plugin, version)).fetchone():
                        continue
                    with _plugin_guard(conn):
                        for statement in statements:
                            conn.execute(statement)
                    conn.execute("INSERT INTO plugin_migrations (plugin, version, applied) VALUES (?, ?, ?)",
                                 (plugin, version, time.time()))
            except sqlite3.Error as e:
                raise StoreError(f"plugin {plugin!r}: migration {version} failed: {e}") from e
            applied.append(version)
        return applied

    def run(self, plugin: str, fn: Any) -> Any:
        """``fn(conn)`` in one transaction, guarded (core tables read-only);
        ``plugin`` is whose code it is. What ``fn`` raises propagates, rolled back."""
        with self._store._write(wrap_errors=False) as conn, _plugin_guard(conn):
            return fn(conn)
