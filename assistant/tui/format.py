"""Text for the status bar and the activity panel (pure functions, no Textual)."""

from __future__ import annotations

import time
from typing import Any


def stats_parts(stats: dict[str, Any] | None) -> list[str]:
    """The last reply's figures: tokens/s, TTFT, drafter and acceptance, context used."""
    if not stats:
        return []
    parts = []
    tps = stats.get("tokens_per_second")
    if isinstance(tps, (int, float)):
        parts.append(f"{tps:.1f} tok/s")
    ttft = stats.get("ttft_ms")
    if isinstance(ttft, (int, float)):
        parts.append(f"TTFT {ttft:.0f} ms")
    drafter = stats.get("drafter")
    if drafter:
        rate = stats.get("acceptance_rate")
        parts.append(f"draft {drafter} {rate * 100:.0f}%" if isinstance(rate, (int, float)) else f"draft {drafter}")
    used, length = stats.get("context_used"), stats.get("context_length")
    if isinstance(used, int) and isinstance(length, int) and length:
        parts.append(f"ctx {used}/{length} ({used * 100 // length}%)")
    return parts


def event_time(ts: Any) -> str:
    try:
        return time.strftime("%H:%M:%S", time.localtime(float(ts)))
    except (TypeError, ValueError, OverflowError):
        return "--:--:--"


def event_summary(event: dict[str, Any]) -> str:
    """One line about a daemon event (what happened, with what result)."""
    etype = str(event.get("type", "?"))
    data = event.get("data") or {}
    if not isinstance(data, dict):
        return f"{etype}: {data}"
    if etype == "chat.finished":
        bits = [data.get("finish_reason") or "done"]
        if data.get("completion_tokens") is not None:
            bits.append(f"{data['completion_tokens']} tokens")
        if isinstance(data.get("tokens_per_second"), (int, float)):
            bits.append(f"{data['tokens_per_second']:.0f} tok/s")
        where = f" in {data['session']}" if data.get("session") else ""
        return f"reply{where}: {', '.join(bits)}"
    if etype in ("model.loaded", "model.unloaded"):
        return f"{etype.split('.')[1]} {data.get('model', '?')}" + (
            f" ({data['backend']})" if data.get("backend") else "")
    if etype in ("daemon.started", "daemon.stopping"):
        return etype.split(".")[1]
    # Automations and plugins: show the interesting fields first.
    keys = [k for k in ("rule", "rule_id", "path", "status", "result", "error", "message") if k in data]
    keys += [k for k in data if k not in keys]
    shown = ", ".join(f"{k}={_short(data[k])}" for k in keys[:4])
    return f"{etype}: {shown}" if shown else etype


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def session_title(session: dict[str, Any]) -> str:
    return session.get("title") or "New chat"


def title_from_prompt(prompt: str, limit: int = 40) -> str:
    words = " ".join(prompt.split())
    return words if len(words) <= limit else words[: limit - 1].rstrip() + "…"


def keep_alive_text(entry: dict[str, Any] | None, now: float | None = None) -> str:
    """When a loaded model will unload, from its ``models.list`` entry: "unloads in 4m",
    "kept loaded", or "" (in use, or a daemon that does not say)."""
    if not entry:
        return ""
    if entry.get("keep_alive_s") == -1:
        return "kept loaded"
    at = entry.get("unload_at")
    if not isinstance(at, (int, float)):
        return ""
    left = max(0.0, at - (time.time() if now is None else now))
    if left < 60:
        return f"unloads in {left:.0f}s"
    minutes = int(left // 60)
    return f"unloads in {minutes}m" if minutes < 60 else f"unloads in {minutes // 60}h{minutes % 60:02d}m"
