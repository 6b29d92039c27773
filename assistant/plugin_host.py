"""Finding, loading and calling plugins, each one isolated from the others.

Discovery, in this order:

1. the core plugin (``assistant.core_plugin``: the built-in backends and
   drafters), always loaded;
2. entry points in the group ``assistant.plugins`` (the built-in plugins in
   ``plugins/`` register this way, exactly like third-party ones);
3. single ``*.py`` files in the plugin dirs (config ``plugin_dirs``, env
   ``ASSISTANT_PLUGIN_DIR`` (``os.pathsep``-separated), default ``plugins/``
   under the user config dir).

``ASSISTANT_PLUGINS`` is an allow-list (comma-separated names; set but empty
means none, like llm's ``LLM_LOAD_PLUGINS``); ``--no-plugins`` loads none.
Either way, plugins that are not loaded are still listed, as "disabled".

Hooks that deal with the running daemon get the plugin's own
``assistant.plugin_api.PluginContext``, never the daemon: the daemon hands
its services to ``PluginHost.bind`` once, and the host builds one context
per plugin on first use and passes it to every hook that names
``context``. A hook still written to the old ``daemon`` argument fails the
plugin at load, with a message naming the new signature.

Isolation: a plugin that fails to import, fails pluggy's validation (an
unknown hook name, say) or raises in a hook is logged with its traceback and
marked failed, and is not called again; the rest go on. ``--trace-plugins``
(or ``ASSISTANT_TRACE_PLUGINS=1``) logs every hook call with its duration.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pluggy

from assistant import hookspecs, paths
from assistant.plugin_api import PluginContext, PluginServices

log = logging.getLogger("assistant.plugins")

ENTRY_POINT_GROUP = "assistant.plugins"
CORE = "core"


def run_in_thread(fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
    """Run a plugin's sync code in a daemon thread and await its result.

    Not the loop's default executor: a plugin that never returns would keep
    that executor, and so the daemon's exit, waiting forever.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            ok, value = False, exc
        else:
            ok = True
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=target, name=f"plugin-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return fut


class PluginError(Exception):
    """A plugin did something wrong; the message names the plugin."""


@dataclass
class PluginRecord:
    """What ``assistant plugins list`` shows about one plugin."""

    name: str
    source: str  # "core", "entry point (dist x.y)", "file: /path/x.py"
    version: str | None = None
    status: str = "loaded"  # loaded | failed | disabled
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    problems: list[str] = field(default_factory=list)  # refused registrations and the like

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source, "status": self.status,
                "hooks": self.hooks, "error": self.error, "problems": self.problems}


@dataclass
class Skill:
    """A function a plugin offers to the TUI, automations and the model."""

    name: str
    function: Callable[..., Any]
    description: str
    parameters: dict[str, Any]
    plugin: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "plugin": self.plugin}


def _validate_schema(schema: Any) -> None:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    if not isinstance(schema, dict):
        raise PluginError(f"parameters must be a JSON schema object, got {type(schema).__name__}")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        raise PluginError(f"parameters is not a valid JSON schema at {where}: {exc.message}") from None


def validate_arguments(skill: Skill, arguments: Any) -> None:
    """Check ``arguments`` against the skill's schema; ValueError names the field."""
    from jsonschema import Draft202012Validator

    if not isinstance(arguments, dict):
        raise ValueError(f"arguments of skill {skill.name!r} must be an object")
    errors = sorted(Draft202012Validator(skill.parameters).iter_errors(arguments), key=lambda e: list(e.path))
    if errors:
        err = errors[0]
        fld = ".".join(str(p) for p in err.path)
        if not fld and err.validator == "required":
            fld = err.message.split("'")[1] if "'" in err.message else ""
        where = f"argument {fld!r}" if fld else "arguments"
        raise ValueError(f"skill {skill.name!r}: {where}: {err.message}")


def allow_list_from_env() -> set[str] | None:
    """``ASSISTANT_PLUGINS``: None (unset) means all; an empty set means none."""
    raw = os.environ.get("ASSISTANT_PLUGINS")
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def plugin_dirs(config_dirs: list[str] | None = None) -> list[Path]:
    env = os.environ.get("ASSISTANT_PLUGIN_DIR")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    if config_dirs:
        return [Path(p).expanduser() for p in config_dirs]
    return [paths.config_dir() / "plugins"]


class PluginHost:
    """The pluggy manager plus what plugins registered, with isolation around every call."""

    def __init__(self, *, settings: dict[str, Any] | None = None, dirs: list[Path] | None = None,
                 allow: set[str] | None = None, enabled: bool = True, trace: bool | None = None):
        self.pm = pluggy.PluginManager("assistant")
        self.pm.add_hookspecs(hookspecs)
        self.settings = settings or {}
        self.dirs = dirs if dirs is not None else plugin_dirs()
        self.allow = allow
        self.enabled = enabled
        self.trace = trace if trace is not None else os.environ.get("ASSISTANT_TRACE_PLUGINS", "") not in ("", "0")
        self.records: dict[str, PluginRecord] = {}
        self.skills: dict[str, Skill] = {}
        self.methods: dict[str, tuple[Callable[..., Any], str, str]] = {}  # name -> (handler, plugin, description)
        self.backends: dict[str, Any] = {}
        self.drafters: dict[str, Any] = {}
        self._services: PluginServices | None = None
        self._contexts: dict[str, PluginContext] = {}

    # -- the plugins' contexts ------------------------------------------------------

    def bind(self, services: PluginServices) -> None:
        """Give the plugins' contexts the daemon's services (once, before ``startup``).
        An unbound host (the CLI's) still loads and collects; its contexts cannot
        reach a daemon."""
        if self._services is not None and self._services is not services:
            raise PluginError("this plugin host is already bound to another daemon")
        self._services = services

    def context(self, plugin: str) -> PluginContext:
        """The plugin's context, built on first use (one per plugin)."""
        ctx = self._contexts.get(plugin)
        if ctx is None:
            ctx = self._contexts[plugin] = PluginContext(plugin, self.settings.get(plugin) or {}, self._services)
        return ctx

    async def close_contexts(self) -> None:
        """Close every context's connection to the daemon (after the shutdown hooks)."""
        for ctx in self._contexts.values():
            try:
                await ctx.aclose()
            except Exception:  # noqa: BLE001 - the daemon is stopping anyway
                log.debug("closing the context of plugin %s failed", ctx.name, exc_info=True)

    # -- discovery ---------------------------------------------------------------

    def load(self) -> "PluginHost":
        from assistant import core_plugin

        self._register(CORE, core_plugin, PluginRecord(CORE, "core", version=_own_version()))
        for ep in _entry_points():
            dist = getattr(ep, "dist", None)
            version = dist.version if dist is not None else None
            where = f"entry point ({dist.name} {version})" if dist is not None else "entry point"
            record = PluginRecord(ep.name, where, version=version)
            if not self._wanted(ep.name, record):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the rest
                self._fail(record, f"failed to import: {type(exc).__name__}: {exc}", traceback.format_exc())
                continue
            self._register(ep.name, module, record)
        for folder in self.dirs:
            if not folder.is_dir():
                continue
            for file in sorted(folder.glob("*.py")):
                if file.name.startswith("_"):
                    continue
                record = PluginRecord(file.stem, f"file: {file}")
                if file.stem in self.records:
                    record.name = f"{file.stem} ({file})"
                    self._fail(record, f"a plugin named {file.stem!r} is already loaded from "
                                       f"{self.records[file.stem].source}")
                    continue
                if not self._wanted(file.stem, record):
                    continue
                try:
                    module = _import_file(file)
                except Exception as exc:  # noqa: BLE001
                    self._fail(record, f"failed to import: {type(exc).__name__}: {exc}", traceback.format_exc())
                    continue
                record.version = getattr(module, "__version__", None)
                self._register(file.stem, module, record)
        return self

    def _wanted(self, name: str, record: PluginRecord) -> bool:
        if not self.enabled:
            record.status, record.error = "disabled", "plugins are off (--no-plugins)"
        elif self.allow is not None and name not in self.allow:
            record.status, record.error = "disabled", "not in ASSISTANT_PLUGINS"
        else:
            return True
        self.records[name] = record
        return False

    def _register(self, name: str, module: Any, record: PluginRecord) -> None:
        self.records[name] = record
        old = _old_signature(module)
        if old is not None:
            self._fail(record, old)
            return
        try:
            self.pm.register(module, name=name)
            # check_pending catches hook functions whose names match no hook
            # (a misspelled ``register_skill``); checked per plugin so the
            # error names the right one.
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            if self.pm.is_registered(module):
                self.pm.unregister(module)
            self._fail(record, f"invalid plugin: {exc}")
            return
        except ValueError as exc:  # already registered under another name
            self._fail(record, str(exc))
            return
        record.hooks = sorted(impl_name for impl_name in dir(module)
                              if impl_name in _HOOK_NAMES and callable(getattr(module, impl_name)))

    def _fail(self, record: PluginRecord, error: str, tb: str | None = None) -> None:
        record.status, record.error, record.traceback = "failed", error, tb
        self.records[record.name] = record
        log.error("plugin %s: %s%s", record.name, error, f"\n{tb}" if tb else "")
        plugin = self.pm.get_plugin(record.name)
        if plugin is not None and record.name != CORE:
            self.pm.unregister(plugin)

    # -- calling hooks -------------------------------------------------------------

    def _impls(self, hook: str):
        return [impl for impl in getattr(self.pm.hook, hook).get_hookimpls()
                if self.records.get(impl.plugin_name, PluginRecord(impl.plugin_name, "?")).status == "loaded"]

    def _args(self, impl, kwargs: dict[str, Any]) -> list[Any]:
        values = {**kwargs, "settings": self.settings.get(impl.plugin_name) or {}}
        if "context" in impl.argnames:
            values["context"] = self.context(impl.plugin_name)
        return [values[a] for a in impl.argnames]

    def _hook_failed(self, impl, hook: str, exc: BaseException) -> None:
        record = self.records[impl.plugin_name]
        msg = f"raised in {hook}: {type(exc).__name__}: {exc}"
        if impl.plugin_name == CORE:
            log.error("core plugin %s", msg, exc_info=exc)
            return
        self._fail(record, msg, "".join(traceback.format_exception(exc)))

    def _traced(self, impl, hook: str, started: float) -> None:
        if self.trace:
            log.info("hook %s -> %s: %.2f ms", hook, impl.plugin_name, (time.perf_counter() - started) * 1000)

    def call(self, hook: str, **kwargs: Any) -> None:
        """Call a hook's implementations one by one, right here (registration hooks)."""
        for impl in self._impls(hook):
            started = time.perf_counter()
            try:
                result = impl.function(*self._args(impl, kwargs))
                if inspect.isawaitable(result):
                    raise PluginError(f"{hook} must not be async")
            except Exception as exc:  # noqa: BLE001
                self._hook_failed(impl, hook, exc)
            finally:
                self._traced(impl, hook, started)

    async def acall(self, hook: str, **kwargs: Any) -> None:
        """Call a hook's implementations concurrently without blocking the loop (sync
        ones in threads), so one slow plugin delays neither the daemon nor the others.

        Each implementation that names ``context`` gets its plugin's own. After
        ``shutdown``, the contexts' connections to the daemon are closed."""
        async def one(impl) -> None:
            started = time.perf_counter()
            try:
                if inspect.iscoroutinefunction(impl.function):
                    await impl.function(*self._args(impl, kwargs))
                else:
                    await run_in_thread(impl.function, *self._args(impl, kwargs))
            except Exception as exc:  # noqa: BLE001
                self._hook_failed(impl, hook, exc)
            finally:
                self._traced(impl, hook, started)

        try:
            await asyncio.gather(*(one(impl) for impl in self._impls(hook)))
        finally:
            if hook == "shutdown":
                await self.close_contexts()

    # -- registrations ----------------------------------------------------------------

    def collect(self, *, reserved_methods: set[str] = frozenset()) -> None:
        """Run the register_* hooks and keep what they register."""
        self._collect("register_backends", self._add_backend)
        self._collect("register_drafters", self._add_drafter)
        self._collect("register_skills", self._add_skill)
        self._reserved = set(reserved_methods)
        self._collect("register_methods", self._add_method)

    def _collect(self, hook: str, add: Callable[..., None]) -> None:
        for impl in self._impls(hook):
            plugin = impl.plugin_name

            def register(*args: Any, _plugin: str = plugin, **kw: Any) -> None:
                try:
                    add(_plugin, *args, **kw)
                except (PluginError, TypeError) as exc:
                    problem = f"{hook}: {exc}"
                    self.records[_plugin].problems.append(problem)
                    log.error("plugin %s: %s", _plugin, problem)

            started = time.perf_counter()
            try:
                impl.function(*self._args(impl, {"register": register}))
            except Exception as exc:  # noqa: BLE001
                self._hook_failed(impl, hook, exc)
            finally:
                self._traced(impl, hook, started)

    @staticmethod
    def _taken(kind: str, name: str, owner: str, plugin: str) -> PluginError:
        return PluginError(f"{kind} {name!r} is already registered by plugin {owner!r}; refused")

    def _add_skill(self, plugin: str, name: str, function: Callable[..., Any], description: str = "",
                   parameters: dict[str, Any] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"skill name must be a non-empty string, got {name!r}")
        if not callable(function):
            raise PluginError(f"skill {name!r}: function is not callable")
        if name in self.skills:
            raise self._taken("skill", name, self.skills[name].plugin, plugin)
        schema = parameters if parameters is not None else {"type": "object", "properties": {}}
        _validate_schema(schema)
        self.skills[name] = Skill(name, function, description or (inspect.getdoc(function) or ""), schema, plugin)

    def _add_method(self, plugin: str, name: str, handler: Callable[..., Any], description: str = "") -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"method name must be a non-empty string, got {name!r}")
        if name in self._reserved:
            raise PluginError(f"method {name!r} is a core method; refused")
        if name in self.methods:
            raise self._taken("method", name, self.methods[name][1], plugin)
        if not callable(handler):
            raise PluginError(f"method {name!r}: handler is not callable")
        self.methods[name] = (handler, plugin, description)

    def _add_backend(self, plugin: str, name: str, backend_class: Any) -> None:
        if name in self.backends:
            raise self._taken("backend", name, self.backends[name][1], plugin)
        self.backends[name] = (backend_class, plugin)

    def _add_drafter(self, plugin: str, name: str, factory: Any) -> None:
        if name in self.drafters:
            raise self._taken("drafter", name, self.drafters[name][1], plugin)
        self.drafters[name] = (factory, plugin)

    # -- skills ---------------------------------------------------------------------

    async def call_skill(self, name: str, arguments: dict[str, Any]) -> Any:
        """Validate and run a skill (sync skills in a thread). KeyError if unknown,
        ValueError for bad arguments; whatever the skill raises propagates."""
        skill = self.skills[name]
        validate_arguments(skill, arguments)
        if inspect.iscoroutinefunction(skill.function):
            return await skill.function(**arguments)
        return await run_in_thread(lambda: skill.function(**arguments))

    def list(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.records.values()]


_HOOK_NAMES = {name for name in dir(hookspecs) if not name.startswith("_")
               and hasattr(getattr(hookspecs, name), "assistant_spec")}


def _old_signature(module: Any) -> str | None:
    """The error for a hook written against the daemon (before PluginContext), or None."""
    for attr in dir(module):
        fn = getattr(module, attr, None)
        opts = getattr(fn, "assistant_impl", None) if callable(fn) else None
        if not isinstance(opts, dict):
            continue
        hook = opts.get("specname") or attr
        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            continue
        if hook in _HOOK_NAMES and "daemon" in params:
            new = ", ".join("context" if p == "daemon" else p for p in params)
            return (f"hook {hook}({', '.join(params)}) takes a `daemon` argument; since 0.2 hooks get a "
                    f"PluginContext: write {hook}({new}) (see docs/plugins.md)")
    return None


def _entry_points() -> list[metadata.EntryPoint]:
    seen: set[str] = set()
    out = []
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in seen:  # the same dist on sys.path twice
            seen.add(ep.name)
            out.append(ep)
    return out


def _import_file(file: Path) -> Any:
    module_name = f"assistant_plugin_{file.stem}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def _own_version() -> str:
    from assistant import __version__

    return __version__
