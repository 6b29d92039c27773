"""filewatch: background automations that let the model react to files changing.

A built-in plugin, loaded through the plugin system like any third-party one
(entry point ``filewatch`` in the ``assistant.plugins`` group), and it uses
nothing of the daemon but its ``PluginContext``. Rules live in
the plugin's settings (``plugins: {filewatch: {rules: [...]}}``) or in a
rules file; see docs/automations.md.

Protocol methods: ``automations.list``, ``automations.show {id}``,
``automations.log {id?, limit?}``, ``automations.test {id, path, dry_run?}`` (only on a
file the rule watches: see ``engine.scoped_path``),
``automations.enable {id}``, ``automations.disable {id}``.
CLI: ``assistant automations list|show|log|test|enable|disable``.
Events: ``automation.started``, ``automation.run``, ``automation.error``,
``automation.enabled``/``automation.disabled``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from assistant import hookimpl

from .engine import Automations, OutOfScope, scoped_path

__version__ = "1.0.0"

STARTUP_WAIT_S = 30.0  # how long a method called before the engine started waits for it
MAX_LIMIT = 10_000  # runs in one answer

_engine: Automations | None = None
_state = "stopped"  # "starting", "ready", "failed"


@hookimpl
async def startup(context, settings):
    global _engine, _state
    _state = "starting"
    _engine = Automations(context, settings)
    try:
        await _engine.start()
    except BaseException:
        _state = "failed"
        raise
    _state = "ready"


@hookimpl
async def shutdown():
    if _engine is not None:
        await _engine.stop()


async def _need() -> Automations:
    """The engine, once started. The daemon serves before the plugins' startup hooks
    have run, so a method called that early waits for the engine (bounded) rather
    than failing, or answering from rules not loaded yet."""
    from assistant.protocol import ErrorCode, RPCError

    deadline = time.monotonic() + STARTUP_WAIT_S
    while _state != "ready" and time.monotonic() < deadline:
        if _state == "failed":
            break
        await asyncio.sleep(0.05)
    if _state != "ready" or _engine is None:
        raise RPCError(ErrorCode.INTERNAL_ERROR, f"the filewatch engine is not running ({_state}; see the daemon's "
                                                 "log)")
    return _engine


def _invalid(message: str):
    from assistant.protocol import ErrorCode, RPCError

    return RPCError(ErrorCode.INVALID_PARAMS, message)


def _limit(params: dict[str, Any], default: int) -> int:
    """The ``limit`` parameter: how many runs, a positive integer (null or absent: ``default``)."""
    limit = params.get("limit")
    if limit is None:
        return default
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        shown = repr(limit) if len(repr(limit)) <= 80 else repr(limit)[:80] + "..."
        raise _invalid(f"parameter 'limit': expected an integer from 1 to {MAX_LIMIT}, got {shown}")
    return limit


async def _rule(params: dict[str, Any]):
    rid = params.get("id")
    if not isinstance(rid, str):
        raise _invalid("parameter 'id': expected the rule id (a string)")
    eng = await _need()
    try:
        return eng.get(rid)
    except KeyError as exc:
        raise _invalid(exc.args[0]) from None


async def _list(params):
    eng = await _need()
    return {"rules": [await eng.describe(r) for r in eng.rules.values()], "errors": eng.errors,
            "problems": eng.problems, "counters": eng.counters}


async def _show(params):
    limit = _limit(params, 10)
    rule = await _rule(params)
    return {**rule.describe(), "runs": await (await _need()).runs(rule.id, limit)}


async def _log(params):
    limit = _limit(params, 50)
    rid = params.get("id")
    if rid is not None:
        await _rule(params)
    return {"runs": await (await _need()).runs(rid, limit)}


async def _test(params):
    path = params.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise _invalid("parameter 'path': expected a file path")
    dry = params.get("dry_run")
    if dry is not None and not isinstance(dry, bool):
        raise _invalid(f"parameter 'dry_run': expected true or false, got {dry!r}"[:200])
    rule = await _rule(params)
    # Only a file the rule could be triggered by: a test must not write where the rule never would.
    try:
        target = scoped_path(rule, path)
    except OutOfScope as exc:
        raise _invalid(str(exc)) from None
    except OSError as exc:  # a name too long, say: no file the rule sees can have it
        raise _invalid(f"parameter 'path': not a usable path ({exc.strerror or type(exc).__name__})") from None
    eng = await _need()
    return await eng.run_rule(rule, target, [{"kind": "manual", "path": str(target)}], dry_run=dry, manual=True)


async def _enable(params):
    rule = await _rule(params)
    return (await (await _need()).set_enabled(rule.id, True)).describe()


async def _disable(params):
    rule = await _rule(params)
    return (await (await _need()).set_enabled(rule.id, False)).describe()


@hookimpl
def register_methods(register):
    register("automations.list", _list, "rules, their state and last run")
    register("automations.show", _show, "one rule and its recent runs")
    register("automations.log", _log, "recent runs, of one rule or all")
    register("automations.test", _test, "run a rule on a file now")
    register("automations.enable", _enable, "enable a rule (persists)")
    register("automations.disable", _disable, "disable a rule (persists)")


@hookimpl
def register_commands(cli):
    from .cli import add_commands

    add_commands(cli)
