"""A rule's conditions on the file that triggered it: size, extension, MIME type, time window."""

from __future__ import annotations

import datetime as _dt
import fnmatch
import mimetypes
from pathlib import Path
from typing import Any

from .rules import DAYS, Rule


def check(rule: Rule, path: Path) -> list[dict[str, Any]]:
    """One ``{"condition", "ok", "detail"}`` per condition the rule sets (for the trace)."""
    c = rule.conditions
    out: list[dict[str, Any]] = []
    if c.min_size is not None or c.max_size is not None:
        out.append(_size(path, c.min_size, c.max_size))
    if c.extensions:
        ok = path.suffix.lower() in {e.lower() for e in c.extensions}
        out.append({"condition": "extensions", "ok": ok, "detail": f"{path.suffix or '(none)'} in {c.extensions}"})
    if c.mime_types:
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        ok = any(fnmatch.fnmatch(mime, m) for m in c.mime_types)
        out.append({"condition": "mime_types", "ok": ok, "detail": f"{mime} in {c.mime_types}"})
    if c.time_window:
        out.append(_time_window(c.time_window))
    return out


def _size(path: Path, low: int | None, high: int | None) -> dict[str, Any]:
    try:
        size = path.stat().st_size
    except OSError:
        return {"condition": "size", "ok": False, "detail": "the file is gone"}
    ok = (low is None or size >= low) and (high is None or size <= high)
    return {"condition": "size", "ok": ok, "detail": f"{size} bytes (allowed {low or 0}..{high or 'any'})"}


def _time_window(window: dict[str, Any]) -> dict[str, Any]:
    now = _dt.datetime.now()
    start = _dt.datetime.strptime(str(window.get("start", "00:00")), "%H:%M").time()
    end = _dt.datetime.strptime(str(window.get("end", "23:59")), "%H:%M").time()
    days = window.get("days") or list(DAYS)
    t = now.time()
    in_time = start <= t <= end if start <= end else (t >= start or t <= end)  # windows may wrap midnight
    ok = in_time and DAYS[now.weekday()] in days
    return {"condition": "time_window", "ok": ok,
            "detail": f"{now:%a %H:%M} in {start:%H:%M}-{end:%H:%M} {','.join(days)}"}
