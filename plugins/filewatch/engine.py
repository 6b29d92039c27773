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
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import difflib
import fnmatch
import logging
import mimetypes
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .rules import DAYS, Action, Rule, load_rules

log = logging.getLogger("assistant.filewatch")

ROOT_POLL_S = 1.0  # how often the supervisor looks for roots that appeared or vanished
TRACE_TEXT_LIMIT = 4000  # characters of action input/output kept in a trace
MAX_RESCAN_FILES = 10_000


def _clip(text: str) -> str:
    return text if len(text) <= TRACE_TEXT_LIMIT else text[:TRACE_TEXT_LIMIT] + f"... [{len(text)} chars]"


@dataclass
class _Pending:
    rule: Rule
    path: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    handle: asyncio.TimerHandle | None = None


class Automations:
    """The engine inside the daemon. ``start()`` from the plugin's startup hook."""

    def __init__(self, daemon: Any, settings: dict[str, Any]):
        self.daemon = daemon
        self.settings = settings or {}
        self.allow_shell = bool(self.settings.get("allow_shell", False))
        from assistant import paths

        self.rules: dict[str, Rule] = {}
        self.errors: list[str] = []
        self.problems: dict[str, str] = {}  # path -> why it is not watched
        self._default_rules_file = paths.config_dir() / "automations.yaml"
        self._pending: dict[tuple[str, Path], _Pending] = {}
        self._active: dict[str, set[asyncio.Task]] = {}
        self._queue: dict[str, list[_Pending]] = {}
        self._last_finished: dict[str, float] = {}
        self._outputs: dict[str, dict[Path, tuple[int, int]]] = {}  # rule -> path -> (mtime_ns, size)
        self._watch_task: asyncio.Task | None = None
        self._client = None
        self._client_lock = asyncio.Lock()
        self.counters = {"events": 0, "ignored_own_output": 0, "dropped_busy": 0, "runs": 0}

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        rules, self.errors = load_rules(self.settings, self._default_rules_file)
        for err in self.errors:
            log.error("%s", err)
            self.daemon.emit("automation.error", {"error": err}, source="filewatch")
        for rule in rules:
            override = await self.daemon.db(self.daemon.store.get_state, rule.id, "enabled")
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
        if self._client is not None:
            await self._client.close()

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
            self.daemon.emit("automation.error", {"path": key, "error": why}, source="filewatch")

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
            if self._is_own_output(rule, path, kind):
                self.counters["ignored_own_output"] += 1
                continue
            self._debounce(rule, path, {"kind": kind, "path": str(path), "time": time.time()})

    def _is_own_output(self, rule: Rule, path: Path, kind: str) -> bool:
        written = self._outputs.get(rule.id, {}).get(path)
        if written is None:
            return False
        if kind == "deleted":
            return False
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_size) == written

    def _remember_output(self, rule: Rule, path: Path) -> None:
        st = path.stat()
        self._outputs.setdefault(rule.id, {})[path] = (st.st_mtime_ns, st.st_size)

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
        store = self.daemon.store
        run_id = await self.daemon.db(store.add_run, rule.id, "running", trace)
        self.counters["runs"] += 1
        self.daemon.emit("automation.started", {"run": run_id, "rule": rule.id, "path": str(path)},
                         source="filewatch")
        status = "ok"
        try:
            trace["conditions"] = self._conditions(rule, path)
            if not all(c["ok"] for c in trace["conditions"]):
                status = "skipped"
            else:
                values = await self._values(rule, path, events)
                for action in rule.actions:
                    entry = await self._act(rule, action, values, dry)
                    trace["actions"].append(entry)
                    if entry.get("error"):
                        status, trace["error"] = "error", entry["error"]
                        break
                if status == "ok":
                    if dry:
                        status = "dry_run"
                    elif values["_content_known"]:
                        await self.daemon.db(store.set_state, rule.id, f"content:{path}", values["content"])
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
        await self.daemon.db(self.daemon.store.finish_run, run_id, status, trace)
        self.daemon.emit("automation.run", {"run": run_id, "rule": rule.id, "path": str(path), "status": status,
                                            "duration_ms": trace.get("duration_ms"), "error": trace["error"],
                                            "dry_run": trace["dry_run"]}, source="filewatch")

    def _conditions(self, rule: Rule, path: Path) -> list[dict[str, Any]]:
        c = rule.conditions
        out: list[dict[str, Any]] = []
        size = None
        try:
            size = path.stat().st_size
        except OSError:
            pass
        if c.min_size is not None or c.max_size is not None:
            if size is None:
                out.append({"condition": "size", "ok": False, "detail": "the file is gone"})
            else:
                ok = (c.min_size is None or size >= c.min_size) and (c.max_size is None or size <= c.max_size)
                out.append({"condition": "size", "ok": ok,
                            "detail": f"{size} bytes (allowed {c.min_size or 0}..{c.max_size or 'any'})"})
        if c.extensions:
            ok = path.suffix.lower() in {e.lower() for e in c.extensions}
            out.append({"condition": "extensions", "ok": ok, "detail": f"{path.suffix or '(none)'} in {c.extensions}"})
        if c.mime_types:
            mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            ok = any(fnmatch.fnmatch(mime, m) for m in c.mime_types)
            out.append({"condition": "mime_types", "ok": ok, "detail": f"{mime} in {c.mime_types}"})
        if c.time_window:
            now = _dt.datetime.now()
            start = _dt.datetime.strptime(str(c.time_window.get("start", "00:00")), "%H:%M").time()
            end = _dt.datetime.strptime(str(c.time_window.get("end", "23:59")), "%H:%M").time()
            days = c.time_window.get("days") or list(DAYS)
            t = now.time()
            in_time = start <= t <= end if start <= end else (t >= start or t <= end)  # windows may wrap midnight
            ok = in_time and DAYS[now.weekday()] in days
            out.append({"condition": "time_window", "ok": ok,
                        "detail": f"{now:%a %H:%M} in {start:%H:%M}-{end:%H:%M} {','.join(days)}"})
        return out

    async def _values(self, rule: Rule, path: Path, events: list[dict[str, Any]]) -> dict[str, Any]:
        content, known = "", False
        try:
            with open(path, "rb") as f:
                content = f.read(rule.max_bytes).decode("utf-8", errors="replace")
            known = True
        except (FileNotFoundError, IsADirectoryError):
            pass
        except OSError as exc:
            raise RuntimeError(f"cannot read {path}: {exc.strerror or exc}") from None
        last = await self.daemon.db(self.daemon.store.get_state, rule.id, f"content:{path}", "")
        diff = "".join(difflib.unified_diff(last.splitlines(keepends=True), content.splitlines(keepends=True),
                                            fromfile=f"{path.name} (last run)", tofile=path.name))
        return {"path": str(path), "name": path.name, "stem": path.stem, "suffix": path.suffix,
                "dir": str(path.parent), "content": content, "diff": diff, "output": "",
                "event": events[-1]["kind"] if events else "manual", "rule": rule.id,
                "size": len(content.encode()), "_content_known": known}

    async def _act(self, rule: Rule, action: Action, values: dict[str, Any], dry: bool) -> dict[str, Any]:
        started = time.monotonic()
        entry: dict[str, Any] = {"type": action.type, "input": None, "output": None, "error": None}
        try:
            handler = getattr(self, f"_do_{action.type}")
            entry["input"], run = handler(rule, action.options, values)
            if dry:
                entry["output"] = "(dry run: not done)"
            else:
                output, extra = await run()
                entry["output"] = _clip(output) if isinstance(output, str) else output
                entry.update(extra)
                values["output"] = output if isinstance(output, str) else str(output)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - recorded in the trace
            entry["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ActionError) else str(exc)
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        if isinstance(entry["input"], str):
            entry["input"] = _clip(entry["input"])
        return entry

    # Each _do_* returns (input for the trace, coroutine factory doing the work).

    def _do_prompt(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        prompt = o["prompt"].format_map(values)
        messages = ([{"role": "system", "content": o["system"].format_map(values)}] if o.get("system") else [])
        messages.append({"role": "user", "content": prompt})
        # Rewriting a file copies most of its input: prompt lookup pays off there.
        rewrites = any(a.type == "write" and a.options.get("in_place") for a in rule.actions)
        draft = o.get("draft") or ("ngram" if rewrites else None)

        async def run():
            client = await self._chat_client()
            params = {"messages": messages, "max_tokens": o["max_tokens"], "temperature": o["temperature"],
                      "model": o.get("model")}
            if draft:
                params["draft"] = draft
            stream = await client.chat(**params)
            try:
                result = await stream.result()
            except asyncio.CancelledError:
                await asyncio.shield(stream.cancel())
                raise
            return result["text"], {"stats": result.get("stats")}

        return prompt, run

    def _do_skill(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        args = {k: (v.format_map(values) if isinstance(v, str) else v) for k, v in o["arguments"].items()}

        async def run():
            from assistant.protocol import RPCError

            try:
                return await self.daemon.call_skill(o["skill"], args), {}
            except RPCError as exc:
                raise ActionError(f"skill {o['skill']!r}: {exc.message}") from None

        return {"skill": o["skill"], "arguments": args}, run

    def _do_write(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        target = Path(values["path"]) if o["in_place"] else Path(o["to"].format_map(values)).expanduser()
        backup = Path(o["backup"].format_map(values)).expanduser() if o.get("backup") else None

        async def run():
            content = o["content"].format_map(values)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._write_file, rule, target, content, backup if o["in_place"] else None)
            return str(target), {"bytes": len(content.encode())}

        return {"to": str(target), "backup": str(backup) if backup and o["in_place"] else None}, run

    def _write_file(self, rule: Rule, target: Path, content: str, backup: Path | None) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if backup is not None and target.exists():
            data = target.read_bytes()
            self._atomic_write(backup, data)
            self._remember_output(rule, backup)
        self._atomic_write(target, content.encode())
        self._remember_output(rule, target)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.filewatch-tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def _do_emit(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        message = o["message"].format_map(values)

        async def run():
            self.daemon.emit(o["type"], {"message": message, "rule": rule.id, "path": values["path"]},
                             source="filewatch")
            return message, {}

        return {"type": o["type"], "message": message}, run

    def _do_shell(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        quoted = {k: shlex.quote(str(v)) for k, v in values.items()}
        command = o["shell"].format_map(quoted)

        async def run():
            if not (self.allow_shell and rule.allow_shell):
                raise ActionError("shell actions are off: they need `allow_shell: true` both on the rule and in "
                                  "the plugin settings (plugins.filewatch.allow_shell)")
            proc = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE,
                                                         stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), o["timeout"])
            except asyncio.TimeoutError:
                proc.kill()
                raise ActionError(f"shell command timed out after {o['timeout']} s") from None
            if proc.returncode != 0:
                raise ActionError(f"shell command exited with {proc.returncode}: "
                                  f"{err.decode(errors='replace')[-500:].strip()}")
            return out.decode(errors="replace"), {"exit_code": 0}

        return command, run

    async def _chat_client(self):
        """A client of the daemon's own socket: automations use the public protocol."""
        from assistant.client import Client

        async with self._client_lock:
            if self._client is None or self._client.closed.is_set():
                self._client = await Client.connect(self.daemon.socket_path, client_name="filewatch")
            return self._client

    # -- queries for the protocol -------------------------------------------------------

    async def describe(self, rule: Rule) -> dict[str, Any]:
        runs = await self.daemon.db(self.daemon.store.runs, rule.id, 1)
        return {**rule.describe(), "last_run": runs[0] if runs else None}

    def get(self, rule_id: str) -> Rule:
        rule = self.rules.get(rule_id)
        if rule is None:
            raise KeyError(f"no automation rule {rule_id!r}; rules: {', '.join(sorted(self.rules)) or 'none'}")
        return rule

    async def set_enabled(self, rule_id: str, enabled: bool) -> Rule:
        rule = self.get(rule_id)
        rule.enabled = enabled
        await self.daemon.db(self.daemon.store.set_state, rule_id, "enabled", enabled)
        self.daemon.emit("automation.enabled" if enabled else "automation.disabled", {"rule": rule_id},
                         source="filewatch")
        return rule


class ActionError(Exception):
    """An action failed in an expected way; the message is the whole story."""
