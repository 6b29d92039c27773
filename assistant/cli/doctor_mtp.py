"""``assistant doctor``'s MTP section: which separate MTP drafter (Gemma 4's
``mtp-*.gguf``) the configured model would load with, and why each
candidate was taken or not: the same decision the daemon makes
(``assistant.daemon.drafts.mtp_model_for``), from file headers alone."""

from __future__ import annotations

from typing import Any


def diagnose(config, report: dict[str, Any]) -> dict[str, Any]:
    """The MTP drafter facts for the configured model (``report["mtp"]``); a
    configured drafter that cannot be used is also a problem of the report."""
    from backends.base import ModelLoadError

    from assistant.config.models import ModelNotFoundError, resolve_model
    from assistant.daemon.chat_settings import configured
    from assistant.daemon.drafts import MTP_DRAFTERS, configured_mtp_model, mtp_model_for

    name = config.model
    drafter = configured(config, name).drafter
    out: dict[str, Any] = {"drafter": drafter, "configured": configured_mtp_model(config, name), "used": None,
                           "lines": []}
    model = report.get("model") or {}
    if model.get("error") or not model.get("path"):
        out["lines"].append("not looked for: the model itself cannot be used")
        return out
    try:
        spec = resolve_model(name, config)
        if model.get("backend"):
            spec = spec.for_backend(model["backend"], check=False)
        used, lines = mtp_model_for(config, name, spec, drafter)
    except (ModelLoadError, ModelNotFoundError) as exc:
        out["error"] = str(exc)
        report["ok"] = False
        report["problems"].append(f"MTP drafter for model {name}: {exc}")
        return out
    out["used"], out["lines"] = used, lines
    if used is None and not lines:
        out["lines"].append("none: no speculative.mtp_model configured, and no mtp-*.gguf beside the model file"
                            if drafter in MTP_DRAFTERS else
                            f"not looked for: the {drafter!r} drafter uses none (mtp and auto do)")
    return out


def render(r: dict[str, Any]) -> list[str]:
    """The section's lines for ``doctor``'s text output."""
    m = r.get("mtp")
    if not m:
        return []
    lines = [f"mtp:      {m.get('used') or 'none'} (drafter {m['drafter']})"]
    if m.get("error"):
        lines.append(f"          ERROR: {m['error']}")
    lines += [f"          {line}" for line in m.get("lines", [])]
    return lines
