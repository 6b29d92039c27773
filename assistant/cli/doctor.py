"""``assistant doctor``: what this machine is, which backend runs and why,
and whether the configured model fits. Works without a daemon; when one is
running it also shows what the daemon actually picked."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from assistant import __version__, paths
from assistant.cli import doctor_memory, doctor_mtp, doctor_remote
from assistant.machine import hardware
from assistant.machine.choice import BackendChoice, BackendChoiceError, choose_backend


def _size(n: int | None) -> str:
    if not n:
        return "?"
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    """The whole report as plain data (``doctor --json`` prints it as is)."""
    from assistant.config import ConfigError
    from assistant.machine.profiles import apply_profile

    report: dict[str, Any] = {"version": __version__, "ok": True, "problems": []}
    machine = hardware.probe()
    report["machine"] = machine.to_dict()
    loaded = _config(args, report)
    if loaded is None:
        return report
    config, registry = loaded
    try:  # the first profile matching this machine sets backend, model, threads, context
        config, profile = apply_profile(config, machine, known_backends=registry.names())
    except ConfigError as exc:
        _problem(report, str(exc))
        return report
    report["profile"] = profile.to_dict()

    # The built-ins are found without importing them; plugins' backends answer for themselves.
    available = hardware.backend_availability()
    available.update(registry.availability([n for n in registry.names() if n not in available]))
    report["backends"] = {name: {"available": ok, "detail": why} for name, (ok, why) in available.items()}
    choice, problem = _choose(config.backend, machine, available)
    report["backend"] = {"configured": config.backend, "chosen": choice.name, "reason": choice.reason}
    if problem:
        _problem(report, problem)
    report["model"] = doctor_remote.model(config, report) or _model(config, machine, available, registry,
                                                                    choice.name, report)
    report["remote"] = doctor_remote.diagnose(config, report)  # each remote alias's server: reachable, models
    report["mtp"] = doctor_mtp.diagnose(config, report)  # the separate MTP drafter (mtp-*.gguf) and why
    report["daemon"] = _daemon_view(args)
    return report


def _problem(report: dict[str, Any], text: str) -> None:
    report["ok"] = False
    report["problems"].append(text)


def _config(args: argparse.Namespace, report: dict[str, Any]):
    """(config, backend registry) as the daemon would have them, or None (reported) when the config is invalid."""
    from assistant.cli import local_backends
    from assistant.config import ConfigError, check_backends, load_config

    path = str(paths.config_path(args.config))
    try:
        config = load_config(paths.config_path(args.config) if args.config else None)
        registry = local_backends(args, config)  # plugins may add backends the config names
        check_backends(config, registry.names())
    except ConfigError as exc:
        report["config"] = {"path": path, "valid": False, "error": str(exc)}
        _problem(report, str(exc))
        return None
    report["config"] = {"path": path, "loaded_from": str(config.source) if config.source else None, "valid": True}
    return config, registry


def _choose(requested: str | None, machine: hardware.Machine,
            available: dict[str, tuple[bool, str]]) -> tuple[BackendChoice, str | None]:
    """The daemon's backend choice, and the problem when it cannot run here: doctor
    shows a choice that cannot run, with why, rather than stopping at it."""
    try:
        return choose_backend(requested, machine, available), None
    except BackendChoiceError as exc:
        if exc.choice is None:  # an unknown name (check_backends lets none through)
            return BackendChoice(str(requested), exc.message), exc.message
        name = exc.choice.name
        return exc.choice, f"backend {name} is not available: {available.get(name, (False, '?'))[1]}"


def _model(config, machine: hardware.Machine, available: dict[str, tuple[bool, str]], registry,
           backend: str, report: dict[str, Any]) -> dict[str, Any]:
    """The configured model: its file for the backend that would run it, and whether it fits."""
    from backends.base import BackendUnavailable, ModelLoadError

    from assistant.config.models import resolve_model

    threads, threads_why = hardware.pick_threads(machine)
    model: dict[str, Any] = {"name": config.model}
    try:
        spec = resolve_model(config.model, config)
        model_backend = _choose(spec.backend, machine, available)[0].name if spec.backend else backend
        model["backend"] = model_backend
        # The file that backend loads (an alias may name one per backend), and whether it can.
        ok = available.get(model_backend, (False,))[0]
        spec = spec.for_backend(model_backend, check=ok, backend_class=registry.get(model_backend) if ok else None)
        model["path"] = str(spec.path)
        info, size = _describe_file(spec.path)
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
        doctor_memory.apply(model, config, spec, machine, model_backend, requested_ctx)  # the memory plan (GGUF)
        if not model["fits"]:
            _problem(report, f"model {config.model}: {model['fit_reason']}")
    except (ModelLoadError, BackendUnavailable) as exc:
        model["error"] = str(exc)
        _problem(report, str(exc))
    model.update(threads=threads, threads_reason=threads_why)
    return model


def _describe_file(path) -> tuple[dict[str, Any], int]:
    """(header summary, size in bytes) of a GGUF file or an MLX folder; reads no weights."""
    from backends.gguf import read_metadata, summary

    if path.is_dir():
        from backends.mlx_backend import folder_summary

        info = folder_summary(path)
        size = info.pop("size_bytes")
    else:
        info = summary(read_metadata(path))
        size = path.stat().st_size
    info["model_name"] = info.pop("name", None)  # the file's own name; "name" is the alias
    return info, size


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
        elif not md.get("remote"):  # a remote model's server: the remote lines below
            lines.append(f"          {md.get('architecture')}, {md.get('quantization')}, {_size(md.get('size_bytes'))}, "
                         f"trained on {md.get('context_length')} tokens, chat template: "
                         f"{'yes' if md.get('has_chat_template') else 'no (fallback)'}")
            lines += doctor_memory.render_memory(md.get("memory"))
            lines.append(f"context:  {md['context_reason']}")
            lines.append(f"fits:     {'yes' if md['fits'] else 'NO'}: {md['fit_reason']}")
        lines.append(f"threads:  {md['threads']}: {md['threads_reason']}")
    lines += doctor_mtp.render(r)
    lines += doctor_remote.render(r)
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
