"""The automation engine: watches files, debounces, runs rules, traces runs.

One watchfiles watcher (inotify/FSEvents, in the daemon's event loop) covers
the roots of every enabled rule. A supervisor restarts it whenever the set of
existing roots changes, so a watched folder that is deleted and recreated is
watched again (and files already in it are picked up). Events are debounced
per (rule, file); each run goes through the rule's mode (single, queued,
restart, parallel) and cooldown, then its conditions and actions, and is
traced in SQLite from start to end.

Loops are impossible by construction: every file an action writes is
remembered with its size and mtime, and an event on such a file whose stat
still matches is ignored for that rule.

The engine sees nothing of the daemon but the plugin's ``PluginContext``:
events through ``context.emit``, runs and rule state in the plugin's own
tables (``history``, through ``context.migrate`` and ``context.db``), and
the actions' model and skill calls (``actions``).
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import conditions, history
from .actions import Actions
from .rules import EVENT_KINDS, Rule, load_rules

log = logging.getLogger("assistant.filewatch")

ROOT_POLL_S = 1.0  # how often the supervisor looks for roots that appeared or vanished
MAX_RESCAN_FILES = 10_000


@dataclass
class _Pending:
    rule: Rule
    path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    handle: asyncio.TimerHandle | None = None


class OutOfScope(ValueError):
    """A path a rule would never act on; the message says why (for ``automations.test``)."""


def scoped_path(rule: Rule, raw: str) -> Path:
    """The file ``raw`` as ``rule`` would see it from its watcher, or OutOfScope.

    ``raw`` is resolved first (``~``, ``..`` and every symlink), so neither a
    ``..`` nor a link inside a watched folder reaches a file outside it; it
    must then lie under one of the rule's trigger paths (resolved too) and
    pass its globs, ignores and ``recursive`` as a file event would. The
    result is named under the trigger path as written, as the watcher names
    its events."""
    # realpath, not Path.resolve: a loop of links is then a path that does not exist, not a RuntimeError
    target = Path(os.path.realpath(os.path.expanduser(raw)))
    if not target.exists():
        raise OutOfScope(f"parameter 'path': {_clipped(target)} does not exist")
    refused = None
    for root in rule.trigger.paths:
        real_root = Path(os.path.realpath(root))
        if target != real_root and real_root not in target.parents:
            continue
        seen = root if target == real_root else root / target.relative_to(real_root)
        if any(rule.matches(kind, seen) for kind in EVENT_KINDS):
            return seen
        refused = (f"parameter 'path': {_clipped(target)} is inside {root} but rule {rule.id!r} does not take it "
                   f"(globs {', '.join(rule.trigger.globs)}; ignore {', '.join(rule.trigger.ignore) or '-'}"
                   f"{'; not recursive' if not rule.trigger.recursive else ''})")
    raise OutOfScope(refused or f"parameter 'path': {_clipped(target)} is outside what rule {rule.id!r} watches "
                                f"({', '.join(str(r) for r in rule.trigger.paths)}); a test runs only on files "
                                "the rule could be triggered by")


def _clipped(path: Path, limit: int = 200) -> str:
    text = str(path)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class OwnOutputs:
    """The files each rule's actions wrote, with the stat they had: the loop guard."""

    def __init__(self) -> None:
        self._written: dict[str, dict[Path, tuple[int, int]]] = {}  # rule -> path -> (mtime_ns, size)

    def remember(self, rule: Rule, path: Path) -> None:
        """Called (from the writer's thread) right after ``rule`` wrote ``path``."""
        st = path.stat()
        self._written.setdefault(rule.id, {})[path] = (st.st_mtime_ns, st.st_size)

    def written_by(self, rule: Rule, path: Path, kind: str) -> bool:
        """Whether this event on ``path`` is ``rule``'s own write (unchanged since)."""
        written = self._written.get(rule.id, {}).get(path)
        if written is None or kind == "deleted":
            return False
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_size) == written


class Automations:
    """The engine inside the daemon. ``start()`` from the plugin's startup hook.

    ``context`` is the plugin's ``assistant.plugin_api.PluginContext``."""

    def __init__(self, context: Any, settings: dict[str, Any]):
        self.context = context
        self.settings = settings or {}
        self.allow_shell = bool(self.settings.get("allow_shell", False))
        self.outputs = OwnOutputs()
        self.actions = Actions(context, allow_shell=self.allow_shell, remember_output=self.outputs.remember)
        from assistant import paths

        self.rules: dict[str, Rule] = {}
        self.errors: list[str] = []
        self.problems: dict[str, str] = {}  # path -> why it is not watched
        self._default_rules_file = paths.config_dir() / "automations.yaml"
        self._pending: dict[tuple[str, Path], _Pending] = {}
        self._active: dict[str, set[asyncio.Task]] = {}
        self._queue: dict[str, list[_Pending]] = {}
        self._last_finished: dict[str, float] = {}
        self._watch_task: asyncio.Task | None = None
        self.counters = {"events": 0, "ignored_own_output": 0, "dropped_busy": 0, "runs": 0}

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        await self.context.migrate(history.MIGRATIONS)
        rules, self.errors = load_rules(self.settings, self._default_rules_file)
        for err in self.errors:
            log.error("%s", err)
            self.context.emit("automation.error", {"error": err})
        for rule in rules:
            override = await self.context.db(history.get_state, rule.id, "enabled")
            if override is not None:
                rule.enabled = bool(override)
            self.rules[rule.id] = rule
        log.info("filewatch: %d rule(s), %d enabled", len(rules), sum(r.enabled for r in rules))
        self._watch_task = asyncio.ensure_future(self._supervise())

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for p in self._pending.values():
            if p.handle:
                p.handle.cancel()
        tasks = [t for ts in self._active.values() for t in ts]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)

    # -- watching -----------------------------------------------------------------

    def _roots(self) -> list[Path]:
        wanted = sorted({p for r in self.rules.values() if r.enabled for p in r.trigger.paths})
        roots = []
        for p in wanted:
            if not p.exists():
                self._problem(p, None)  # missing is normal (it may come back); not a problem to report
                continue
            if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
                self._problem(p, f"permission denied: cannot read {p}")
                continue
            self._problem(p, None)
            roots.append(p)
        # A root inside another root is already covered (recursive watch).
        return [r for r in roots if not any(o != r and o in r.parents for o in roots)]

    def _problem(self, path: Path, why: str | None) -> None:
        key = str(path)
        if why is None:
            self.problems.pop(key, None)
        elif self.problems.get(key) != why:
            self.problems[key] = why
            log.warning("filewatch: %s", why)
            self.context.emit("automation.error", {"path": key, "error": why})

    async def _supervise(self) -> None:
        from watchfiles import awatch

        watched: list[Path] = []
        while True:
            roots = self._roots()
            appeared = [r for r in roots if r not in watched]
            if watched and appeared:
                # Files created between the folder's return and the new watch still count.
                self._rescan(appeared)
            watched = roots
            if not roots:
                await asyncio.sleep(ROOT_POLL_S)
                continue
            stop = asyncio.Event()
            monitor = asyncio.ensure_future(self._monitor(roots, stop))
            try:
                async for changes in awatch(*roots, stop_event=stop, debounce=50, step=20, recursive=True,
                                            watch_filter=None, raise_interrupt=False):
                    for change, raw in changes:
                        self._on_change(change.name, Path(raw))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a watcher error is reported, then retried
                log.warning("filewatch: watcher stopped: %s; restarting", exc)
                await asyncio.sleep(ROOT_POLL_S)
            finally:
                monitor.cancel()

    async def _monitor(self, roots: list[Path], stop: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(ROOT_POLL_S)
            if self._roots() != roots:
                stop.set()
                return

    def _rescan(self, roots: list[Path]) -> None:
        count = 0
        for root in roots:
            walker = os.walk(root) if root.is_dir() else [(str(root.parent), [], [root.name])]
            for folder, _dirs, files in walker:
                for name in files:
                    count += 1
                    if count > MAX_RESCAN_FILES:
                        return
                    self._on_change("added", Path(folder) / name)

    def _on_change(self, kind: str, path: Path) -> None:
        self.counters["events"] += 1
        for rule in self.rules.values():
            if not rule.enabled or not rule.matches(kind, path):
                continue
            if self.outputs.written_by(rule, path, kind):
                self.counters["ignored_own_output"] += 1
                continue
            self._debounce(rule, path, {"kind": kind, "path": str(path), "time": time.time()})

    # -- scheduling ------------------------------------------------------------------

    def _debounce(self, rule: Rule, path: Path, event: dict[str, Any]) -> None:
        key = (rule.id, path)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending(rule, path)
        elif pending.handle is not None:
            pending.handle.cancel()
        pending.events.append(event)
        loop = asyncio.get_running_loop()
        pending.handle = loop.call_later(rule.trigger.debounce, self._fire, key)

    def _fire(self, key: tuple[str, Path]) -> None:
        pending = self._pending.pop(key, None)
        if pending is None or not pending.rule.enabled:
            return
        self._dispatch(pending)

    def _dispatch(self, pending: _Pending) -> None:
        rule = pending.rule
        active = self._active.setdefault(rule.id, set())
        wait = rule.cooldown - (time.monotonic() - self._last_finished.get(rule.id, -1e9))
        if wait > 0 and not active:
            # Too soon after the last run: try again when the cooldown ends (events coalesce).
            again = self._pending.setdefault((rule.id, pending.path), pending)
            if again is not pending:
                again.events[:0] = pending.events
            again.handle = asyncio.get_running_loop().call_later(wait, self._fire, (rule.id, pending.path))
            return
        if rule.mode == "restart":
            for t in active:
                t.cancel()
            self._start(pending)
        elif rule.mode == "single":
            if active:
                self.counters["dropped_busy"] += 1
                log.debug("rule %s busy; dropped a trigger for %s", rule.id, pending.path)
                return
            self._start(pending)
        else:  # queued (one at a time) or parallel (up to max at once)
            limit = rule.max if rule.mode == "parallel" else 1
            if len(active) < limit:
                self._start(pending)
                return
            queue = self._queue.setdefault(rule.id, [])
            for q in queue:
                if q.path == pending.path:  # coalesce: one queued run per file
                    q.events.extend(pending.events)
                    return
            if rule.mode == "queued" and len(queue) >= rule.max:
                self.counters["dropped_busy"] += 1
                log.warning("rule %s: queue full (%d); dropped a trigger for %s", rule.id, rule.max, pending.path)
                return
            queue.append(pending)

    def _start(self, pending: _Pending) -> None:
        rule = pending.rule
        task = asyncio.ensure_future(self.run_rule(rule, pending.path, pending.events))
        self._active.setdefault(rule.id, set()).add(task)

        def done(t: asyncio.Task) -> None:
            self._active[rule.id].discard(t)
            self._last_finished[rule.id] = time.monotonic()
            queue = self._queue.get(rule.id)
            if queue and self.rules.get(rule.id) is rule and rule.enabled:
                self._dispatch(queue.pop(0))

        task.add_done_callback(done)

    # -- running a rule ------------------------------------------------------------------

    async def run_rule(self, rule: Rule, path: Path, events: list[dict[str, Any]], *,
                       dry_run: bool | None = None, manual: bool = False) -> dict[str, Any]:
        """Run ``rule`` on ``path`` now and return its trace (also stored and emitted)."""
        dry = rule.dry_run if dry_run is None else dry_run
        started = time.monotonic()
        trace: dict[str, Any] = {"path": str(path), "events": events, "dry_run": dry, "manual": manual,
                                 "conditions": [], "actions": [], "error": None}
        run_id = await self.context.db(history.add_run, rule.id, "running", trace)
        self.counters["runs"] += 1
        self.context.emit("automation.started", {"run": run_id, "rule": rule.id, "path": str(path)})
        status = "ok"
        try:
            trace["conditions"] = conditions.check(rule, path)
            if not all(c["ok"] for c in trace["conditions"]):
                status = "skipped"
            else:
                values = await self._values(rule, path, events)
                for action in rule.actions:
                    entry = await self.actions.run(rule, action, values, dry)
                    trace["actions"].append(entry)
                    if entry.get("error"):
                        status, trace["error"] = "error", entry["error"]
                        break
                if status == "ok":
                    if dry:
                        status = "dry_run"
                    elif values["_content_known"]:
                        await self.context.db(history.set_state, rule.id, f"content:{path}", values["content"])
        except asyncio.CancelledError:
            status, trace["error"] = "cancelled", "cancelled (a newer trigger in restart mode, or shutdown)"
            trace["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
            await asyncio.shield(self._finish(rule, run_id, path, status, trace))
            raise
        except Exception as exc:  # noqa: BLE001 - a failing run is traced, the watcher goes on
            log.exception("rule %s failed on %s", rule.id, path)
            status, trace["error"] = "error", f"{type(exc).__name__}: {exc}"
        trace["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        await self._finish(rule, run_id, path, status, trace)
        return {"id": run_id, "rule_id": rule.id, "status": status, **trace}

    async def _finish(self, rule: Rule, run_id: int, path: Path, status: str, trace: dict[str, Any]) -> None:
        await self.context.db(history.finish_run, run_id, status, trace)
        self.context.emit("automation.run", {"run": run_id, "rule": rule.id, "path": str(path), "status": status,
                                             "duration_ms": trace.get("duration_ms"), "error": trace["error"],
                                             "dry_run": trace["dry_run"]})

    async def _values(self, rule: Rule, path: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
        content, known, diff = "", False, ""
        if rule.uses_content():
            try:
                with open(path, "rb") as f:
                    content = f.read(rule.max_bytes).decode("utf-8", errors="replace")
                known = True
            except (FileNotFoundError, IsADirectoryError):
                pass
            except OSError as exc:
                raise RuntimeError(f"cannot read {path}: {exc.strerror or exc}") from None
            last = await self.context.db(history.get_state, rule.id, f"content:{path}", "")
            diff = "".join(difflib.unified_diff(last.splitlines(keepends=True), content.splitlines(keepends=True),
                                                fromfile=f"{path.name} (last run)", tofile=path.name))
            size = len(content.encode())
        else:
            # Not read (no template wants it): a binary medium's bytes stay out of memory and the database.
            try:
                size = path.stat().st_size
            except OSError:
                size = 0
        return {"path": str(path), "name": path.name, "stem": path.stem, "suffix": path.suffix,
                "dir": str(path.parent), "content": content, "diff": diff, "output": "",
                "event": events[-1]["kind"] if events else "manual", "rule": rule.id,
                "size": size, "_content_known": known}

    # -- queries for the protocol -------------------------------------------------------

    async def describe(self, rule: Rule) -> dict[str, Any]:
        runs = await self.runs(rule.id, 1)
        return {**rule.describe(), "last_run": runs[0] if runs else None}

    def get(self, rule_id: str) -> Rule:
        rule = self.rules.get(rule_id)
        if rule is None:
            raise KeyError(f"no automation rule {rule_id!r}; rules: {', '.join(sorted(self.rules)) or 'none'}")
        return rule

    async def set_enabled(self, rule_id: str, enabled: bool) -> Rule:
        rule = self.get(rule_id)
        rule.enabled = enabled
        await self.context.db(history.set_state, rule_id, "enabled", enabled)
        self.context.emit("automation.enabled" if enabled else "automation.disabled", {"rule": rule_id})
        return rule

    async def runs(self, rule_id: str | None, limit: int) -> list[dict[str, Any]]:
        """Recent runs, newest first, of one rule or of all."""
        return await self.context.db(history.runs, rule_id, limit)
