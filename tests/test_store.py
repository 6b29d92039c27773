"""Tests for assistant.daemon.store: the SQLite sessions/messages database."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from assistant.daemon.store import SCHEMA_VERSION, Store, StoreError

# The project root, so a child interpreter can import assistant.daemon.store however
# pytest was started.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "assistant.db"


@pytest.fixture
def store(db_path: Path):
    s = Store(db_path)
    yield s
    s.close()


# ------------------------------------------------------------------ opening


def test_open_creates_private_parent_dir_and_pragmas(db_path: Path) -> None:
    assert not db_path.parent.exists()
    with Store(db_path) as s:
        assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
        assert s.journal_mode == "wal"
        assert s.schema_version == SCHEMA_VERSION >= 1
        conn = s._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # 2 == FULL
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
        assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    # WAL mode is persistent in the file, so a plain connection sees it too.
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()


def test_corrupt_file_raises_store_error_naming_path(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError) as info:
        Store(path)
    assert str(path) in str(info.value)
    assert "not" in str(info.value).lower()


def test_newer_schema_is_refused(db_path: Path) -> None:
    Store(db_path).close()
    raw = sqlite3.connect(db_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    with pytest.raises(StoreError, match="newer"):
        Store(db_path)


def test_closed_store_raises_and_close_is_idempotent(db_path: Path) -> None:
    s = Store(db_path)
    s.close()
    s.close()
    assert s.closed
    with pytest.raises(StoreError, match="closed"):
        s.list_sessions()


def test_close_checkpoints_wal(db_path: Path) -> None:
    s = Store(db_path)
    s.create_session(id="a")
    s.add_message("a", "user", "x" * 10000)
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0
    # A second connection stays open, so SQLite's own checkpoint-on-last-
    # close cannot run: only close()'s explicit TRUNCATE can empty the WAL.
    other = sqlite3.connect(db_path)
    try:
        other.execute("SELECT COUNT(*) FROM sessions").fetchone()
        s.close()
        assert wal.exists() and wal.stat().st_size == 0
        # ...and the data is in the main file, readable by the other connection.
        assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    finally:
        other.close()


# ------------------------------------------------------------------ sessions


def test_create_and_get_session(store: Store) -> None:
    s = store.create_session(title="Hello", model="smollm2", system_prompt="be brief",
                             settings={"temperature": 0.2})
    assert len(s["id"]) == 12
    assert s["title"] == "Hello"
    assert s["model"] == "smollm2"
    assert s["system_prompt"] == "be brief"
    assert s["settings"] == {"temperature": 0.2}
    assert s["message_count"] == 0
    assert s["created"] == s["updated"] > 0
    assert store.get_session(s["id"]) == s
    assert store.get_session("nope") is None


def test_create_session_random_ids_differ_and_duplicate_refused(store: Store) -> None:
    a = store.create_session()
    b = store.create_session()
    assert a["id"] != b["id"]
    assert a["settings"] == {}
    store.create_session(id="fixed")
    with pytest.raises(StoreError, match="already exists"):
        store.create_session(id="fixed")


def test_a_missing_or_deleted_session_and_a_taken_id_have_their_own_errors(store: Store) -> None:
    """So the RPC layer answers SESSION_NOT_FOUND (a session deleted while a chat or an
    update was under way) and INVALID_PARAMS, not INTERNAL_ERROR."""
    from assistant.daemon.store import SessionExists, SessionNotFound

    store.create_session(id="s")
    with pytest.raises(SessionExists):
        store.create_session(id="s")
    store.delete_session("s")
    for call in (lambda: store.add_message("s", "user", "hi"), lambda: store.update_session("s", title="t"),
                 lambda: store.export_markdown("s")):
        with pytest.raises(SessionNotFound, match="no session 's'"):
            call()
    assert issubclass(SessionNotFound, StoreError) and issubclass(SessionExists, StoreError)


def test_list_sessions_most_recently_updated_first(store: Store) -> None:
    for sid in ("a", "b", "c"):
        store.create_session(id=sid)
    assert [s["id"] for s in store.list_sessions()] == ["c", "b", "a"]
    store.add_message("a", "user", "hi")
    store.add_message("a", "assistant", "hello")
    listed = store.list_sessions()
    assert [s["id"] for s in listed] == ["a", "c", "b"]
    assert {s["id"]: s["message_count"] for s in listed} == {"a": 2, "b": 0, "c": 0}
    assert [s["id"] for s in store.list_sessions(limit=2)] == ["a", "c"]


def test_update_session_changes_only_passed_fields(store: Store) -> None:
    s = store.create_session(id="s", title="t", model="m", system_prompt="p",
                             settings={"k": 1})
    updated = store.update_session("s", title="new title")
    assert updated["title"] == "new title"
    assert updated["model"] == "m"
    assert updated["system_prompt"] == "p"
    assert updated["settings"] == {"k": 1}
    assert updated["updated"] > s["updated"]

    updated = store.update_session("s", system_prompt=None, settings={"k": 2, "x": [1]})
    assert updated["title"] == "new title"
    assert updated["system_prompt"] is None
    assert updated["settings"] == {"k": 2, "x": [1]}
    assert store.get_session("s") == updated

    with pytest.raises(StoreError, match="no session"):
        store.update_session("missing", title="x")


def test_delete_session_cascades_to_messages(store: Store, db_path: Path) -> None:
    store.create_session(id="gone")
    store.create_session(id="kept")
    store.add_message("gone", "user", "one")
    store.add_message("gone", "assistant", "two")
    store.add_message("kept", "user", "three")

    assert store.delete_session("gone") is True
    assert store.delete_session("gone") is False
    assert store.get_session("gone") is None
    assert store.messages("gone") == []
    assert [m["content"] for m in store.messages("kept")] == ["three"]
    # Check the table itself, not just the API, for orphans.
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute(
            "SELECT COUNT(*) FROM messages WHERE session_id = 'gone'"
        ).fetchone()[0] == 0
    finally:
        raw.close()


def test_ensure_session_gets_or_creates(store: Store) -> None:
    created = store.ensure_session("e1", title="first", model="m")
    assert created["id"] == "e1"
    assert created["title"] == "first"
    assert created["model"] == "m"
    store.add_message("e1", "user", "hi")
    again = store.ensure_session("e1", title="ignored")
    assert again["title"] == "first"
    assert again["message_count"] == 1
    assert len(store.list_sessions()) == 1
    with pytest.raises(StoreError, match="unknown"):
        store.ensure_session("e2", colour="blue")


# ------------------------------------------------------------------ messages


def test_messages_in_order_with_fields(store: Store) -> None:
    store.create_session(id="s")
    roles = ["system", "user", "assistant", "tool", "user", "assistant"]
    added = [store.add_message("s", r, f"m{i}") for i, r in enumerate(roles)]
    got = store.messages("s")
    assert [m["content"] for m in got] == [f"m{i}" for i in range(len(roles))]
    assert [m["role"] for m in got] == roles
    assert got == added
    ids = [m["id"] for m in got]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert all(m["session_id"] == "s" and m["status"] == "complete" for m in got)
    assert all(m["stats"] is None for m in got)


def test_add_message_bumps_session_updated(store: Store) -> None:
    s = store.create_session(id="s")
    m = store.add_message("s", "user", "hi")
    after = store.get_session("s")
    assert after["updated"] == m["created"] > s["updated"]
    assert after["created"] == s["created"]


def test_stats_json_round_trip(store: Store, db_path: Path) -> None:
    store.create_session(id="s")
    stats = {"tokens": 42, "tokens_per_s": 107.5, "ttft_ms": 40, "model": "smöl",
             "nested": {"a": [1, 2, None, True]}}
    m = store.add_message("s", "assistant", "answer", stats=stats, status="cancelled")
    assert m["stats"] == stats
    assert m["status"] == "cancelled"
    store.close()
    with Store(db_path) as reopened:
        (got,) = reopened.messages("s")
        assert got["stats"] == stats
        assert got["status"] == "cancelled"


def test_add_message_rejects_bad_input(store: Store) -> None:
    with pytest.raises(StoreError, match="no session"):
        store.add_message("missing", "user", "hi")
    store.create_session(id="s")
    with pytest.raises(StoreError, match="role"):
        store.add_message("s", "robot", "hi")
    with pytest.raises(StoreError, match="status"):
        store.add_message("s", "user", "hi", status="pending")
    with pytest.raises(StoreError, match="JSON"):
        store.add_message("s", "user", "hi", stats={"x": object()})
    # None of the failures left a row behind or moved the session.
    assert store.messages("s") == []


def test_write_is_committed_before_returning(store: Store, db_path: Path) -> None:
    store.create_session(id="s")
    store.add_message("s", "user", "visible?")
    # A second, independent connection only sees committed data.
    raw = sqlite3.connect(db_path)
    try:
        rows = raw.execute("SELECT content FROM messages WHERE session_id = 's'").fetchall()
    finally:
        raw.close()
    assert rows == [("visible?",)]


# ------------------------------------------------------------------ export


def test_export_markdown(store: Store) -> None:
    store.create_session(id="s", title="Trip planning")
    store.add_message("s", "user", "Where should I go?")
    store.add_message("s", "assistant", "Try Lisbon.")
    store.add_message("s", "assistant", "Also Por", status="cancelled")
    md = store.export_markdown("s")
    assert md.startswith("# Trip planning\n")
    user_at = md.index("**User**")
    assert md.index("Where should I go?") > user_at
    first_assistant = md.index("**Assistant**")
    assert first_assistant > md.index("Where should I go?")
    assert md.index("Try Lisbon.") > first_assistant
    assert "**Assistant** _(cancelled)_" in md
    assert md.index("Also Por") > md.index("Try Lisbon.")


def test_export_markdown_untitled_and_missing(store: Store) -> None:
    store.create_session(id="abc")
    assert store.export_markdown("abc").startswith("# Session abc")
    with pytest.raises(StoreError, match="no session"):
        store.export_markdown("missing")


# ------------------------------------------------------------------ durability


def test_reopen_after_close_keeps_data(db_path: Path) -> None:
    with Store(db_path) as s:
        s.create_session(id="s", title="kept", settings={"a": 1})
        s.add_message("s", "user", "hello")
        s.add_message("s", "assistant", "hi there")
    with Store(db_path) as s:
        session = s.get_session("s")
        assert session["title"] == "kept"
        assert session["settings"] == {"a": 1}
        assert session["message_count"] == 2
        assert [m["content"] for m in s.messages("s")] == ["hello", "hi there"]
        assert s.schema_version == SCHEMA_VERSION


@pytest.mark.parametrize("death", ["sigkill", "os_exit"])
def test_message_survives_abrupt_process_death(db_path: Path, death: str) -> None:
    die = (
        "os.kill(os.getpid(), signal.SIGKILL)" if death == "sigkill" else "os._exit(0)"
    )
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(PROJECT_ROOT)!r})
        from pathlib import Path
        from assistant.daemon.store import Store
        s = Store(Path({str(db_path)!r}))
        s.create_session(id="crash", title="before the crash")
        m = s.add_message("crash", "user", "acknowledged", stats={{"n": 1}})
        print("acked", m["id"], flush=True)
        # No close(): the WAL is never checkpointed into the main file.
        {die}
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    expected_rc = -signal.SIGKILL if death == "sigkill" else 0
    assert proc.returncode == expected_rc, proc.stderr
    assert proc.stdout.startswith("acked"), proc.stderr
    # The data lives only in the WAL (close() never ran to checkpoint it), so
    # this really exercises recovery from the log.
    wal = db_path.with_name(db_path.name + "-wal")
    assert wal.exists() and wal.stat().st_size > 0

    with Store(db_path) as s:
        session = s.get_session("crash")
        assert session is not None and session["title"] == "before the crash"
        (msg,) = s.messages("crash")
        assert msg["content"] == "acknowledged"
        assert msg["stats"] == {"n": 1}
        assert str(msg["id"]) == proc.stdout.split()[1]


# ------------------------------------------------------------------ plugin-owned data

# The 1 -> 2 step as it shipped, when the automation tables were core tables.
SHIPPED_V2_AUTOMATION_TABLES = [
    "CREATE TABLE automation_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, rule_id TEXT NOT NULL, "
    "started REAL NOT NULL, finished REAL, status TEXT NOT NULL, trace TEXT NOT NULL)",
    "CREATE INDEX automation_runs_rule ON automation_runs(rule_id, id)",
    "CREATE TABLE automation_state (rule_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, "
    "PRIMARY KEY (rule_id, key))",
]


def _tables(path: Path) -> set[str]:
    raw = sqlite3.connect(path)
    try:
        return {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        raw.close()


def test_fresh_database_has_core_plugin_tables_but_no_automation_tables(db_path: Path) -> None:
    Store(db_path).close()
    tables = _tables(db_path)
    assert {"sessions", "messages", "plugin_state", "plugin_migrations"} <= tables
    assert not tables & {"automation_runs", "automation_state"}  # filewatch makes them, when it runs


def test_version_2_database_keeps_its_automation_data_and_filewatch_adopts_it(db_path: Path) -> None:
    from plugins.filewatch import history

    # A database written when the automation tables were in the core schema (user_version 2).
    with Store(db_path):
        pass
    raw = sqlite3.connect(db_path)
    raw.execute("DROP TABLE plugin_state")
    raw.execute("DROP TABLE plugin_migrations")
    raw.execute("DROP TABLE media_text")  # and what version 4 (media) added
    raw.execute("ALTER TABLE messages DROP COLUMN parts")
    for statement in SHIPPED_V2_AUTOMATION_TABLES:
        raw.execute(statement)
    raw.execute("INSERT INTO automation_runs (rule_id, started, status, trace) VALUES ('r', 1.0, 'ok', '{}')")
    raw.execute("INSERT INTO automation_state VALUES ('r', 'enabled', 'false')")
    raw.execute("PRAGMA user_version = 2")
    raw.commit()
    raw.close()

    with Store(db_path) as s:
        assert s.schema_version == SCHEMA_VERSION == 4
        assert s.plugin_data.migrate("filewatch", history.MIGRATIONS) == [1]  # IF NOT EXISTS: the data stays
        assert s.plugin_data.run("filewatch", lambda conn: history.runs(conn, "r"))[0]["status"] == "ok"
        assert s.plugin_data.run("filewatch", lambda conn: history.get_state(conn, "r", "enabled")) is False
        assert s.plugin_data.migrations("filewatch") == [1]


def test_plugin_state_is_per_plugin_json_text_and_survives_reopening(db_path: Path) -> None:
    with Store(db_path) as s:
        data = s.plugin_data
        data.state_set("a", "k1", '{"x": 1}')
        data.state_set("a", "k1", '{"x": 2}')  # replaces
        data.state_set("a", "50%_off", "1")
        data.state_set("b", "k1", '"other"')
        assert data.state_get("a", "k1") == '{"x": 2}' and data.state_get("b", "k1") == '"other"'
        assert data.state_get("a", "missing") is None
        assert data.state_keys("a") == ["50%_off", "k1"]
        assert data.state_keys("a", "50%") == ["50%_off"] and data.state_keys("a", "5_") == []
        assert data.state_delete("b", "k1") is True and data.state_delete("b", "k1") is False
    with Store(db_path) as s:
        assert s.plugin_data.state_get("a", "k1") == '{"x": 2}' and s.plugin_data.state_keys("b") == []


def test_plugin_migrations_run_once_in_order_and_a_failed_one_leaves_nothing(db_path: Path) -> None:
    steps = [["CREATE TABLE p_items (id INTEGER PRIMARY KEY, name TEXT)"],
             ["INSERT INTO p_items (name) VALUES ('seed')"]]
    with Store(db_path) as s:
        data = s.plugin_data
        assert data.migrate("p", steps) == [1, 2]
        assert data.migrate("p", steps) == []
        broken = steps + [["ALTER TABLE p_items ADD COLUMN size INTEGER", "INSERT INTO no_such_table VALUES (1)"]]
        with pytest.raises(StoreError, match=r"plugin 'p': migration 3 failed: no such table"):
            data.migrate("p", broken)
        # Migration 3 rolled back whole: the column its first statement added is gone.
        assert [r[1] for r in data.run("p", lambda c: c.execute("PRAGMA table_info(p_items)").fetchall())] == \
            ["id", "name"]
        assert data.migrations("p") == [1, 2]
        fixed = steps + [["ALTER TABLE p_items ADD COLUMN size INTEGER"]]
        assert data.migrate("p", fixed) == [3]
        assert data.migrations("other") == []  # recorded per plugin
        with pytest.raises(StoreError, match="older version"):
            data.migrate("p", steps)  # the database is ahead of this copy of the plugin


def test_plugin_code_cannot_change_core_tables_or_the_transaction(db_path: Path) -> None:
    class Oops(Exception):
        pass

    with Store(db_path) as s:
        s.create_session(id="mine", title="private")
        data = s.plugin_data
        data.migrate("p", ["CREATE TABLE p_t (v TEXT UNIQUE)"])
        assert data.run("p", lambda c: c.execute("SELECT title FROM sessions").fetchall()) == [("private",)]
        for statement in ("DELETE FROM sessions", "UPDATE messages SET content = ''", "DROP TABLE plugin_state",
                          "INSERT INTO plugin_migrations VALUES ('p', 9, 0)", "ALTER TABLE sessions ADD x",
                          "CREATE INDEX p_i ON sessions(title)", "PRAGMA user_version = 99",
                          "PRAGMA synchronous = OFF", "COMMIT"):
            with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
                data.run("p", lambda c, q=statement: c.execute(q))

        def insert_then_fail(conn):
            conn.execute("INSERT INTO p_t VALUES ('gone')")
            raise Oops("after the insert")

        with pytest.raises(Oops):
            data.run("p", insert_then_fail)
        data.run("p", lambda c: c.execute("INSERT INTO p_t VALUES ('kept')"))
        with pytest.raises(sqlite3.IntegrityError):  # the plugin's own SQL errors come through as they are
            data.run("p", lambda c: c.execute("INSERT INTO p_t VALUES ('kept')"))
        assert data.run("p", lambda c: c.execute("SELECT v FROM p_t").fetchall()) == [("kept",)]
        assert s.get_session("mine")["title"] == "private" and s.schema_version == SCHEMA_VERSION
        # The guard is off again for the core's own writes.
        s.add_message("mine", "user", "still writable")


@pytest.fixture
def immutable(tmp_path):
    """Make a file read-only even for root (chattr +i); undone at the end. Skips where chattr cannot."""
    import shutil
    import subprocess

    made: list[Path] = []

    def make(path: Path) -> Path:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                            capture_output=True).returncode != 0:
            pytest.skip("needs chattr +i (root on a filesystem with the immutable flag) for a read-only file")
        made.append(path)
        return path

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_read_only_database_is_refused_at_open_with_a_clear_error(tmp_path, immutable):
    path = tmp_path / "assistant.db"
    with Store(path) as store:
        store.create_session(id="kept")
    immutable(path)
    with pytest.raises(StoreError, match="read-only") as info:
        Store(path)
    assert str(path) in str(info.value)


def test_daemon_with_a_read_only_database_refuses_to_start(immutable, isolated_home):
    from conftest import TEST_CONFIG

    from assistant import paths
    from assistant.testing import DaemonProcess

    config = TEST_CONFIG.replace("preload: true", "preload: false")
    DaemonProcess(isolated_home, config_text=config).start().stop()  # creates the database
    immutable(paths.database_path())
    with pytest.raises(RuntimeError, match="read-only"):
        DaemonProcess(isolated_home, config_text=config).start()
