"""The plugin API: what a plugin's hooks get instead of the daemon.

Each plugin gets one ``PluginContext``, its public contract with the daemon
(docs/plugins.md documents every member)::

    from assistant import hookimpl

    @hookimpl
    async def startup(context, settings):
        await context.migrate(["CREATE TABLE IF NOT EXISTS notes_seen (path TEXT PRIMARY KEY)"])
        context.log.info("ready; %d starts so far", await context.state.get("starts", 0))
        await context.state.set("starts", await context.state.get("starts", 0) + 1)
        context.emit("notes.ready", {"rules": len(settings.get("rules", []))})

The daemon provides the context's services through ``PluginServices``; a
plugin never sees that object, nor the daemon: the daemon's internals may
change, this module's contract does not.

This module imports nothing of the daemon (the daemon imports it), so a
plugin that imports it for type hints stays cheap to load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

__all__ = ["PluginContext", "PluginState", "PluginServices", "Migrations", "input_file", "size_words"]

T = TypeVar("T")

# One migration step is one SQL statement or a list of statements run together.
Migrations = Sequence["str | Sequence[str]"]

_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@runtime_checkable
class PluginServices(Protocol):
    """What the daemon provides to plugin contexts (the daemon object satisfies it).

    Internal to the daemon and the plugin host: plugins get a ``PluginContext``.
    """

    socket_path: Path
    # The open ``assistant.daemon.store.Store`` (None until the daemon has started).
    store: Any

    @property
    def data_dir(self) -> Path:
        """The directory that holds the database; plugin data dirs go under it."""

    def emit(self, type_: str, data: dict[str, Any] | None = None, *, source: str) -> dict[str, Any]:
        """Publish an event (from the event loop or any thread); returns it."""

    async def call_skill(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run a skill; errors as ``assistant.protocol.RPCError``."""

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` on the store's thread."""


class PluginState:
    """A plugin's persistent key-value state: JSON values under string keys.

    Kept in the core database (table ``plugin_state``, keyed by plugin name),
    committed before each write returns, so it survives restarts and crashes.
    """

    def __init__(self, context: "PluginContext"):
        self._context = context

    async def get(self, key: str, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default``."""
        text = await self._context._store_call("state_get", _key(key))
        return default if text is None else json.loads(text)

    async def set(self, key: str, value: Any) -> None:
        """Store ``value`` (anything ``json.dumps`` takes) under ``key``. TypeError if it is not JSON."""
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"plugin {self._context.name!r}: state {key!r} is not JSON-serialisable: {exc}") from None
        await self._context._store_call("state_set", _key(key), text)

    async def delete(self, key: str) -> bool:
        """Remove ``key``; False if it was not there."""
        return await self._context._store_call("state_delete", _key(key))

    async def keys(self, prefix: str = "") -> list[str]:
        """The keys stored (those starting with ``prefix``), sorted."""
        return await self._context._store_call("state_keys", prefix)


def _key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"a state key must be a non-empty string, got {key!r}")
    return key


class PluginContext:
    """What a plugin's hooks receive: the one way a plugin talks to the daemon.

    One per plugin, built by the plugin host. Members:

    - ``name``: the plugin's name (events it emits carry it as ``source``);
    - ``settings``: its entry in the config's ``plugins:`` section (``{}`` if none);
    - ``log``: a ``logging.Logger`` named ``assistant.plugin.NAME``;
    - ``emit(type, data=None)``: publish an event (from the loop or any thread);
    - ``await call_skill(name, arguments)``: run a skill (any plugin's);
    - ``await chat(prompt, **params)`` or ``chat(messages=[...], **params)``:
      ask the model; returns the ``chat`` result (``text``, ``finish_reason``,
      ``stats``, ...);
    - ``state``: persistent key-value state (``await state.get/set/delete/keys``);
    - ``await migrate([...])``: create and evolve the plugin's own tables;
    - ``await db(fn, *args)``: run ``fn(conn, *args)`` in a transaction;
    - ``data_dir``: a private directory for files (an SQLite file of its own, say).

    Errors from the daemon (``call_skill``, ``chat``) are
    ``assistant.protocol.RPCError``.
    """

    def __init__(self, name: str, settings: dict[str, Any] | None, services: PluginServices | None):
        self.name = name
        self.settings: dict[str, Any] = settings if settings is not None else {}
        self.log = logging.getLogger(f"assistant.plugin.{name}")
        self.state = PluginState(self)
        self.__services = services  # private: the contract is this class, not the daemon
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"<PluginContext {self.name!r}>"

    def _services(self) -> PluginServices:
        if self.__services is None:
            raise RuntimeError(f"plugin {self.name!r}: no daemon behind this context (plugins loaded outside "
                               "`assistant serve` can register things, not use the daemon)")
        return self.__services

    # -- events, skills, the model -------------------------------------------------

    def emit(self, type: str, data: dict[str, Any] | None = None) -> dict[str, Any]:  # noqa: A002 - the event's field
        """Publish an event with this plugin as its source, to subscribed clients
        and every plugin's ``on_event``. Callable from the loop or any thread.
        Returns the event (``{"type", "time", "source", "data"}``)."""
        if not isinstance(type, str) or not type:
            raise TypeError(f"an event type must be a non-empty string, got {type!r}")
        return self._services().emit(type, data, source=self.name)

    async def call_skill(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a skill (validated against its schema) and return its result.
        RPCError: SKILL_NOT_FOUND, INVALID_PARAMS or SKILL_FAILED."""
        return await self._services().call_skill(name, arguments or {})

    async def chat(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                   **params: Any) -> dict[str, Any]:
        """Ask the model: the daemon's ``chat`` method, over this plugin's own
        connection to the daemon (opened on first use, reused, closed at shutdown).

        Give ``prompt`` (one user message) or ``messages``; ``params`` are the
        other ``chat`` parameters (``max_tokens``, ``temperature``, ``model``,
        ``system``, ``session``, ``draft``, ``tools``, ...; docs/protocol.md).
        Returns the result dict. Cancelling the awaiting task stops the reply
        on the daemon too.

        A plugin's chat is background work (``priority: "background"``): a
        person's requests go first, and a long reply pauses between decode
        steps while they run. Pass ``priority="interactive"`` for a chat a
        person is waiting for (a plugin's own UI, say).
        """
        if (prompt is None) == (messages is None):
            raise TypeError("chat() takes a prompt or messages=[...], exactly one of the two")
        params.setdefault("priority", "background")
        if messages is not None:
            params["messages"] = messages
        else:
            params["prompt"] = prompt
        client = await self._connection()
        stream = await client.chat(**params)
        try:
            return await stream.result()
        except asyncio.CancelledError:
            # Stop generating for nobody; the connection may already be gone at shutdown.
            with contextlib.suppress(Exception):
                await asyncio.shield(stream.cancel())
            raise

    async def _connection(self) -> Any:
        # The public client on the daemon's own socket: a plugin asks the model
        # exactly as any client does (queueing, sessions, cancellation, stats).
        from assistant.client import Client

        async with self._client_lock:
            if self._client is None or self._client.closed.is_set():
                self._client = await Client.connect(self._services().socket_path, client_name=self.name)
            return self._client

    async def aclose(self) -> None:
        """Close the context's connection to the daemon (the plugin host does, at shutdown)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # -- storage -------------------------------------------------------------------

    async def migrate(self, migrations: Migrations) -> list[int]:
        """Create and evolve the plugin's own tables in the daemon's database.

        ``migrations`` is the plugin's whole history, oldest first: entry *i*
        (a statement, or a list of statements) is migration *i + 1*. Each runs
        once, in order, in a transaction together with its record (table
        ``plugin_migrations``, per plugin), so a failed one leaves nothing
        behind and is retried next time. Append entries; never edit one that
        has shipped. Name tables after the plugin (``weather_readings``); the
        core tables cannot be written. Returns the numbers of the migrations
        run now (``[]`` when up to date).
        """
        applied = await self._store_call("migrate", list(migrations))
        if applied:
            self.log.info("ran migration(s) %s", ", ".join(map(str, applied)))
        return applied

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(conn, *args, **kwargs)`` on the database's thread, in one
        transaction, and return its result.

        ``conn`` is an ``sqlite3.Connection`` (WAL, ``synchronous=FULL``): the
        transaction commits (durably) when ``fn`` returns and rolls back when
        it raises; what ``fn`` raises (``sqlite3.Error`` included) propagates.
        Do not commit, begin or roll back inside ``fn``; the core tables are
        read-only to it. Keep ``fn`` short: every database user waits for it.
        """
        return await self._store_call("run", lambda conn: fn(conn, *args, **kwargs))

    @property
    def data_dir(self) -> Path:
        """A private directory for this plugin's files (created 0700 on first use),
        under the daemon's data dir: ``<data dir>/plugins/NAME``."""
        if not _SAFE_NAME.fullmatch(self.name):
            raise RuntimeError(f"plugin {self.name!r}: the name cannot be used as a directory name")
        root = Path(self._services().data_dir) / "plugins"
        path = root / self.name
        for folder in (root, path):
            if not folder.is_dir():
                folder.mkdir(parents=True, mode=0o700, exist_ok=True)
                os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
        return path

    async def _store_call(self, what: str, *args: Any) -> Any:
        services = self._services()
        store = services.store
        if store is None:
            raise RuntimeError(f"plugin {self.name!r}: the database is not open yet (use it from startup on)")
        return await services.db(getattr(store.plugin_data, what), self.name, *args)


def size_words(n: int) -> str:
    """A size as people read it: "512 bytes", "20 KB", "3.4 MB"."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KB"
    return f"{n / (1024 * 1024):.1f} MB"


def input_file(path: Any, *, max_bytes: int, what: str, error: type[Exception] = ValueError) -> Path:
    """The file a skill's ``path`` argument names, checked before the skill reads it:
    a non-empty string, absolute (``~`` expanded; a relative one would name a file
    in the daemon's working directory, not the caller's), a regular file (a FIFO or
    a device would block or never end), not empty, at most ``max_bytes``, readable.
    Raises ``error`` (a ``ValueError`` is INVALID_PARAMS to the caller) with a
    sentence naming the path; ``what`` names the kind of file ("image", "audio")."""
    import stat

    if not isinstance(path, str) or not path:
        raise error(f"expected the path of an {what} file (a non-empty string), got {path!r}")
    p = Path(path).expanduser()
    if not p.is_absolute():
        raise error(f"{path}: give an absolute path (or one starting with ~)")
    try:
        st = p.stat()
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read it: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: not a regular file")
    if st.st_size == 0:
        raise error(f"{path}: the file is empty")
    if st.st_size > max_bytes:
        raise error(f"{path}: {size_words(st.st_size)}, over the {size_words(max_bytes)} limit for an {what} "
                    "file (plugin setting max_bytes)")
    if not os.access(p, os.R_OK):
        raise error(f"{path}: permission denied")
    return p
