"""The daemon: owns the models, the sessions database and the socket.

``Daemon.run()`` is what ``assistant serve`` runs. Its lifecycle:

1. take the per-socket lock (one daemon per user; a second one is refused),
2. replace a stale socket left by a killed daemon,
3. open the SQLite store, listen, and preload the default model,
4. on SIGTERM/SIGINT or ``shutdown``: cancel in-flight requests (they are
   answered, with ``finish_reason: "cancelled"``), unload models, close the
   database, remove the socket.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import fnmatch
import inspect
import errno
import fcntl
import logging
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any, Callable

from backends import backend_names, get_backend_class, register_backend
from backends.base import BackendError, BackendUnavailable, ContextOverflowError, LoadOptions, ModelLoadError

from assistant import __version__, paths
from assistant.machine import hardware
from assistant.config import Config
from assistant.inference.generation import generate
from assistant.config.models import ModelNotFoundError, ModelSpec, list_models, resolve_model
from assistant.machine.profiles import apply_profile
from assistant.plugin_host import PluginHost, allow_list_from_env, plugin_dirs, run_in_thread
from assistant.protocol import PROTOCOL_VERSION, ErrorCode, RPCError
from assistant.daemon import tools
from assistant.inference.sampling import SamplingParams
from assistant.daemon.server import Request, RPCServer, TextStream
from assistant.inference import speculative
from assistant.daemon.store import Store, StoreError
from assistant.daemon.worker import ModelWorker

log = logging.getLogger("assistant.daemon")

VERSION = __version__


class DaemonError(Exception):
    """The daemon cannot start (another one runs, the socket is taken, ...)."""


# -- one daemon per socket ---------------------------------------------------


def acquire_lock(lock_file: Path) -> int:
    """Hold an exclusive flock on ``lock_file`` for the life of the process.

    The kernel drops the lock when the process dies, even by kill -9, so a
    stale lock never blocks a restart.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonError(f"another daemon (pid {pid}) is already running on this socket; lock: {lock_file}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def clear_stale_socket(sock_path: Path) -> None:
    """Remove a socket file nobody listens on (we hold the lock, so no daemon does)."""
    if not sock_path.exists() and not sock_path.is_symlink():
        return
    if not stat.S_ISSOCK(sock_path.lstat().st_mode):
        raise DaemonError(f"{sock_path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock_path))
    except OSError:
        log.info("replacing stale socket %s", sock_path)
        sock_path.unlink()
        return
    finally:
        probe.close()
    raise DaemonError(f"{sock_path} is in use by a process that does not hold the daemon lock; refusing to replace it")


def prepare_runtime_dir(sock_path: Path) -> None:
    parent = sock_path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    if parent == paths.runtime_dir():
        os.chmod(parent, 0o700)  # our own directory: private whatever the umask was


# -- parameter checking ------------------------------------------------------

_MISSING = object()


def param(params: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = _MISSING,
          check: Callable[[Any], bool] | None = None, expected: str = "") -> Any:
    """One request parameter, type-checked; a bad one is INVALID_PARAMS naming it."""
    value = params.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise RPCError(ErrorCode.INVALID_PARAMS, f"missing parameter {name!r}")
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False
    else:
        ok = isinstance(value, types)
    if ok and check is not None:
        ok = check(value)
    if not ok:
        want = expected or (types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types))
        raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter {name!r}: expected {want}, got {value!r}")
    return value


def _as_auto(value: Any) -> int | None:
    return None if value in (None, "auto") else int(value)


# -- the daemon --------------------------------------------------------------


CORE_METHODS = ("initialize", "status", "chat", "cancel", "shutdown", "models.list", "models.load",
                "models.unload", "sessions.list", "sessions.get", "sessions.create", "sessions.update",
                "sessions.delete", "sessions.export", "sessions.rewind", "skills.list", "skills.call", "plugins.list",
                "events.subscribe", "events.unsubscribe")


class Daemon:
    def __init__(self, config: Config, *, socket_path: Path | None = None, db_path: Path | None = None,
                 plugins: PluginHost | None = None):
        self.config = config
        self.socket_path = socket_path or paths.socket_path()
        self.db_path = db_path or paths.database_path()
        self.server = RPCServer(max_line_bytes=config.max_line_bytes)
        self.models: dict[str, ModelWorker] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self.machine = hardware.probe()
        # The first profile (config `profiles:`) that matches this machine sets backend, model, threads, context.
        self.config, self.profile = apply_profile(config, self.machine)
        self.started = time.time()
        self.store: Store | None = None
        # SQLite is blocking I/O: it gets a thread of its own, in order.
        self._db = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._stop = asyncio.Event()
        self._lock_fd: int | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)
        self._tasks: set[asyncio.Task] = set()
        for name in CORE_METHODS:
            self.server.method(name, getattr(self, "m_" + name.replace(".", "_")))
        if plugins is None:
            plugins = PluginHost(settings=config.plugins, dirs=plugin_dirs(config.plugin_dirs),
                                 allow=allow_list_from_env()).load()
        self.plugins = plugins
        self.plugins.collect(reserved_methods=set(CORE_METHODS))
        for name, (target, _plugin) in self.plugins.backends.items():
            register_backend(name, target)
        for name, (factory, plugin) in self.plugins.drafters.items():
            try:
                speculative.register_drafter(name, factory)
            except speculative.DrafterError as exc:
                log.error("plugin %s: %s", plugin, exc)
        for name, (handler, plugin, _desc) in self.plugins.methods.items():
            self.server.method(name, self._plugin_method(name, handler, plugin))

    # -- plugins and events ----------------------------------------------------

    def _plugin_method(self, name: str, handler: Callable[..., Any], plugin: str):
        async def call(req: Request) -> Any:
            try:
                if inspect.iscoroutinefunction(handler):
                    return await handler(req.params)
                return await run_in_thread(handler, req.params)
            except RPCError:
                raise
            except Exception as exc:  # noqa: BLE001 - a plugin bug is the caller's error, not a crash
                log.exception("method %s of plugin %s failed", name, plugin)
                raise RPCError(ErrorCode.INTERNAL_ERROR,
                               f"method {name!r} (plugin {plugin}) failed: {type(exc).__name__}: {exc}") from None
        return call

    def emit(self, type_: str, data: dict[str, Any] | None = None, *, source: str = "daemon") -> dict[str, Any]:
        """Publish an event: to subscribed clients, to plugins' ``on_event``, and to
        ``events.subscribe``'s backlog. Callable from the event loop or any thread
        (sync plugin hooks run in threads)."""
        event = {"type": type_, "time": time.time(), "source": source, "data": data or {}}
        try:
            in_loop = asyncio.get_running_loop() is self.server.loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            self._publish(event)
        else:
            self.server.loop.call_soon_threadsafe(self._publish, event)
        return event

    def _publish(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.server.broadcast(event["type"], "event", event)
        self._spawn(self.plugins.acall("on_event", event=event, daemon=self))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        self._check_speculative_config()
        prepare_runtime_dir(self.socket_path)
        self._lock_fd = acquire_lock(paths.lock_path(self.socket_path))
        clear_stale_socket(self.socket_path)
        try:
            self.store = await self.db(Store, self.db_path)
        except StoreError as exc:
            raise DaemonError(str(exc)) from exc
        await self.server.listen(str(self.socket_path))
        log.info("daemon %s listening on %s (pid %d)", VERSION, self.socket_path, os.getpid())
        loaded = [r.name for r in self.plugins.records.values() if r.status == "loaded"]
        failed = [r.name for r in self.plugins.records.values() if r.status == "failed"]
        log.info("plugins: %s%s", ", ".join(loaded) or "none", f"; failed: {', '.join(failed)}" if failed else "")
        if self.config.preload:
            asyncio.ensure_future(self._preload())
        # Startup hooks run in the background: a slow plugin never delays serving.
        self._spawn(self._startup_plugins())

    async def _startup_plugins(self) -> None:
        await self.plugins.acall("startup", daemon=self)
        self.emit("daemon.started", {"pid": os.getpid(), "socket": str(self.socket_path)})

    async def _preload(self) -> None:
        try:
            await self.get_model(self.config.model)
        except RPCError as exc:
            log.error("could not load the default model %r: %s", self.config.model, exc.message)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        log.info("shutting down")
        self.emit("daemon.stopping", {})
        try:
            await asyncio.wait_for(self.plugins.acall("shutdown", daemon=self), 10)
        except asyncio.TimeoutError:
            log.warning("plugin shutdown hooks took over 10 s; going on")
        if self.server._server is not None:
            self.server._server.close()  # no new connections
        tasks = [t for c in self.server.connections for t in c.tasks]
        for conn in self.server.connections:
            conn.cancel_all()
        if tasks:
            # In-flight requests see their cancel flag within one decode step
            # and answer; give them a moment to do so.
            await asyncio.wait(tasks, timeout=15)
        for conn in list(self.server.connections):
            try:
                await asyncio.wait_for(conn.writer.drain(), 2)
            except Exception:  # noqa: BLE001 - the client may be gone
                pass
        await self.server.close()
        for worker in list(self.models.values()):
            try:
                await asyncio.wait_for(worker.unload(), 15)
            except Exception:  # noqa: BLE001
                log.exception("unloading %s failed", worker.key)
        if self.store is not None:
            await self.db(self.store.close)
        self._db.shutdown(wait=True)
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        log.info("stopped")

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    # -- models ----------------------------------------------------------------

    def _choose_backend(self, requested: str | None) -> str:
        requested = requested or "auto"
        available = {}
        for name in backend_names():
            try:
                available[name] = get_backend_class(name).availability()
            except Exception as exc:  # noqa: BLE001 - a broken backend module is just unavailable
                available[name] = (False, str(exc))
        if requested != "auto" and requested in available:
            name = requested  # pinned; plugin backends are only ever chosen this way
        else:
            try:
                name, _why = hardware.choose_backend(self.machine, requested, available)
            except ValueError:
                raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, f"unknown backend {requested!r}; known backends: "
                               f"auto, {', '.join(available)}") from None
        ok, why = available.get(name, (False, "not installed"))
        if not ok:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, f"backend {name!r} is not available: {why}")
        return name

    async def get_model(self, name: str | None, *, backend: str | None = None, context: int | None = None,
                        threads: int | None = None) -> ModelWorker:
        """The loaded model called ``name``, loading it first if needed."""
        name = name or self.config.model
        if name in self._loading:
            await asyncio.shield(self._loading[name])
        worker = self.models.get(name)
        if worker is not None and worker.state == "ready":
            # "auto" keeps whatever backend the model runs on: it was chosen for this machine.
            wanted_backend = backend in (None, "auto") or backend == worker.backend.name
            wanted_ctx = context is None or (worker.info and worker.info.context_length == context)
            if wanted_backend and wanted_ctx:
                return worker
        task = asyncio.ensure_future(self._load(name, backend, context, threads))
        self._loading[name] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._loading.get(name) is task:
                del self._loading[name]

    async def _load(self, name: str, backend: str | None, context: int | None, threads: int | None) -> ModelWorker:
        try:
            # Off the event loop: the first use of a built-in may assemble and hash a file.
            spec = await asyncio.get_running_loop().run_in_executor(None, resolve_model, name, self.config)
        except ModelNotFoundError as exc:
            raise RPCError(ErrorCode.MODEL_NOT_FOUND, str(exc)) from None
        except ModelLoadError as exc:
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
        backend_name = self._choose_backend(backend or spec.backend or self.config.backend)
        try:  # that backend's file (an alias may name one per backend), checked before anything is unloaded
            spec = await asyncio.get_running_loop().run_in_executor(None, spec.for_backend, backend_name)
        except ModelNotFoundError as exc:
            raise RPCError(ErrorCode.MODEL_NOT_FOUND, str(exc)) from None
        except ModelLoadError as exc:
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
        old = self.models.get(name)
        if old is not None:  # reloading with other settings: the old one goes first
            del self.models[name]
            await old.unload()
        await self._evict_for_one_more()
        options = LoadOptions(
            n_ctx=context or spec.context or _as_auto(self.config.context),
            n_threads=threads or spec.threads or _as_auto(self.config.threads),
            chat_template=spec.chat_template,
        )
        if backend_name == "llama.cpp" and self._spec_settings(name)["drafter"] != "off":
            # Verified batches are bit-identical to one-token steps only when
            # the K cache is not F16/F32 (see backends/llamacpp.py): greedy
            # identity needs it. Q8_0 K with F16 V costs plain decoding nothing.
            options.extra["kv_type"] = "q8_0/f16"
        elif backend_name == "llama.cpp":
            # No drafting configured: no MTP layers, context or hidden-state copies per token.
            options.extra["mtp"] = False
        try:
            instance = get_backend_class(backend_name)()
        except BackendUnavailable as exc:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, str(exc)) from None
        worker = ModelWorker(name, spec, instance, options)
        self.models[name] = worker
        log.info("loading %s from %s with %s", name, spec.path, backend_name)
        try:
            info = await worker.load()
        except ModelLoadError as exc:
            self.models.pop(name, None)
            await worker.unload()
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a backend bug must not kill the daemon
            self.models.pop(name, None)
            log.exception("loading %s failed", name)
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"could not load {name}: {type(exc).__name__}: {exc}") from None
        log.info("loaded %s: %s, context %d, %d threads", name, info.architecture, info.context_length, info.n_threads)
        self.emit("model.loaded", {"model": name, "backend": backend_name, "path": str(spec.path)})
        return worker

    async def _evict_for_one_more(self) -> None:
        """Unload least-recently-used idle models until one more fits."""
        while len(self.models) >= self.config.max_loaded_models:
            idle = [w for w in self.models.values() if w.active == 0]
            if not idle:
                log.warning("all %d loaded models are busy; loading one more anyway", len(self.models))
                return
            victim = min(idle, key=lambda w: w.last_used)
            log.info("unloading %s to make room", victim.key)
            del self.models[victim.key]
            await victim.unload()

    # -- methods ---------------------------------------------------------------

    async def m_initialize(self, req: Request) -> dict[str, Any]:
        p = req.params
        version = param(p, "protocol_version", int, PROTOCOL_VERSION)
        if version != PROTOCOL_VERSION:
            raise RPCError(ErrorCode.INCOMPATIBLE_VERSION,
                           f"client speaks protocol {version}, this daemon speaks {PROTOCOL_VERSION}; "
                           "upgrade the older side", {"protocol_version": PROTOCOL_VERSION})
        req.conn.client_name = param(p, "client", str, "?")
        req.conn.initialized = True
        return {
            "protocol_version": PROTOCOL_VERSION,
            "daemon_version": VERSION,
            "pid": os.getpid(),
            "capabilities": sorted(self.server.methods),
            "plugins": [r.name for r in self.plugins.records.values() if r.status == "loaded"],
            "default_model": self.config.model,
        }

    async def m_status(self, req: Request) -> dict[str, Any]:
        return {
            "daemon_version": VERSION,
            "protocol_version": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "socket": str(self.socket_path),
            "database": str(self.db_path),
            "config": str(self.config.source) if self.config.source else None,
            "default_model": self.config.model,
            "models": [w.describe() for w in self.models.values()],
            "loading": sorted(self._loading),
            "connections": len(self.server.connections),
            "requests_in_flight": self.server.in_flight(exclude=req),
        }

    async def m_shutdown(self, req: Request) -> dict[str, Any]:
        asyncio.get_running_loop().call_later(0.05, self.request_stop)
        return {"stopping": True}

    async def m_cancel(self, req: Request) -> dict[str, Any]:
        target = req.params.get("id")
        other = req.conn.requests.get(target)
        if other is None or other is req:
            raise RPCError(ErrorCode.REQUEST_NOT_FOUND, f"no request {target!r} in flight on this connection")
        other.cancel.set()
        return {"cancelled": True}

    async def m_models_list(self, req: Request) -> dict[str, Any]:
        available = await asyncio.get_running_loop().run_in_executor(None, list_models, self.config)
        return {"loaded": [w.describe() for w in self.models.values()], "available": available,
                "default": self.config.model}

    async def m_models_load(self, req: Request) -> dict[str, Any]:
        p = req.params
        name = param(p, "model", str, self.config.model)
        worker = await self.get_model(
            name,
            backend=param(p, "backend", str, None),
            context=param(p, "context", int, None, lambda v: v >= 64, "an integer >= 64"),
            threads=param(p, "threads", int, None, lambda v: v >= 1, "an integer >= 1"),
        )
        return worker.describe()

    async def m_models_unload(self, req: Request) -> dict[str, Any]:
        name = param(req.params, "model", str)
        worker = self.models.pop(name, None)
        if worker is None:
            raise RPCError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not loaded")
        await worker.unload()
        self.emit("model.unloaded", {"model": name})
        return {"unloaded": name}

    # sessions

    async def _session(self, sid: str) -> dict[str, Any]:
        sess = await self.db(self.store.get_session, sid)
        if sess is None:
            raise RPCError(ErrorCode.SESSION_NOT_FOUND, f"no session {sid!r}")
        return sess

    async def m_sessions_list(self, req: Request) -> dict[str, Any]:
        limit = param(req.params, "limit", int, 100, lambda v: v > 0, "a positive integer")
        return {"sessions": await self.db(self.store.list_sessions, limit)}

    async def m_sessions_get(self, req: Request) -> dict[str, Any]:
        sid = param(req.params, "id", str)
        sess = await self._session(sid)
        sess["messages"] = await self.db(self.store.messages, sid)
        return sess

    async def m_sessions_create(self, req: Request) -> dict[str, Any]:
        p = req.params
        sid = param(p, "id", str, None)
        if sid is not None and await self.db(self.store.get_session, sid) is not None:
            raise RPCError(ErrorCode.INVALID_PARAMS, f"session {sid!r} already exists")
        return await self.db(self.store.create_session, id=sid, title=param(p, "title", str, None),
                             model=param(p, "model", str, None), system_prompt=param(p, "system", str, None),
                             settings=param(p, "settings", dict, None))

    async def m_sessions_update(self, req: Request) -> dict[str, Any]:
        p = req.params
        sid = param(p, "id", str)
        await self._session(sid)
        changes = {}
        for key, field, types in (("title", "title", str), ("model", "model", str),
                                  ("system", "system_prompt", str), ("settings", "settings", dict)):
            if key in p:
                changes[field] = param(p, key, types)
        await self.db(self.store.update_session, sid, **changes)
        return await self._session(sid)

    async def m_sessions_delete(self, req: Request) -> dict[str, Any]:
        sid = param(req.params, "id", str)
        if not await self.db(self.store.delete_session, sid):
            raise RPCError(ErrorCode.SESSION_NOT_FOUND, f"no session {sid!r}")
        return {"deleted": sid}

    async def m_sessions_rewind(self, req: Request) -> dict[str, Any]:
        """Delete a message and every later one of the session (the TUI's regenerate)."""
        sid = param(req.params, "id", str)
        mid = param(req.params, "message_id", int)
        await self._session(sid)
        try:
            deleted = await self.db(self.store.delete_messages_from, sid, mid)
        except StoreError as exc:
            raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        return {"deleted": deleted}

    async def m_sessions_export(self, req: Request) -> dict[str, Any]:
        sid = param(req.params, "id", str)
        await self._session(sid)
        return {"markdown": await self.db(self.store.export_markdown, sid)}

    # chat

    def _sampling(self, p: dict[str, Any], model: ModelSpec | None = None) -> tuple[SamplingParams, int]:
        """The request's sampling: its own parameters, else the config's
        generation keys, else (for keys the config file does not set) what
        the model comes with, else the built-in defaults."""
        g = self.config.generation
        own = (model.generation if model is not None else None) or {}
        if own:
            g = dataclasses.replace(g, **{k: v for k, v in own.items()
                                          if f"generation.{k}" not in self.config.given and hasattr(g, k)})
        num = (int, float)
        params = SamplingParams(
            temperature=float(param(p, "temperature", num, g.temperature, lambda v: 0 <= v <= 100, "a number >= 0")),
            top_p=float(param(p, "top_p", num, g.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            top_k=param(p, "top_k", int, g.top_k, lambda v: v >= 0, "an integer >= 0"),
            min_p=float(param(p, "min_p", num, g.min_p, lambda v: 0 <= v < 1, "a number in [0, 1)")),
            repeat_penalty=float(param(p, "repeat_penalty", num, g.repeat_penalty, lambda v: v > 0, "a number > 0")),
            seed=param(p, "seed", int, g.seed),
        )
        max_tokens = param(p, "max_tokens", int, g.max_tokens, lambda v: v >= 1, "an integer >= 1")
        return params, max_tokens

    @staticmethod
    def _check_messages(messages: Any) -> list[dict[str, str]]:
        if not isinstance(messages, list) or not messages:
            raise RPCError(ErrorCode.INVALID_PARAMS, "parameter 'messages': expected a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RPCError(ErrorCode.INVALID_PARAMS,
                               f"parameter 'messages[{i}]': expected {{role: system|user|assistant, content: string}}")
            out.append({"role": m["role"], "content": m["content"]})
        return out

    @staticmethod
    def _alternate(messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """Merge consecutive messages of one role: many chat templates (Gemma's
        among them) refuse a conversation whose roles do not alternate, which
        happens when a turn failed and the user asked again."""
        out: list[dict[str, str]] = []
        for m in messages:
            if out and out[-1]["role"] == m["role"] and m["role"] != "system":
                out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
            else:
                out.append(dict(m))
        return out

    async def m_chat(self, req: Request) -> dict[str, Any]:
        started = time.perf_counter()
        p = req.params
        sampling, max_tokens = self._sampling(p)
        spec_request = self._speculative_request(p)
        stop = param(p, "stop", list, [], lambda v: all(isinstance(s, str) for s in v), "a list of strings")
        ignore_eos = param(p, "ignore_eos", bool, False)
        sid = param(p, "session", str, None)
        system = param(p, "system", str, None)
        model_name = param(p, "model", str, None)
        if "messages" in p:
            if sid is not None:
                raise RPCError(ErrorCode.INVALID_PARAMS, "give either 'messages' or 'session' with 'prompt', not both")
            messages = self._check_messages(p["messages"])
            if system is not None:
                messages = [{"role": "system", "content": system}] + [m for m in messages if m["role"] != "system"]
            user_text = None
        else:
            user_text = param(p, "prompt", str)
            messages = []

        user_msg = None
        if sid is not None:
            sess = await self.db(self.store.ensure_session, sid, model=model_name, system_prompt=system)
            if system is not None and sess.get("system_prompt") != system:
                await self.db(self.store.update_session, sid, system_prompt=system)
                sess["system_prompt"] = system
            model_name = model_name or sess.get("model")
            system = sess.get("system_prompt")
            history = await self.db(self.store.messages, sid)
            messages = [{"role": m["role"], "content": m["content"]} for m in history
                        if m["role"] in ("user", "assistant") and m["content"]]
            # The user's message is on disk before generation starts.
            user_msg = await self.db(self.store.add_message, sid, "user", user_text)
        if user_text is not None:
            messages.append({"role": "user", "content": user_text})
        system = system if system is not None else self.config.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        allowed_tools = self._tools_param(p)
        if allowed_tools:
            messages = self._with_tools(messages, allowed_tools)
        messages = self._alternate(messages)

        worker = await self.get_model(model_name, backend=param(p, "backend", str, None))
        sampling, max_tokens = self._sampling(p, worker.spec)  # checked above; now with the model's defaults
        spec = {**self._spec_settings(worker.key), **spec_request}
        rid = req.id
        conn = req.conn

        deltas = TextStream(conn, "chat.delta", {"id": rid})
        on_text = deltas.push

        def work(conversation):
            backend = worker.backend
            engine = self._speculative_engine(worker, spec)  # a bad setting fails here, before generating
            prompt = backend.tokenize(backend.apply_chat_template(conversation), special=True)
            return generate(backend, prompt, sampling, max_tokens=max_tokens, stop=stop, on_text=on_text,
                            cancel=req.cancel, started=started, ignore_eos=ignore_eos, speculative=engine)

        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        completion_tokens = 0
        while True:
            try:
                gen = await worker.run(work, messages)
            except ContextOverflowError as exc:
                raise RPCError(ErrorCode.CONTEXT_OVERFLOW, str(exc),
                               {"needed": exc.needed, "available": exc.available}) from None
            except speculative.DraftModelError as exc:
                raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc), {"draft_model": spec["draft_model"]}) from None
            except speculative.DrafterError as exc:
                raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
            finally:
                deltas.flush()  # every delta goes out before the tool calls or the final response
            texts.append(gen.text)
            completion_tokens += gen.stats.get("completion_tokens") or 0
            calls = tools.parse_calls(gen.text) if allowed_tools else []
            if not calls or gen.finish_reason == "cancelled" or len(tool_calls) >= tools.MAX_TOOL_ROUNDS:
                break
            # The model asked for skills: run them, hand back the results, let it go on.
            results = [await self._run_tool(call, allowed_tools, conn, rid) for call in calls]
            tool_calls.extend(results)
            messages = self._alternate(messages + [{"role": "assistant", "content": gen.text},
                                                   tools.response_message(results)])
        text = "".join(texts)
        stats = {**gen.stats, "backend": worker.backend.name, "model": worker.key,
                 "completion_tokens": completion_tokens}
        if tool_calls:
            stats["tool_calls"] = len(tool_calls)
        worker.record(stats)
        reply: dict[str, Any] = {"text": text, "finish_reason": gen.finish_reason, "stats": stats,
                                 "model": worker.key}
        if tool_calls:
            reply["tool_calls"] = tool_calls
        if sid is not None:
            status = "complete" if gen.finish_reason != "cancelled" else "cancelled"
            msg = await self.db(self.store.add_message, sid, "assistant", text, stats=stats, status=status)
            reply.update(session=sid, message_id=msg["id"], user_message_id=user_msg["id"] if user_msg else None)
        self.emit("chat.finished", {"session": sid, "model": worker.key, "finish_reason": gen.finish_reason,
                                    "completion_tokens": stats.get("completion_tokens"),
                                    "tokens_per_second": stats.get("tokens_per_second")})
        return reply

    # speculative decoding

    def _spec_settings(self, model: str) -> dict[str, Any]:
        """The config's speculative settings for a model alias (per-model over top-level)."""
        top = self.config.speculative
        out = {"drafter": top.drafter, "max_draft": top.max_draft, "draft_model": top.draft_model,
               "ngram_min": top.ngram_min, "ngram_max": top.ngram_max}
        entry = self.config.models.get(model)
        own = getattr(entry, "speculative", None)
        if own is not None:
            for key in ("drafter", "max_draft", "draft_model"):
                if getattr(own, key) is not None:
                    out[key] = getattr(own, key)
        return out

    def _check_speculative_config(self) -> None:
        """Unknown drafter names in the config stop the daemon (plugins have registered theirs by now)."""
        where = str(self.config.source) if self.config.source else "config"
        keys = [("speculative.drafter", self.config.speculative.drafter)]
        keys += [(f"models.{name}.speculative.drafter", m.speculative.drafter)
                 for name, m in self.config.models.items() if getattr(m, "speculative", None) is not None
                 and m.speculative.drafter is not None]
        for key, value in keys:
            try:
                speculative.check_name(value)
            except speculative.DrafterError as exc:
                raise DaemonError(f"{where}: {key}: {exc}") from None

    @staticmethod
    def _speculative_request(p: dict[str, Any]) -> dict[str, Any]:
        """The request's own speculative settings (``draft``, ``max_draft``, ``draft_model``), checked."""
        out: dict[str, Any] = {}
        if p.get("draft") is not None:
            name = param(p, "draft", str, None)
            try:
                out["drafter"] = speculative.check_name(name)
            except speculative.DrafterError as exc:
                raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter 'draft': {exc}") from None
        if p.get("max_draft") is not None:
            try:
                out["max_draft"] = speculative.check_max_draft(p["max_draft"])
            except speculative.DrafterError as exc:
                raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter 'max_draft': {exc}") from None
        if p.get("draft_model") is not None:
            out["draft_model"] = param(p, "draft_model", str, None, lambda v: bool(v), "a model alias or path")
        return out

    def _speculative_engine(self, worker: ModelWorker, spec: dict[str, Any]):
        """Build the request's engine on the model's thread (None for ``off``).
        Raises DrafterError / DraftModelError."""
        if spec["drafter"] == "off":
            return None
        ctx = speculative.DraftContext(
            target=worker.backend, max_draft=spec["max_draft"], ngram_min=spec["ngram_min"],
            ngram_max=spec["ngram_max"], draft_model=spec["draft_model"],
            load_model=lambda name: self._load_draft_model(worker, name))
        drafter = speculative.make_drafter(spec["drafter"], ctx)
        if drafter is None:
            return None
        return speculative.SpeculativeEngine(drafter, max_draft=spec["max_draft"])

    def _load_draft_model(self, worker: ModelWorker, name: str):
        """A draft model for ``worker``'s model, loaded once with the same backend
        class, context and threads (runs on the worker's thread)."""
        try:
            dspec = resolve_model(name, self.config).for_backend(worker.backend.name)
        except ModelLoadError as exc:
            raise speculative.DraftModelError(f"draft model {name!r}: {exc}") from None
        key = str(dspec.path)
        have = worker.companions.get(key)
        if have is not None:
            return have
        info = worker.backend.info
        instance = type(worker.backend)()
        try:
            instance.load(key, LoadOptions(n_ctx=info.context_length, n_threads=info.n_threads,
                                           chat_template=dspec.chat_template))
        except BackendError as exc:  # ModelLoadError and the rest
            raise speculative.DraftModelError(f"draft model {name!r}: {exc}") from None
        worker.companions[key] = instance
        log.info("loaded draft model %s for %s from %s", name, worker.key, key)
        return instance

    def _tools_param(self, p: dict[str, Any]) -> set[str]:
        """``tools: true`` offers every skill to the model; a list offers those named."""
        value = p.get("tools")
        if value in (None, False):
            return set()
        if value is True:
            return set(self.plugins.skills)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            unknown = [v for v in value if v not in self.plugins.skills]
            if unknown:
                raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter 'tools': no skill {unknown[0]!r}; known: "
                               f"{', '.join(sorted(self.plugins.skills)) or 'none'}")
            return set(value)
        raise RPCError(ErrorCode.INVALID_PARAMS, "parameter 'tools': expected true or a list of skill names")

    def _with_tools(self, messages: list[dict[str, str]], allowed: set[str]) -> list[dict[str, str]]:
        skills = [self.plugins.skills[n] for n in sorted(allowed)]
        base = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
        rest = messages[1:] if base is not None else messages
        return [{"role": "system", "content": tools.system_prompt(skills, base)}] + rest

    async def _run_tool(self, call: dict[str, Any], allowed: set[str], conn, rid) -> dict[str, Any]:
        if "error" in call:
            result: dict[str, Any] = {"error": call["error"]}
        elif call["name"] not in allowed:
            result = {"name": call["name"], "error": f"no tool {call['name']!r}"}
        else:
            args = call["arguments"] if isinstance(call["arguments"], dict) else {}
            try:
                result = {"name": call["name"], "result": await self.call_skill(call["name"], args)}
            except RPCError as exc:
                result = {"name": call["name"], "error": exc.message}
        conn.notify("chat.tool", {"id": rid, **({"arguments": call.get("arguments")} if "name" in call else {}),
                                  **result})
        return result

    # plugins, skills, events

    async def m_plugins_list(self, req: Request) -> dict[str, Any]:
        return {"plugins": self.plugins.list()}

    async def m_skills_list(self, req: Request) -> dict[str, Any]:
        return {"skills": [s.describe() for s in self.plugins.skills.values()]}

    async def m_skills_call(self, req: Request) -> dict[str, Any]:
        name = param(req.params, "name", str)
        arguments = param(req.params, "arguments", dict, {})
        return {"result": await self.call_skill(name, arguments)}

    async def call_skill(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run a plugin's skill; errors as RPCError (for automations and the model too)."""
        skill = self.plugins.skills.get(name)
        if skill is None:
            raise RPCError(ErrorCode.SKILL_NOT_FOUND, f"no skill {name!r}; known skills: "
                           f"{', '.join(sorted(self.plugins.skills)) or 'none'}")
        try:
            return await self.plugins.call_skill(name, arguments)
        except ValueError as exc:
            raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        except RPCError:
            raise
        except Exception as exc:  # noqa: BLE001
            log.exception("skill %s (plugin %s) failed", name, skill.plugin)
            raise RPCError(ErrorCode.SKILL_FAILED,
                           f"skill {name!r} (plugin {skill.plugin}) failed: {type(exc).__name__}: {exc}") from None

    async def m_events_subscribe(self, req: Request) -> dict[str, Any]:
        types = param(req.params, "types", list, ["*"], lambda v: all(isinstance(t, str) for t in v),
                      "a list of event type patterns")
        backlog = param(req.params, "backlog", int, 50, lambda v: v >= 0, "an integer >= 0")
        req.conn.subscriptions.update(types)
        recent = [e for e in self.events if any(fnmatch.fnmatchcase(e["type"], t) for t in types)]
        return {"subscribed": sorted(req.conn.subscriptions), "recent": recent[-backlog:] if backlog else []}

    async def m_events_unsubscribe(self, req: Request) -> dict[str, Any]:
        types = param(req.params, "types", list, None)
        if types is None:
            req.conn.subscriptions.clear()
        else:
            req.conn.subscriptions.difference_update(types)
        return {"subscribed": sorted(req.conn.subscriptions)}
