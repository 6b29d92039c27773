"""filewatch: background automations that let the model react to files changing.

A built-in plugin, loaded through the plugin system like any third-party one
(entry point ``filewatch`` in the ``assistant.plugins`` group), and it uses
nothing of the daemon but its ``PluginContext``. Rules live in
the plugin's settings (``plugins: {filewatch: {rules: [...]}}``) or in a
rules file; see docs/automations.md.

Protocol methods: ``automations.list``, ``automations.show {id}``,
``automations.log {id?, limit?}``, ``automations.test {id, path, dry_run?}``,
``automations.enable {id}``, ``automations.disable {id}``.
CLI: ``assistant automations list|show|log|test|enable|disable``.
Events: ``automation.started``, ``automation.run``, ``automation.error``,
``automation.enabled``/``automation.disabled``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from assistant import hookimpl

from .engine import Automations

__version__ = "1.0.0"

_engine: Automations | None = None


@hookimpl
async def startup(context, settings):
    global _engine
    _engine = Automations(context, settings)
    await _engine.start()


@hookimpl
async def shutdown():
    if _engine is not None:
        await _engine.stop()


def _need() -> Automations:
    from assistant.protocol import ErrorCode, RPCError

    if _engine is None:
        raise RPCError(ErrorCode.INTERNAL_ERROR, "the filewatch engine has not started yet")
    return _engine


def _rule(params: dict[str, Any]):
    from assistant.protocol import ErrorCode, RPCError

    rid = params.get("id")
    if not isinstance(rid, str):
        raise RPCError(ErrorCode.INVALID_PARAMS, "parameter 'id': expected the rule id (a string)")
    try:
        return _need().get(rid)
    except KeyError as exc:
        raise RPCError(ErrorCode.INVALID_PARAMS, exc.args[0]) from None


async def _list(params):
    eng = _need()
    return {"rules": [await eng.describe(r) for r in eng.rules.values()], "errors": eng.errors,
            "problems": eng.problems, "counters": eng.counters}


async def _show(params):
    eng = _need()
    rule = _rule(params)
    runs = await eng.runs(rule.id, int(params.get("limit") or 10))
    return {**rule.describe(), "runs": runs}


async def _log(params):
    eng = _need()
    rid = params.get("id")
    if rid is not None:
        _rule(params)
    limit = params.get("limit") or 50
    return {"runs": await eng.runs(rid, int(limit))}


async def _test(params):
    from assistant.protocol import ErrorCode, RPCError

    eng = _need()
    rule = _rule(params)
    path = params.get("path")
    if not isinstance(path, str):
        raise RPCError(ErrorCode.INVALID_PARAMS, "parameter 'path': expected a file path")
    target = Path(path).expanduser().resolve()
    if not target.exists():
        raise RPCError(ErrorCode.INVALID_PARAMS, f"parameter 'path': {target} does not exist")
    dry = params.get("dry_run")
    return await eng.run_rule(rule, target, [{"kind": "manual", "path": str(target)}],
                              dry_run=bool(dry) if dry is not None else None, manual=True)


async def _enable(params):
    rule = _rule(params)
    return (await _need().set_enabled(rule.id, True)).describe()


async def _disable(params):
    rule = _rule(params)
    return (await _need().set_enabled(rule.id, False)).describe()


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
