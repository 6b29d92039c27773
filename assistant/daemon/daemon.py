"""The daemon: composes the parts in this package and runs them.

``Daemon.run()`` is what ``assistant serve`` runs. Its lifecycle:

1. take the per-socket lock (one daemon per user; a second one is refused),
   replacing a stale socket left by a killed daemon (``process``);
2. open the SQLite store, listen, and preload the default model;
3. on SIGTERM/SIGINT or ``shutdown``: cancel in-flight requests (they are
   answered, with ``finish_reason: "cancelled"``), unload models, close the
   database, remove the socket.

The parts: ``server`` (JSON-RPC over the socket), ``methods`` (the handlers,
by area), ``registry`` (models), ``events`` (the event bus), ``store``
(SQLite, on a thread of its own) and the plugin host. Plugins never see this
object: they get an ``assistant.plugin_api.PluginContext``, for which this
class provides the services (``emit``, ``call_skill``, ``socket_path``, ``db``,
``store``, ``data_dir``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

from assistant import __version__, paths
from assistant.config import Config, ConfigError, check_backends
from assistant.daemon import chat_settings, methods
from assistant.daemon.events import EventBus
from assistant.daemon.process import DaemonError, ProcessGuard
from assistant.daemon.registry import ModelRegistry
from assistant.daemon.server import Request, RPCServer
from assistant.daemon.store import Store, StoreError
from assistant.inference import speculative
from assistant.machine import hardware
from assistant.machine.choice import backend_registry
from assistant.machine.profiles import apply_profile
from assistant.plugin_host import PluginHost, allow_list_from_env, plugin_dirs, run_in_thread
from assistant.protocol import ErrorCode, RPCError

log = logging.getLogger("assistant.daemon")

VERSION = __version__


class Daemon:
    def __init__(self, config: Config, *, socket_path: Path | None = None, db_path: Path | None = None,
                 plugins: PluginHost | None = None):
        self.machine = hardware.probe()
        self.socket_path = socket_path or paths.socket_path()
        self.db_path = db_path or paths.database_path()
        self.started = time.time()
        self.server = RPCServer(max_line_bytes=config.max_line_bytes, send_stall_timeout=config.send_stall_timeout)
        self.process = ProcessGuard(self.socket_path)
        self.store: Store | None = None
        self.http = None  # the HTTP API (assistant.daemon.http.HttpService) when http.listen is set
        # SQLite is blocking I/O: it gets a thread of its own, in order.
        self._db = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        if plugins is None:
            plugins = PluginHost(settings=config.plugins, dirs=plugin_dirs(config.plugin_dirs),
                                 allow=allow_list_from_env()).load()
        self.plugins = plugins
        self.plugins.bind(self)
        self.events = EventBus(self.server, lambda event: self._spawn(self.plugins.acall("on_event", event=event)))
        methods.install(self)
        self._collect_plugins()
        # Backend names are known once plugins registered theirs: the config as read is checked
        # against them (so errors name its own keys and lines), then the first profile (config
        # `profiles:`) that matches this machine sets backend, model, threads, context.
        self.config, self.profile, self._config_error = config, None, self._config_problem(config)
        if self._config_error is None:
            self.config, self.profile = apply_profile(config, self.machine, known_backends=self.backends.names())
        self.models = ModelRegistry(self.config, self.machine, self.backends, self.emit,
                                    drafting_on=lambda name: chat_settings.configured(self.config, name).drafter
                                    != "off")
        # Verify-cost calibrations are kept on disk, keyed by model file and this machine.
        self.calibration = speculative.CalibrationStore.in_cache(paths.cache_dir(), platform_tag=self.machine.platform_tag,
                                                                 cpu_model=self.machine.cpu_model)

    # -- plugins ------------------------------------------------------------------

    def _collect_plugins(self) -> None:
        """Run the plugins' register_* hooks; fill the backend and drafter registries and the methods."""
        self.plugins.collect(reserved_methods=set(methods.CORE_METHODS))
        self.backends = backend_registry(self.plugins)
        self.drafters = speculative.DrafterRegistry()
        for name, (factory, plugin) in self.plugins.drafters.items():
            try:
                self.drafters.register(name, factory)
            except speculative.DrafterError as exc:
                log.error("plugin %s: %s", plugin, exc)
        for name, (handler, plugin, _desc) in self.plugins.methods.items():
            self.server.method(name, _plugin_method(name, handler, plugin))

    def emit(self, type_: str, data: dict[str, Any] | None = None, *, source: str = "daemon") -> dict[str, Any]:
        """Publish an event (see ``events.EventBus.emit``); callable from any thread."""
        return self.events.emit(type_, data, source=source)

    async def call_skill(self, name: str, arguments: dict[str, Any]) -> Any:
        """Run a plugin's skill; errors as RPCError (for clients, automations and the model's tool calls)."""
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

    @property
    def data_dir(self) -> Path:
        """The directory that holds the database (plugins get private folders under it)."""
        return self.db_path.parent

    async def db(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a store call on the database thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db, lambda: fn(*args, **kwargs))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- lifecycle -----------------------------------------------------------------

    def _config_problem(self, config: Config) -> str | None:
        """Names only known once plugins registered (drafters, backends): a bad one stops the daemon at start."""
        where = str(config.source) if config.source else "config"
        errors = chat_settings.config_errors(config, self.drafters)
        if errors:
            return f"{where}: {errors[0]}"
        try:
            check_backends(config, self.backends.names())
        except ConfigError as exc:
            return str(exc)
        return None

    async def start(self) -> None:
        if self._config_error is not None:
            raise DaemonError(self._config_error)
        self.http = self._http_service()  # checked before anything is taken: a bad bind refuses the start
        self.process.acquire()
        try:
            self.store = await self.db(Store, self.db_path)
        except StoreError as exc:
            raise DaemonError(str(exc)) from exc
        await self.server.listen(str(self.socket_path))
        if self.http is not None:
            try:
                await self.http.start()
            except DaemonError:
                await self.server.close()
                await self.db(self.store.close)
                self.process.release()
                raise
        log.info("daemon %s listening on %s (pid %d)", VERSION, self.socket_path, os.getpid())
        failed = [r.name for r in self.plugins.records.values() if r.status == "failed"]
        loaded = [r.name for r in self.plugins.records.values() if r.status == "loaded"]
        log.info("plugins: %s%s", ", ".join(loaded) or "none",
                 f"; failed: {', '.join(failed)}" if failed else "")
        if self.config.preload:
            self._spawn(self._preload())
        # Startup hooks run in the background: a slow plugin never delays serving.
        self._spawn(self._startup_plugins())

    def _http_service(self):
        """The HTTP API (``http.listen``; ``serve --http`` sets it for one run), or None when off."""
        if not self.config.http.listen:
            return None
        from assistant.daemon.http import HttpService  # aiohttp is imported only where the API is on

        return HttpService(self, self.config.http.listen)

    async def _startup_plugins(self) -> None:
        await self.plugins.acall("startup")
        self.emit("daemon.started", {"pid": os.getpid(), "socket": str(self.socket_path)})

    async def _preload(self) -> None:
        try:
            await self.models.get(self.config.model)
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
            await asyncio.wait_for(self.plugins.acall("shutdown"), 10)
        except asyncio.TimeoutError:
            log.warning("plugin shutdown hooks took over 10 s; going on")
        if self.http is not None:
            await self.http.stop()  # its requests are cancelled and answered first, as the socket's are below
        await self.server.drain_and_close()
        await self.models.unload_all()
        if self.store is not None:
            await self.db(self.store.close)
        self._db.shutdown(wait=True)
        self.process.release()
        log.info("stopped")


def _plugin_method(name: str, handler: Callable[..., Any], plugin: str):
    """A plugin's method as a server handler: its params dict in, its result out; a bug is an error reply."""
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
