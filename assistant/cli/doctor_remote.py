"""``assistant doctor``'s remote section: each ``backend: remote`` alias's
server, whether it answers, which models it serves, and whether the alias's
model is among them; and the configured model when it is such an alias (no
file to describe: the server has it).

One ``GET {url}/models`` per alias, without retries and with a short
timeout, so a server that is down costs doctor seconds, not minutes. The
API key comes from the alias's ``api_key_env`` as the daemon's would; it is
never printed (only whether the variable is set).
"""

from __future__ import annotations

from typing import Any

from backends.remote import SPECULATIVE_NOTE

TIMEOUT_S = 5.0
SHOWN_MODELS = 20  # a server's model ids listed at most


def diagnose(config, report: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per remote alias (``report["remote"]``); an alias whose server
    cannot be reached, or does not serve its model, is also a problem of the report."""
    out = []
    for alias, entry in (getattr(config, "models", None) or {}).items():
        if getattr(entry, "backend", None) != "remote":
            continue
        item = check_alias(alias, entry)
        if item.get("error"):
            report["ok"] = False
            report["problems"].append(f"remote model {alias}: {item['error']}")
        out.append(item)
    return out


def check_alias(alias: str, entry: Any, *, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """The facts of one remote alias: url, model, key variable, reachable, served models."""
    from backends.base import ModelLoadError
    from backends.remote import RemoteError, display_url, server_models

    wanted = entry.model or alias
    item: dict[str, Any] = {"alias": alias, "url": display_url(entry.url), "model": wanted,
                            "api_key_env": entry.api_key_env, "speculative": SPECULATIVE_NOTE,
                            "reachable": False, "served": None}
    if entry.api_key_env:
        import os

        item["api_key_set"] = bool(os.environ.get(entry.api_key_env))
    try:
        listed = server_models(entry.url, entry.api_key_env, alias=alias, timeout=timeout)
    except (RemoteError, ModelLoadError) as exc:
        item["error"] = str(exc)
        return item
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        item["error"] = f"{type(exc).__name__}: {exc}"
        return item
    item["reachable"] = True
    if listed is None:
        item["note"] = "the server lists no models (no /models endpoint); the alias's model is asked for as is"
        return item
    ids = [str(m.get("id")) for m in listed if m.get("id") is not None]
    item["served"] = ids[:SHOWN_MODELS]
    if wanted in ids:
        item["serves_model"] = True
    elif entry.model is None and len(ids) == 1:
        item["serves_model"] = True
        item["note"] = f"the server serves one model, {ids[0]!r}, which the alias uses"
    else:
        item["serves_model"] = False
        item["error"] = (f"the server at {item['url']} does not serve {wanted!r}; it serves "
                         f"{', '.join(repr(i) for i in ids[:SHOWN_MODELS]) or 'nothing'} "
                         "(set the alias's model: to one of them)")
    return item


def model(config, report: dict[str, Any]) -> dict[str, Any] | None:
    """``report["model"]`` when the configured model is a remote alias (else None: the
    file-based checks run). Its server's facts are in the remote section."""
    entry = (getattr(config, "models", None) or {}).get(config.model)
    if getattr(entry, "backend", None) != "remote":
        return None
    from backends.remote import display_url

    return {"name": config.model, "backend": "remote", "path": display_url(entry.url), "remote": True,
            "model": entry.model or config.model, "threads": "-", "threads_reason": "the server's",
            "fits": True, "fit_reason": "runs on the server: nothing is loaded here"}


def render(r: dict[str, Any]) -> list[str]:
    """The section's lines for ``doctor``'s text output."""
    lines = []
    for item in r.get("remote") or []:
        key = ""
        if item.get("api_key_env"):
            key = f", key from ${item['api_key_env']}" + ("" if item.get("api_key_set") else " (NOT SET)")
        lines.append(f"remote:   {item['alias']} -> {item['model']!r} at {item['url']}{key}")
        if item.get("error"):
            lines.append(f"          ERROR: {item['error']}")
        elif item.get("served") is not None:
            lines.append(f"          reachable; serves {', '.join(item['served']) or 'nothing'}")
        else:
            lines.append("          reachable")
        if item.get("note"):
            lines.append(f"          {item['note']}")
        lines.append(f"          speculative decoding: {item['speculative']}")
    return lines
