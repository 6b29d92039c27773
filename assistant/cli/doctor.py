"""``assistant doctor``: what this machine is, which backend runs and why,
and whether the configured model fits. Works without a daemon; when one is
running it also shows what the daemon actually picked."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from assistant import __version__, paths
from assistant.machine import hardware


def _size(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    from backends.base import ModelLoadError
    from backends.gguf import read_metadata, summary

    from assistant.config import ConfigError, load_config
    from assistant.config.models import resolve_model

    report: dict[str, Any] = {"version": __version__, "ok": True, "problems": []}
    machine = hardware.probe()
    report["machine"] = machine.to_dict()
    try:
        config = load_config(paths.config_path(args.config) if args.config else None)
        report["config"] = {"path": str(paths.config_path(args.config)), "loaded_from": str(config.source) if config.source else None, "valid": True}
    except ConfigError as exc:
        report["config"] = {"path": str(paths.config_path(args.config)), "valid": False, "error": str(exc)}
        report["ok"] = False
        report["problems"].append(str(exc))
        return report
    from assistant.machine.profiles import apply_profile

    try:  # the first profile matching this machine sets backend, model, threads, context
        config, profile = apply_profile(config, machine)
    except ConfigError as exc:
        report["ok"] = False
        report["problems"].append(str(exc))
        return report
    report["profile"] = profile.to_dict()

    available = hardware.backend_availability()
    report["backends"] = {name: {"available": ok, "detail": why} for name, (ok, why) in available.items()}
    name, why = hardware.choose_backend(machine, config.backend, available)
    report["backend"] = {"configured": config.backend, "chosen": name, "reason": why}
    if not available.get(name, (False,))[0]:
        report["ok"] = False
        report["problems"].append(f"backend {name} is not available: {available.get(name, (False, '?'))[1]}")

    threads, threads_why = hardware.pick_threads(machine)
    model: dict[str, Any] = {"name": config.model}
    report["model"] = model
    try:
        spec = resolve_model(config.model, config)
        model_backend = hardware.choose_backend(machine, spec.backend, available)[0] if spec.backend else name
        model["backend"] = model_backend
        # The file that backend loads (an alias may name one per backend), and whether it can.
        spec = spec.for_backend(model_backend, check=available.get(model_backend, (False,))[0])
        model["path"] = str(spec.path)
        if spec.path.is_dir():
            from backends.mlx_backend import folder_summary

            info = folder_summary(spec.path)
            size = info.pop("size_bytes")
        else:
            info = summary(read_metadata(spec.path))
            size = spec.path.stat().st_size
        info["model_name"] = info.pop("name", None)  # the file's own name; "name" is the alias
        model.update(info, size_bytes=size)
        requested_ctx = spec.context or (None if config.context == "auto" else int(config.context))
        ctx, ctx_why = hardware.pick_context(machine, train_ctx=int(info["context_length"] or 0), model_bytes=size,
                                             kv_bytes_per_token=info["kv_bytes_per_token"], requested=requested_ctx)
        if spec.threads or config.threads != "auto":
            threads = spec.threads or int(config.threads)
            threads_why = "set in config"
        kv = (info["kv_bytes_per_token"] or 0) * ctx
        fits, fit_why = hardware.fits_in_memory(machine, size, kv)
        model.update(context=ctx, context_reason=ctx_why, fits=fits, fit_reason=fit_why)
        if not fits:
            report["ok"] = False
            report["problems"].append(f"model {config.model}: {fit_why}")
    except ModelLoadError as exc:
        model["error"] = str(exc)
        report["ok"] = False
        report["problems"].append(str(exc))
    model.update(threads=threads, threads_reason=threads_why)

    report["daemon"] = _daemon_view(args)
    return report


def _daemon_view(args: argparse.Namespace) -> dict[str, Any]:
    from assistant.client import Client, DaemonNotRunning

    async def ask() -> dict[str, Any]:
        client = await Client.connect(args.socket, client_name="assistant-doctor")
        try:
            return await client.call("status")
        finally:
            await client.close()

    sock = paths.socket_path(args.socket)
    try:
        status = asyncio.run(asyncio.wait_for(ask(), 5))
    except (DaemonNotRunning, OSError, asyncio.TimeoutError):
        return {"running": False, "socket": str(sock)}
    except Exception as exc:  # noqa: BLE001 - a broken daemon is a finding, not a crash
        return {"running": False, "socket": str(sock), "error": str(exc)}
    return {"running": True, "socket": str(sock), "pid": status["pid"], "models": status["models"]}


def render(r: dict[str, Any]) -> str:
    lines = [f"assistant {r['version']}"]
    m = r["machine"]
    lines.append(f"machine:  {m.get('platform_tag')} ({m.get('hostname')}), {m.get('cpu_model') or m.get('chip') or 'CPU ?'}")
    lines.append(f"cores:    {m.get('physical_cores')} physical, {m.get('logical_cores')} logical")
    lines.append(f"memory:   {_size(m.get('ram_total_bytes'))} total, {_size(m.get('ram_available_bytes'))} available")
    lines.append(f"gpu:      {', '.join(m.get('gpu') or []) or 'none found'}"
                 + (" (unified memory)" if m.get("unified_memory") else ""))
    c = r["config"]
    lines.append(f"config:   {c.get('loaded_from') or c['path'] + ' (absent: defaults)'}" if c["valid"]
                 else f"config:   INVALID: {c['error']}")
    if "profile" in r:
        lines.append(f"profile:  {r['profile']['name'] or 'none'} ({r['profile']['reason']})")
    if "backends" in r:
        for name, b in r["backends"].items():
            lines.append(f"backend:  {name:<10} {'yes' if b['available'] else 'no ':<4} {b['detail']}")
        lines.append(f"chosen:   {r['backend']['chosen']} ({r['backend']['reason']})")
    if "model" in r:
        md = r["model"]
        lines.append(f"model:    {md['name']} -> {md.get('path', '?')}"
                     + (f" (for {md['backend']})" if md.get("backend") else ""))
        if "error" in md:
            lines.append(f"          ERROR: {md['error']}")
        else:
            lines.append(f"          {md.get('architecture')}, {md.get('quantization')}, {_size(md.get('size_bytes'))}, "
                         f"trained on {md.get('context_length')} tokens, chat template: "
                         f"{'yes' if md.get('has_chat_template') else 'no (fallback)'}")
            lines.append(f"context:  {md['context_reason']}")
            lines.append(f"fits:     {'yes' if md['fits'] else 'NO'}: {md['fit_reason']}")
        lines.append(f"threads:  {md['threads']}: {md['threads_reason']}")
    d = r.get("daemon", {})
    if d.get("running"):
        lines.append(f"daemon:   running (pid {d['pid']}) on {d['socket']}")
        for w in d.get("models", []):
            info = w.get("info") or {}
            picks = "; ".join(f"{k}: {v}" for k, v in (info.get("choices") or {}).items())
            lines.append(f"          {w['name']} [{w['state']}] via {w['backend']}" + (f" ({picks})" if picks else ""))
    elif d:
        lines.append(f"daemon:   not running ({d['socket']})")
    for p in r["problems"]:
        lines.append(f"problem:  {p}")
    lines.append("status:   ok" if r["ok"] else "status:   problems found")
    return "\n".join(lines)
