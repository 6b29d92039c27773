"""A rule's actions: prompt (ask the model), skill, write, emit, shell.

Everything that reaches the daemon goes through the plugin's context:
``context.chat`` for prompts, ``context.call_skill``, ``context.emit``.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from .rules import Action, Rule

TRACE_TEXT_LIMIT = 4000  # characters of action input/output kept in a trace


def _clip(text: str) -> str:
    return text if len(text) <= TRACE_TEXT_LIMIT else text[:TRACE_TEXT_LIMIT] + f"... [{len(text)} chars]"


class ActionError(Exception):
    """An action failed in an expected way; the message is the whole story."""


class Actions:
    """Runs actions for the engine. ``remember_output(rule, path)`` is told of
    every file an action writes, so its own writes never trigger the rule."""

    def __init__(self, context: Any, *, allow_shell: bool, remember_output: Callable[[Rule, Path], None]):
        self.context = context
        self.allow_shell = allow_shell
        self._remember_output = remember_output

    async def run(self, rule: Rule, action: Action, values: dict[str, Any], dry: bool) -> dict[str, Any]:
        """Do one action (or, dry, only describe it) and return its trace entry;
        a failure is the entry's ``error``. ``values["output"]`` becomes its output."""
        started = time.monotonic()
        entry: dict[str, Any] = {"type": action.type, "input": None, "output": None, "error": None}
        try:
            handler = getattr(self, f"_do_{action.type}")
            entry["input"], work = handler(rule, action.options, values)
            if dry:
                entry["output"] = "(dry run: not done)"
            else:
                output, extra = await work()
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

        async def work():
            params = {"max_tokens": o["max_tokens"], "temperature": o["temperature"], "model": o.get("model")}
            if draft:
                params["draft"] = draft
            result = await self.context.chat(messages=messages, **params)
            return result["text"], {"stats": result.get("stats")}

        return prompt, work

    def _do_skill(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        args = {k: (v.format_map(values) if isinstance(v, str) else v) for k, v in o["arguments"].items()}

        async def work():
            from assistant.protocol import RPCError

            try:
                result = await self.context.call_skill(o["skill"], args)
            except RPCError as exc:
                raise ActionError(f"skill {o['skill']!r}: {exc.message}") from None
            if o.get("output"):
                return _field(result, o["output"], o["skill"]), {}
            return result, {}

        return {"skill": o["skill"], "arguments": args}, work

    def _do_write(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        target = Path(values["path"]) if o["in_place"] else Path(o["to"].format_map(values)).expanduser()
        backup = Path(o["backup"].format_map(values)).expanduser() if o.get("backup") else None

        async def work():
            content = o["content"].format_map(values)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, self._write_file, rule, target, content, backup if o["in_place"] else None)
            return str(target), {"bytes": len(content.encode())}

        return {"to": str(target), "backup": str(backup) if backup and o["in_place"] else None}, work

    def _write_file(self, rule: Rule, target: Path, content: str, backup: Path | None) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        if backup is not None and target.exists():
            data = target.read_bytes()
            _atomic_write(backup, data)
            self._remember_output(rule, backup)
        _atomic_write(target, content.encode())
        self._remember_output(rule, target)

    def _do_emit(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        message = o["message"].format_map(values)

        async def work():
            self.context.emit(o["type"], {"message": message, "rule": rule.id, "path": values["path"]})
            return message, {}

        return {"type": o["type"], "message": message}, work

    def _do_shell(self, rule: Rule, o: dict[str, Any], values: dict[str, Any]):
        quoted = {k: shlex.quote(str(v)) for k, v in values.items()}
        command = o["shell"].format_map(quoted)

        async def work():
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

        return command, work


def _field(result: Any, key: str, skill: str) -> Any:
    """``result[a][b]`` for the key "a.b" (a list index where the value is a list)."""
    value = result
    for part in key.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            have = f" (it has {', '.join(map(str, value))})" if isinstance(value, dict) else ""
            raise ActionError(f"skill {skill!r}: its result has no {key!r}{have}")
    return value


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.filewatch-tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
