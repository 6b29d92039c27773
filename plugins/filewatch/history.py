"""filewatch's own tables: traced runs and small per-rule state.

Created through the plugin's context (``context.migrate(MIGRATIONS)``) and
used through ``context.db(fn, ...)``: each function here takes the sqlite3
connection, inside the transaction the context opens.

The tables predate plugin-owned migrations: databases from before kept
them (with their data) when the core dropped them from its schema, hence
``IF NOT EXISTS`` and the names without a ``filewatch_`` prefix.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

MIGRATIONS: list[list[str]] = [
    # 1: one traced run of a rule; per-rule state (enabled overrides, the last content seen for diffs).
    [
        """
        CREATE TABLE IF NOT EXISTS automation_runs (
            id       INTEGER PRIMARY KEY AUTOINCREMENT,
            rule_id  TEXT NOT NULL,
            started  REAL NOT NULL,
            finished REAL,
            status   TEXT NOT NULL,  -- running|ok|error|skipped|dry_run|cancelled
            trace    TEXT NOT NULL   -- JSON: events, conditions, actions
        )
        """,
        "CREATE INDEX IF NOT EXISTS automation_runs_rule ON automation_runs(rule_id, id)",
        """
        CREATE TABLE IF NOT EXISTS automation_state (
            rule_id TEXT NOT NULL,
            key     TEXT NOT NULL,
            value   TEXT NOT NULL,  -- JSON
            PRIMARY KEY (rule_id, key)
        )
        """,
    ],
]

_RUN_COLUMNS = "id, rule_id, started, finished, status, trace"


def _run_dict(row: tuple) -> dict[str, Any]:
    id_, rule_id, started, finished, status, trace = row
    return {"id": id_, "rule_id": rule_id, "started": started, "finished": finished, "status": status,
            **json.loads(trace)}


def add_run(conn: sqlite3.Connection, rule_id: str, status: str, trace: dict[str, Any]) -> int:
    """Record a run as it starts; returns its id."""
    cur = conn.execute("INSERT INTO automation_runs (rule_id, started, status, trace) VALUES (?, ?, ?, ?)",
                       (rule_id, time.time(), status, json.dumps(trace, ensure_ascii=False)))
    return int(cur.lastrowid)


def finish_run(conn: sqlite3.Connection, run_id: int, status: str, trace: dict[str, Any]) -> None:
    conn.execute("UPDATE automation_runs SET finished = ?, status = ?, trace = ? WHERE id = ?",
                 (time.time(), status, json.dumps(trace, ensure_ascii=False), run_id))


def runs(conn: sqlite3.Connection, rule_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Most recent runs first, of one rule or of all."""
    if rule_id is None:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM automation_runs ORDER BY id DESC LIMIT ?", (limit,))
    else:
        rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM automation_runs WHERE rule_id = ? ORDER BY id DESC "
                            "LIMIT ?", (rule_id, limit))
    return [_run_dict(r) for r in rows.fetchall()]


def get_state(conn: sqlite3.Connection, rule_id: str, key: str, default: Any = None) -> Any:
    row = conn.execute("SELECT value FROM automation_state WHERE rule_id = ? AND key = ?", (rule_id, key)).fetchone()
    return json.loads(row[0]) if row else default


def set_state(conn: sqlite3.Connection, rule_id: str, key: str, value: Any) -> None:
    conn.execute("INSERT INTO automation_state (rule_id, key, value) VALUES (?, ?, ?) "
                 "ON CONFLICT (rule_id, key) DO UPDATE SET value = excluded.value",
                 (rule_id, key, json.dumps(value, ensure_ascii=False)))
