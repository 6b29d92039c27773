"""The connection to the core database: opening, pragmas, migrations,
transactions, close.

WAL mode with ``synchronous=FULL``, and one transaction per write committed
before the writing method returns: a write acknowledged to a client survives
a kill -9 of the daemon or a power cut (DESIGN.md, "Persistence and config").
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Iterator, TypeVar

from assistant.daemon.store.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = ["Database", "StoreError", "SessionNotFound", "SessionExists"]

_D = TypeVar("_D", bound="Database")


class StoreError(Exception):
    """Anything the store cannot do: a bad file, a missing session, bad input."""


class SessionNotFound(StoreError):
    """The session named does not exist (never did, or was deleted meanwhile)."""


class SessionExists(StoreError):
    """A session with that id exists already."""


class Database:
    """One SQLite connection, migrated to ``SCHEMA_VERSION``, with the
    transaction helpers the store's parts write through.

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
        self._make_parent_dir()
        self._open(self._connect())
        # Best effort: the database holds the user's conversations.
        with contextlib.suppress(OSError):
            os.chmod(self.path, 0o600)

    # ---------------------------------------------------------------- opening

    def _make_parent_dir(self) -> None:
        parent = self.path.parent
        if parent.exists():
            return
        try:
            parent.mkdir(parents=True, mode=0o700)
            # mkdir's mode is masked by the umask; the chat history is
            # private, so set it outright.
            os.chmod(parent, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise StoreError(f"cannot create the directory for the database {self.path}: {e}") from e

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions. We issue BEGIN
            # IMMEDIATE / COMMIT ourselves so a write is committed (and
            # fsynced) before its method returns, never left pending.
            return sqlite3.connect(
                str(self.path),
                isolation_level=None,
                check_same_thread=False,
                timeout=10.0,
            )
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the database {self.path}: {e}") from e

    def _open(self, conn: sqlite3.Connection) -> None:
        """Set the pragmas and migrate; on any failure close ``conn`` and raise StoreError."""
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
            self._check_writable(conn)
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

    def _check_writable(self, conn: sqlite3.Connection) -> None:
        """Refuse a database we can only read, at start, in one clear sentence.

        SQLite opens a file it may not write read-only without a word, and
        then every write fails later ("attempt to write a readonly
        database"). A write that changes nothing, rolled back, finds out now."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {int(version)}")
        except sqlite3.OperationalError as e:
            raise StoreError(
                f"the database {self.path} is read-only for this user ({e}); the daemon needs to write "
                "sessions there: fix its permissions, or point the data dir elsewhere (XDG_DATA_HOME)"
            ) from None
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")

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

    # ---------------------------------------------------------------- transactions

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

    def __enter__(self: _D) -> _D:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
