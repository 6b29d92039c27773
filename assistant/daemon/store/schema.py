"""The core database's schema: its migrations and the values it accepts.

``MIGRATIONS`` entry *i* takes a database from ``PRAGMA user_version`` *i* to
*i + 1* (``Database`` runs them). Later core features append an entry; never
edit one that has shipped.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "CORE_TABLES", "ROLES", "STATUSES"]

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
    # 3 -> 4: media in messages (issue 12). A message's content parts (JSON: text parts and
    # media named by sha256, kept in the media store, assistant/daemon/media/store.py) beside
    # its text; NULL for a text-only message. And the fallbacks' text of a medium (OCR,
    # transcript), by sha256 and method, so history is not read again every turn.
    [
        "ALTER TABLE messages ADD COLUMN parts TEXT",  # JSON list of content parts, or NULL
        """
        CREATE TABLE media_text (
            sha256  TEXT NOT NULL,
            method  TEXT NOT NULL,  -- 'ocr' | 'transcript'
            text    TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (sha256, method)
        )
        """,
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

# Tables the core owns. Plugin code running in the database (migrations and
# PluginContext.db) may read them but not change them: a guard against a
# plugin bug damaging the chat history, not a security boundary (a plugin
# runs in the daemon's process).
CORE_TABLES = frozenset({"sessions", "messages", "plugin_state", "plugin_migrations", "media_text"})
