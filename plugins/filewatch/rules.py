"""Automation rules: what to watch, when to act, what to do.

Rules come from the plugin's settings (``plugins: {filewatch: {rules: [...]}}``
in the config) and from an optional rules file (``rules_file``, default
``automations.yaml`` in the config dir when it exists). A rule that does not
validate is reported with its id and the offending key, and left out; the
other rules run.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EVENT_KINDS = ("added", "modified", "deleted")
MODES = ("single", "queued", "restart", "parallel")
ACTION_TYPES = ("prompt", "skill", "write", "emit", "shell")
# Placeholders a template may use.
TEMPLATE_VARS = {"path", "name", "stem", "suffix", "dir", "content", "diff", "output", "event", "rule", "size"}
# Editors' and tools' scratch files never trigger a rule.
DEFAULT_IGNORES = ("*.swp", "*.swx", "*~", ".#*", "#*#", "*.tmp", ".~lock.*", "*.part", ".*.filewatch-tmp")
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class RuleError(ValueError):
    """A rule that does not validate; the message names the rule and the key."""


@dataclass
class Trigger:
    paths: list[Path]
    globs: list[str] = field(default_factory=lambda: ["*"])
    ignore: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=lambda: ["added", "modified"])
    debounce: float = 0.5
    recursive: bool = True


@dataclass
class Conditions:
    min_size: int | None = None
    max_size: int | None = None
    extensions: list[str] = field(default_factory=list)
    mime_types: list[str] = field(default_factory=list)
    time_window: dict[str, Any] | None = None  # {start: "HH:MM", end: "HH:MM", days: [mon, ...]}


@dataclass
class Action:
    type: str
    options: dict[str, Any]


@dataclass
class Rule:
    id: str
    trigger: Trigger
    actions: list[Action]
    conditions: Conditions = field(default_factory=Conditions)
    enabled: bool = True
    mode: str = "queued"
    max: int = 4
    cooldown: float = 0.0
    dry_run: bool = False
    allow_shell: bool = False
    max_bytes: int = 1_000_000  # content read into templates
    source: str = ""

    def uses_content(self) -> bool:
        """Does any action's template use ``{content}`` or ``{diff}``? Only then is the file
        read as text (and its content kept for the next ``{diff}``): a rule over images or
        recordings has no use for a megabyte of their bytes decoded as UTF-8."""
        for action in self.actions:
            o = action.options
            texts = [o.get(k) for k in _TEMPLATE_OPTIONS] + list((o.get("arguments") or {}).values())
            for text in texts:
                if isinstance(text, str) and template_fields(text) & {"content", "diff"}:
                    return True
        return False

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id, "enabled": self.enabled, "mode": self.mode, "max": self.max, "cooldown": self.cooldown,
            "dry_run": self.dry_run, "allow_shell": self.allow_shell, "source": self.source,
            "trigger": {"paths": [str(p) for p in self.trigger.paths], "globs": self.trigger.globs,
                        "ignore": self.trigger.ignore, "events": self.trigger.events,
                        "debounce": self.trigger.debounce, "recursive": self.trigger.recursive},
            "conditions": {k: v for k, v in vars(self.conditions).items() if v not in (None, [], {})},
            "actions": [{"type": a.type, **a.options} for a in self.actions],
        }

    # -- matching --------------------------------------------------------------

    def root_of(self, path: Path) -> Path | None:
        for root in self.trigger.paths:
            if path == root or root in path.parents:
                return root
        return None

    def matches(self, kind: str, path: Path) -> bool:
        """Does a file event trigger this rule (before conditions)?"""
        if kind not in self.trigger.events:
            return False
        root = self.root_of(path)
        if root is None:
            return False
        if not self.trigger.recursive and path != root and path.parent != root:
            return False
        rel = path.name if path == root else str(path.relative_to(root))
        if any(_glob(pattern, path.name, rel) for pattern in (*DEFAULT_IGNORES, *self.trigger.ignore)):
            return False
        return any(_glob(pattern, path.name, rel) for pattern in self.trigger.globs)


def _glob(pattern: str, name: str, rel: str) -> bool:
    # A pattern with a slash matches the path below the watched folder; one
    # without matches the file name, at any depth (like .gitignore).
    return fnmatch.fnmatch(rel if "/" in pattern else name, pattern)


# -- parsing -----------------------------------------------------------------------


class _Ctx:
    def __init__(self, rule_id: str, where: str):
        self.rule_id, self.where = rule_id, where

    def error(self, key: str, detail: str) -> RuleError:
        return RuleError(f"automation rule {self.rule_id!r} ({self.where}): {key}: {detail}")


def _take(d: dict[str, Any], key: str, types: tuple[type, ...], default: Any, ctx: _Ctx, prefix: str = "",
          check=None, expected: str = "") -> Any:
    if key not in d or d[key] is None:
        return default
    value = d[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and check is not None:
        ok = check(value)
    if not ok:
        want = expected or " or ".join(t.__name__ for t in types)
        raise ctx.error(prefix + key, f"expected {want}, got {value!r}")
    return value


def _strings(d: dict[str, Any], key: str, default: list[str], ctx: _Ctx, prefix: str = "") -> list[str]:
    value = d.get(key, default)
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ctx.error(prefix + key, f"expected a string or a list of strings, got {value!r}")
    return list(value)


def _unknown(d: dict[str, Any], known: set[str], ctx: _Ctx, prefix: str = "") -> None:
    for key in d:
        if key not in known:
            import difflib

            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ctx.error(prefix + str(key), f"unknown key (known: {', '.join(sorted(known))}){hint}")


# The options of actions that are templates (the arguments of a skill action are too).
_TEMPLATE_OPTIONS = ("prompt", "system", "to", "backup", "content", "message", "shell")


def template_fields(text: str) -> set[str]:
    """The placeholders a (checked) template uses, by their root name: "{output[0]}" is "output"."""
    return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(text) if f}


def check_template(text: str, ctx: _Ctx, key: str) -> str:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as exc:
        raise ctx.error(key, f"bad template: {exc} (write {{{{ and }}}} for literal braces)") from None
    bad = sorted(n for n in names if n.split(".")[0].split("[")[0] not in TEMPLATE_VARS)
    if bad:
        raise ctx.error(key, f"unknown placeholder {{{bad[0]}}}; available: "
                             f"{', '.join('{' + v + '}' for v in sorted(TEMPLATE_VARS))}")
    return text


def _hhmm(value: Any, ctx: _Ctx, key: str) -> _dt.time:
    try:
        return _dt.datetime.strptime(str(value), "%H:%M").time()
    except ValueError:
        raise ctx.error(key, f"expected a time as HH:MM, got {value!r}") from None


def parse_rule(data: Any, where: str, base_dir: Path | None = None) -> Rule:
    """One rule from its YAML mapping; RuleError names the rule and the key."""
    if not isinstance(data, dict):
        raise RuleError(f"automation rule at {where}: expected a mapping, got {data!r}")
    rid = data.get("id")
    if not isinstance(rid, str) or not rid.strip():
        raise RuleError(f"automation rule at {where}: id: expected a non-empty string, got {rid!r}")
    ctx = _Ctx(rid, where)
    _unknown(data, {"id", "enabled", "trigger", "conditions", "actions", "mode", "max", "cooldown", "dry_run",
                    "allow_shell", "max_bytes", "description"}, ctx)
    # The sections are checked in this order, so the first error reported
    # for a rule with several is always the same one.
    trigger = _parse_trigger(data.get("trigger"), ctx, base_dir)
    conditions = _parse_conditions(data.get("conditions") or {}, ctx)
    actions = _parse_actions(data.get("actions"), ctx)
    rule = Rule(id=rid, trigger=trigger, actions=actions, conditions=conditions, source=where,
                **_parse_run_options(data, ctx))
    if any(a.type == "shell" for a in actions) and not rule.allow_shell:
        raise ctx.error("actions", "a shell action needs `allow_shell: true` on the rule (and in the plugin settings)")
    return rule


def _parse_trigger(trig: Any, ctx: _Ctx, base_dir: Path | None) -> Trigger:
    """The rule's ``trigger:`` section; relative paths are taken from ``base_dir``
    (the rules file's folder) or else the working directory."""
    if not isinstance(trig, dict):
        raise ctx.error("trigger", f"expected a mapping with at least 'paths', got {trig!r}")
    _unknown(trig, {"paths", "globs", "ignore", "events", "debounce", "recursive"}, ctx, "trigger.")
    raw_paths = _strings(trig, "paths", [], ctx, "trigger.")
    if not raw_paths:
        raise ctx.error("trigger.paths", "expected at least one folder or file to watch")
    paths = []
    for p in raw_paths:
        path = Path(os.path.expanduser(p))
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        paths.append(Path(os.path.normpath(path)))
    events = _strings(trig, "events", ["added", "modified"], ctx, "trigger.")
    for e in events:
        if e not in EVENT_KINDS:
            raise ctx.error("trigger.events", f"unknown event kind {e!r} (expected {', '.join(EVENT_KINDS)})")
    return Trigger(
        paths=paths,
        globs=_strings(trig, "globs", ["*"], ctx, "trigger."),
        ignore=_strings(trig, "ignore", [], ctx, "trigger."),
        events=events,
        debounce=float(_take(trig, "debounce", (int, float), 0.5, ctx, "trigger.", lambda v: 0 <= v <= 3600,
                             "a number of seconds between 0 and 3600")),
        recursive=_take(trig, "recursive", (bool,), True, ctx, "trigger."),
    )


def _parse_conditions(cond: Any, ctx: _Ctx) -> Conditions:
    """The rule's ``conditions:`` section (an empty or missing one is ``{}``)."""
    if not isinstance(cond, dict):
        raise ctx.error("conditions", f"expected a mapping, got {cond!r}")
    _unknown(cond, {"min_size", "max_size", "extensions", "mime_types", "time_window"}, ctx, "conditions.")
    window = cond.get("time_window")
    if window is not None:
        _check_time_window(window, ctx)
    return Conditions(
        min_size=_take(cond, "min_size", (int,), None, ctx, "conditions.", lambda v: v >= 0, "an integer >= 0"),
        max_size=_take(cond, "max_size", (int,), None, ctx, "conditions.", lambda v: v >= 0, "an integer >= 0"),
        extensions=[e if e.startswith(".") else "." + e for e in _strings(cond, "extensions", [], ctx, "conditions.")],
        mime_types=_strings(cond, "mime_types", [], ctx, "conditions."),
        time_window=window,
    )


def _check_time_window(window: Any, ctx: _Ctx) -> None:
    """Validate ``conditions.time_window``; it is kept as written (the engine reads it)."""
    if not isinstance(window, dict):
        raise ctx.error("conditions.time_window", "expected {start: HH:MM, end: HH:MM, days: [mon, ...]}")
    _unknown(window, {"start", "end", "days"}, ctx, "conditions.time_window.")
    _hhmm(window.get("start", "00:00"), ctx, "conditions.time_window.start")
    _hhmm(window.get("end", "23:59"), ctx, "conditions.time_window.end")
    for day in _strings(window, "days", list(DAYS), ctx, "conditions.time_window."):
        if day not in DAYS:
            raise ctx.error("conditions.time_window.days", f"unknown day {day!r} (expected {', '.join(DAYS)})")


def _parse_actions(raw_actions: Any, ctx: _Ctx) -> list[Action]:
    """The rule's ``actions:`` list, each entry checked by _parse_action."""
    if not isinstance(raw_actions, list) or not raw_actions:
        raise ctx.error("actions", "expected a non-empty list of actions")
    return [_parse_action(a, ctx, f"actions[{i}]") for i, a in enumerate(raw_actions)]


def _parse_run_options(data: dict[str, Any], ctx: _Ctx) -> dict[str, Any]:
    """How the rule runs (mode, max, cooldown, ...): Rule's keyword arguments."""
    mode = _take(data, "mode", (str,), "queued", ctx)
    if mode not in MODES:
        raise ctx.error("mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
    return {
        "enabled": _take(data, "enabled", (bool,), True, ctx),
        "mode": mode,
        "max": _take(data, "max", (int,), 4, ctx, check=lambda v: 1 <= v <= 64, expected="an integer from 1 to 64"),
        "cooldown": float(_take(data, "cooldown", (int, float), 0.0, ctx, check=lambda v: v >= 0,
                                expected="a number of seconds >= 0")),
        "dry_run": _take(data, "dry_run", (bool,), False, ctx),
        "allow_shell": _take(data, "allow_shell", (bool,), False, ctx),
        "max_bytes": _take(data, "max_bytes", (int,), 1_000_000, ctx, check=lambda v: v > 0,
                           expected="a positive integer"),
    }


_ACTION_KEYS = {
    "prompt": {"prompt", "system", "model", "max_tokens", "temperature", "draft"},
    "skill": {"skill", "arguments", "output"},
    "write": {"write"},
    "emit": {"emit"},
    "shell": {"shell", "timeout"},
}


def _parse_action(data: Any, ctx: _Ctx, key: str) -> Action:
    """One entry of ``actions:``: exactly one action type, and that type's options."""
    if not isinstance(data, dict):
        raise ctx.error(key, f"expected a mapping with one of {', '.join(ACTION_TYPES)}, got {data!r}")
    kinds = [t for t in ACTION_TYPES if t in data]
    if len(kinds) != 1:
        raise ctx.error(key, f"expected exactly one of {', '.join(ACTION_TYPES)}, got "
                             f"{', '.join(kinds) or 'none'}")
    kind = kinds[0]
    _unknown(data, _ACTION_KEYS[kind], ctx, key + ".")
    return Action(kind, _ACTION_PARSERS[kind](data, ctx, key))


def _prompt_options(data: dict[str, Any], ctx: _Ctx, key: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    opts["prompt"] = check_template(_take(data, "prompt", (str,), None, ctx, key + "."), ctx, key + ".prompt")
    if data.get("system") is not None:
        opts["system"] = check_template(_take(data, "system", (str,), None, ctx, key + "."), ctx,
                                        key + ".system")
    opts["model"] = _take(data, "model", (str,), None, ctx, key + ".")
    opts["max_tokens"] = _take(data, "max_tokens", (int,), 256, ctx, key + ".", lambda v: v >= 1,
                               "an integer >= 1")
    opts["temperature"] = float(_take(data, "temperature", (int, float), 0.0, ctx, key + ".",
                                      lambda v: v >= 0, "a number >= 0"))
    opts["draft"] = _take(data, "draft", (str,), None, ctx, key + ".")
    return opts


def _skill_options(data: dict[str, Any], ctx: _Ctx, key: str) -> dict[str, Any]:
    skill = _take(data, "skill", (str,), None, ctx, key + ".")
    args = data.get("arguments") or {}
    if not isinstance(args, dict):
        raise ctx.error(key + ".arguments", f"expected a mapping, got {args!r}")
    for k, v in args.items():
        if isinstance(v, str):
            check_template(v, ctx, f"{key}.arguments.{k}")
    # Which field of the skill's result becomes {output} (`text` of a transcript, say);
    # dotted for a nested one. Default: the whole result.
    output = _take(data, "output", (str,), None, ctx, key + ".", check=lambda v: bool(v.strip(". ")),
                   expected="a key of the skill's result, e.g. text")
    return {"skill": skill, "arguments": args, "output": output}


def _write_options(data: dict[str, Any], ctx: _Ctx, key: str) -> dict[str, Any]:
    w = data["write"]
    if isinstance(w, str):
        w = {"to": w}
    if not isinstance(w, dict):
        raise ctx.error(key + ".write", "expected a path template or {to: ..., content: ...} or {in_place: true}")
    _unknown(w, {"to", "in_place", "backup", "content"}, ctx, key + ".write.")
    in_place = _take(w, "in_place", (bool,), False, ctx, key + ".write.")
    to = w.get("to")
    if in_place == (to is not None):
        raise ctx.error(key + ".write", "give either `to: <path template>` (a sidecar) or `in_place: true`")
    opts: dict[str, Any] = {}
    opts["to"] = check_template(to, ctx, key + ".write.to") if to is not None else None
    opts["in_place"] = in_place
    backup = w.get("backup", "{path}.bak" if in_place else None)
    if backup is True:
        backup = "{path}.bak"
    opts["backup"] = check_template(backup, ctx, key + ".write.backup") if backup else None
    opts["content"] = check_template(_take(w, "content", (str,), "{output}", ctx, key + ".write."), ctx,
                                     key + ".write.content")
    return opts


def _emit_options(data: dict[str, Any], ctx: _Ctx, key: str) -> dict[str, Any]:
    e = data["emit"]
    if isinstance(e, str):
        e = {"message": e}
    if not isinstance(e, dict):
        raise ctx.error(key + ".emit", "expected a message template or {type: ..., message: ...}")
    _unknown(e, {"type", "message"}, ctx, key + ".emit.")
    return {
        "type": _take(e, "type", (str,), "automation.note", ctx, key + ".emit."),
        "message": check_template(_take(e, "message", (str,), "{rule}: {name}", ctx, key + ".emit."), ctx,
                                  key + ".emit.message"),
    }


def _shell_options(data: dict[str, Any], ctx: _Ctx, key: str) -> dict[str, Any]:
    return {
        "shell": check_template(_take(data, "shell", (str,), None, ctx, key + "."), ctx, key + ".shell"),
        "timeout": float(_take(data, "timeout", (int, float), 60, ctx, key + ".", lambda v: v > 0,
                               "a positive number of seconds")),
    }


# One options parser per action type, each given (the action's mapping, the
# context, its key such as "actions[0]").
_ACTION_PARSERS = {
    "prompt": _prompt_options,
    "skill": _skill_options,
    "write": _write_options,
    "emit": _emit_options,
    "shell": _shell_options,
}


def load_rules(settings: dict[str, Any], default_rules_file: Path | None = None
               ) -> tuple[list[Rule], list[str]]:
    """All rules from settings and the rules file: (valid rules, error messages)."""
    rules: list[Rule] = []
    errors: list[str] = []
    sources: list[tuple[list[Any], str, Path | None]] = []
    inline = settings.get("rules") or []
    if not isinstance(inline, list):
        errors.append("plugins.filewatch.rules: expected a list of rules")
    else:
        sources.append((inline, "plugins.filewatch.rules", None))
    rules_file = settings.get("rules_file")
    path = Path(os.path.expanduser(rules_file)) if rules_file else default_rules_file
    if path is not None and (rules_file or path.exists()):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            errors.append(f"{path}: cannot read the rules file: {exc}")
            data = {}
        listed = data.get("rules", []) if isinstance(data, dict) else data
        if not isinstance(listed, list):
            errors.append(f"{path}: expected `rules:` with a list of rules")
        else:
            sources.append((listed, str(path), path.parent))
    seen: set[str] = set()
    for items, where, base in sources:
        for i, item in enumerate(items):
            try:
                rule = parse_rule(item, f"{where}[{i}]", base)
            except RuleError as exc:
                errors.append(str(exc))
                continue
            if rule.id in seen:
                errors.append(f"automation rule {rule.id!r} ({where}[{i}]): id: already used by another rule")
                continue
            seen.add(rule.id)
            rules.append(rule)
    return rules, errors
