"""What plugins keep in the core database: their key-value state, their own
tables (made by per-plugin migrations) and transactions on them.

Plugin SQL runs under an authorizer (``_plugin_guard``) that keeps the core
tables read-only and the store's transaction and pragmas out of its reach.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from typing import TYPE_CHECKING, Any, Iterator

from assistant.daemon.store.database import StoreError
from assistant.daemon.store.schema import CORE_TABLES

if TYPE_CHECKING:
    from assistant.daemon.store.database import Database

__all__ = ["PluginData"]


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

    def __init__(self, store: Database) -> None:
        """``store``: the open database (the Store) the plugins' data lives in."""
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
        """Remove ``key``; False if it was not there."""
        with self._store._write() as conn:
            return conn.execute("DELETE FROM plugin_state WHERE plugin = ? AND key = ?", (plugin, key)).rowcount > 0

    def state_keys(self, plugin: str, prefix: str = "") -> list[str]:
        """The plugin's keys that start with ``prefix``, sorted."""
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
