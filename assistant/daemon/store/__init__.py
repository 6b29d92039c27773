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

The package, one concern a module:

- ``schema``: the core tables (``MIGRATIONS``, ``SCHEMA_VERSION``), the
  roles and statuses a message may have, which tables are the core's.
- ``database``: ``Database``, the connection (pragmas, migrations, one
  transaction per write, close) and ``StoreError`` (with ``SessionNotFound``,
  ``SessionExists``: a session missing, or deleted meanwhile; an id taken).
- ``sessions``: ``Store``, sessions and messages on a ``Database``.
- ``export``: a session as Markdown.
- ``plugin_data``: ``PluginData``, what plugins keep in the core database.
"""

from __future__ import annotations

from assistant.daemon.store.database import Database, SessionExists, SessionNotFound, StoreError
from assistant.daemon.store.plugin_data import PluginData
from assistant.daemon.store.schema import CORE_TABLES, MIGRATIONS, ROLES, SCHEMA_VERSION, STATUSES
from assistant.daemon.store.sessions import Store

__all__ = ["Store", "StoreError", "SessionNotFound", "SessionExists", "PluginData", "Database", "MIGRATIONS",
           "SCHEMA_VERSION", "ROLES", "STATUSES", "CORE_TABLES"]
