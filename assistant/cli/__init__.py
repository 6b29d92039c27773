"""The ``assistant`` command.

Every subcommand that talks to the daemon goes through ``assistant.client``;
``--socket``/``ASSISTANT_SOCKET`` and ``--config``/``ASSISTANT_CONFIG`` apply
to all of them. The global options (``--socket``, ``--config``,
``--no-plugins``, ...) go before or after the command's name (``assistant ask
--socket S``); given in both places, the one after wins. Heavy imports
(numpy, llama.cpp) happen only in ``serve``, ``doctor`` and ``config``, so
client commands start fast.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from assistant import paths
from assistant.protocol import RPCError


class CLIError(Exception):
    """A failure to report as one line on stderr with exit status 1."""


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _human_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def _load_config(args: argparse.Namespace):
    from assistant.config import ConfigError, load_config

    try:
        return load_config(paths.config_path(args.config) if args.config else None)
    except ConfigError as exc:
        raise CLIError(str(exc)) from None


async def _connect(args: argparse.Namespace, *, start: bool = False):
    from assistant.client import Client, DaemonNotRunning, DaemonStartError

    def starting() -> None:
        print("starting the assistant daemon (first start loads the model)...", file=sys.stderr, flush=True)

    try:
        return await Client.connect(args.socket, client_name="assistant-cli", start=start,
                                    config_path=args.config, on_starting=starting, flags=_serve_flags(args))
    except DaemonNotRunning as exc:
        raise CLIError(f"{exc}; start one with `assistant daemon start`") from None
    except DaemonStartError as exc:
        raise CLIError(str(exc)) from None


def _run(coro) -> Any:
    return asyncio.run(coro)


# -- serve / daemon -------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from assistant.config import ConfigError, load_config
    from assistant.daemon import Daemon, DaemonError
    from assistant.logs import setup_logging

    try:
        config = load_config(paths.config_path(args.config) if args.config else None)
    except ConfigError as exc:
        print(f"error: refusing to start: {exc}", file=sys.stderr)
        return 2
    if args.http:  # for this run only: overrides http.listen
        config.http.listen = args.http
    setup_logging(args.log_level or config.log_level, stderr=not args.quiet)
    daemon = Daemon(config, socket_path=paths.socket_path(args.socket), plugins=_plugin_host(args, config))
    try:
        asyncio.run(daemon.run())
    except DaemonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _plugin_host(args: argparse.Namespace, config):
    from assistant.plugin_host import PluginHost, allow_list_from_env, plugin_dirs

    return PluginHost(settings=config.plugins, dirs=plugin_dirs(config.plugin_dirs), allow=allow_list_from_env(),
                      enabled=not args.no_plugins, trace=True if args.trace_plugins else None).load()


def local_backends(args: argparse.Namespace, config):
    """The backend registry a daemon started with ``args`` and ``config`` would have:
    the built-ins and what plugins register, loaded here, without a daemon."""
    from assistant.machine.choice import backend_registry

    host = _plugin_host(args, config)
    host.collect()
    return backend_registry(host)


def _serve_flags(args: argparse.Namespace) -> list[str]:
    """Global flags a background daemon must inherit."""
    return [f for f, on in (("--no-plugins", args.no_plugins), ("--trace-plugins", args.trace_plugins)) if on]


def cmd_daemon(args: argparse.Namespace) -> int:
    from assistant.client import DaemonStartError, start_daemon

    sock = paths.socket_path(args.socket)
    if args.action == "start":
        try:
            info = _run(_status(args))
            print(f"already running (pid {info['pid']}) on {sock}")
            return 0
        except CLIError:
            pass
        _load_config(args)  # refuse early, with the config error, rather than in the log
        try:
            pid = start_daemon(sock, config_path=args.config, flags=_serve_flags(args))
        except DaemonStartError as exc:
            raise CLIError(str(exc)) from None
        print(f"started (pid {pid}) on {sock}")
        return 0
    if args.action == "stop":
        try:
            info = _run(_status(args))
        except CLIError:
            print("not running")
            return 0
        _run(_call(args, "shutdown"))
        _wait_gone(sock, int(info["pid"]))
        print(f"stopped (pid {info['pid']})")
        return 0
    # status
    try:
        info = _run(_status(args))
    except CLIError:
        if args.json:
            _print_json({"running": False, "socket": str(sock)})
        else:
            print(f"not running (socket {sock})")
        return 3
    if args.json:
        _print_json({"running": True, **info})
    else:
        print(f"running (pid {info['pid']}) on {info['socket']}, up {info['uptime_s']:.0f} s")
    return 0


def _wait_gone(sock: Path, pid: int, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        time.sleep(0.05)


async def _status(args: argparse.Namespace) -> dict[str, Any]:
    client = await _connect(args)
    try:
        return await client.call("status")
    finally:
        await client.close()


async def _call(args: argparse.Namespace, method: str, params: dict[str, Any] | None = None, *, start: bool = False):
    client = await _connect(args, start=start)
    try:
        return await client.call(method, params or {})
    finally:
        await client.close()


# -- ask ------------------------------------------------------------------------


def cmd_ask(args: argparse.Namespace) -> int:
    media = _media_parts(args.media or [])
    prompt = " ".join(args.prompt)
    if not prompt or prompt == "-":
        if sys.stdin.isatty():
            if not media or prompt == "-":
                raise CLIError("give a prompt, or pipe one on stdin")
            prompt = ""  # an image or a recording alone is a question too
        else:
            prompt = sys.stdin.read()
    params = {
        "prompt": _message(prompt, media), "model": args.model, "system": args.system, "temperature": args.temperature,
        "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
        "max_tokens": args.max_tokens, "seed": args.seed, "session": args.session,
        "backend": args.backend,
        "draft": args.draft, "max_draft": args.max_draft, "draft_model": args.draft_model,
    }
    if args.stop:
        params["stop"] = args.stop
    response_format = _response_format(args)
    if response_format is not None:
        params["response_format"] = response_format
    return _run(_ask(args, params))


SCHEMA_FILE_LIMIT = 1024 * 1024  # bytes of a --schema file
# What the reply's stats.media says ran, per kind: the model itself, or a fallback skill's text.
MEDIA_PATH_WORDS = {"image": ("read by the model", "ocr", "OCR text"),
                    "audio": ("heard by the model", "transcript", "transcript")}


def _media_parts(media: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """``--image``/``--audio`` as content parts, in the order given: ``{"type", "path", "name"}``
    with the path made absolute here (the daemon's working directory is not ours). The daemon
    checks the bytes (type, size, pixels, duration); this checks that there is a file to send."""
    parts = []
    for kind, text in media:
        path = Path(os.path.expanduser(text))
        if not path.is_absolute():
            path = Path.cwd() / path
        flag = f"--{kind} {text}"
        try:
            if not path.exists():
                raise CLIError(f"{flag}: no such file")
            if path.is_dir():
                raise CLIError(f"{flag}: a folder; give a file")
            if not path.is_file():  # a FIFO or a device: the daemon would block reading it
                raise CLIError(f"{flag}: not a regular file")
            if not os.access(path, os.R_OK):
                raise CLIError(f"{flag}: permission denied")
        except OSError as exc:
            raise CLIError(f"{flag}: {exc.strerror or exc}") from None
        parts.append({"type": kind, "path": str(path), "name": path.name})
    return parts


def _message(prompt: str, media: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """The chat message: the prompt alone, or the media parts followed by the prompt's text part."""
    if not media:
        return prompt
    return media + ([{"type": "text", "text": prompt}] if prompt.strip() else [])


def _media_note(kinds: list[str], media: str | None) -> str:
    """Which path the media took, from stats.media ("native", "ocr", "transcript", joined by "+"):
    "image: OCR text", "audio: heard by the model"; "" when the daemon did not say."""
    ran = set((media or "").split("+"))
    notes = []
    for kind in dict.fromkeys(kinds):
        native, fallback, words = MEDIA_PATH_WORDS[kind]
        if fallback in ran:
            notes.append(f"{kind}: {words}")
        elif "native" in ran:
            notes.append(f"{kind}: {native}")
    return ", ".join(notes)


def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """``response_format`` from ``--schema FILE`` (a JSON Schema) or ``--format json``."""
    if args.schema is not None and args.format is not None:
        raise CLIError("give --schema FILE or --format json, not both")
    if args.format is not None:
        return {"type": "json_object"}
    if args.schema is None:
        return None
    path = Path(args.schema)
    try:
        if not path.exists():
            raise CLIError(f"--schema {path}: no such file")
        if not path.is_file():  # not a FIFO or a device: reading one could block or never end
            raise CLIError(f"--schema {path}: not a file")
        with path.open("rb") as f:
            data = f.read(SCHEMA_FILE_LIMIT + 1)
    except OSError as exc:
        raise CLIError(f"--schema {path}: {exc.strerror or exc}") from None
    if len(data) > SCHEMA_FILE_LIMIT:
        raise CLIError(f"--schema {path}: larger than {SCHEMA_FILE_LIMIT // 1024} KiB")
    try:
        schema = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CLIError(f"--schema {path}: not JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise CLIError(f"--schema {path}: a JSON Schema is an object, this file holds a {type(schema).__name__}")
    name = "".join(c if c.isascii() and (c.isalnum() or c in "_-") else "_" for c in path.stem)[:64] or "schema"
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


async def _ask(args: argparse.Namespace, params: dict[str, Any]) -> int:
    client = await _connect(args, start=not args.no_start)
    loop = asyncio.get_running_loop()
    try:
        stream = await client.chat(**params)
        # Ctrl-C cancels the reply (the daemon answers with what it had) instead of killing us.
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(stream.cancel()))
        async for text in stream:
            if not args.json:
                sys.stdout.write(text)
                sys.stdout.flush()
        result = await stream.result()
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await client.close()
    if args.json:
        _print_json(result)
    else:
        if not result["text"].endswith("\n"):
            sys.stdout.write("\n")
        kinds = [p["type"] for p in params["prompt"] if p["type"] != "text"] if isinstance(
            params["prompt"], list) else []
        note = _media_note(kinds, (result.get("stats") or {}).get("media")) if kinds else ""
        if note:
            print(f"[{note}]", file=sys.stderr)
        if result["finish_reason"] == "cancelled":
            print("[cancelled]", file=sys.stderr)
        elif result["stats"].get("context_full"):
            print("[stopped: the context window is full]", file=sys.stderr)
        elif result["finish_reason"] == "length" and "response_format" in params:
            print("[stopped at --max-tokens: the JSON is not complete]", file=sys.stderr)
    return 130 if result["finish_reason"] == "cancelled" else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from assistant.cli import bench_spec

    return bench_spec.run(args)


# -- models / status / sessions ---------------------------------------------------


def cmd_models(args: argparse.Namespace) -> int:
    if args.action == "pull":
        from assistant.cli import pull

        return pull.run(args)
    if args.action == "list":
        data = _run(_call(args, "models.list", start=False)) if _daemon_up(args) else _local_models(args)
        if args.json:
            _print_json(data)
            return 0
        loaded = {m["name"]: m for m in data.get("loaded", [])}
        print(f"{'NAME':<22} {'STATE':<10} {'SIZE':>10}  PATH")
        for m in data["available"]:
            state = loaded[m["name"]]["state"] if m["name"] in loaded else ("present" if m.get("present") else "absent")
            mark = "*" if m["name"] == data.get("default") else " "
            print(f"{mark}{m['name']:<21} {state:<10} {_human_bytes(m.get('size_bytes')):>10}  {m.get('path')}")
            for role, c in (m.get("companions") or {}).items():  # a pulled model's mtp / mmproj files
                cstate = "present" if c.get("present") else "absent"
                print(f"  + {role:<18} {cstate:<10} {_human_bytes(c.get('size_bytes')):>10}  {c.get('path')}")
        for name, m in loaded.items():
            if name not in {a["name"] for a in data["available"]}:
                print(f" {name:<21} {m['state']:<10} {'':>10}  {m['path']}")
        return 0
    if args.action == "load":
        params = {"model": args.model, "backend": args.backend, "context": args.context, "threads": args.threads}
        data = _run(_call(args, "models.load", {k: v for k, v in params.items() if v is not None}, start=True))
        if args.json:
            _print_json(data)
        else:
            info = data.get("info", {})
            print(f"loaded {data['name']} with {data['backend']}: {info.get('architecture')}, "
                  f"context {info.get('context_length')}, {info.get('n_threads')} threads")
        return 0
    data = _run(_call(args, "models.unload", {"model": args.model}))
    if args.json:
        _print_json(data)
    else:
        print(f"unloaded {data['unloaded']}")
    return 0


def _daemon_up(args: argparse.Namespace) -> bool:
    import socket as _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(str(paths.socket_path(args.socket)))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _local_models(args: argparse.Namespace) -> dict[str, Any]:
    from assistant.config.models import list_models

    config = _load_config(args)
    return {"loaded": [], "available": list_models(config), "default": config.model}


def cmd_status(args: argparse.Namespace) -> int:
    data = _run(_status(args))
    if args.json:
        _print_json(data)
        return 0
    print(f"daemon {data['daemon_version']} (pid {data['pid']}), up {data['uptime_s']:.0f} s")
    print(f"socket:   {data['socket']}")
    print(f"database: {data['database']}")
    print(f"config:   {data['config'] or '(defaults)'}")
    print(f"clients:  {data['connections']}, requests in flight: {data['requests_in_flight']}")
    if not data["models"]:
        print("models:   none loaded" + (f" (loading {', '.join(data['loading'])})" if data["loading"] else ""))
    for m in data["models"]:
        info = m.get("info", {})
        extra = f"context {info.get('context_length')}, {info.get('n_threads')} threads" if info else m.get("error", "")
        print(f"model:    {m['name']} [{m['state']}] via {m['backend']}: {extra}")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    if args.action == "list":
        data = _run(_call(args, "sessions.list", start=True))
        if args.json:
            _print_json(data)
            return 0
        for s in data["sessions"]:
            print(f"{s['id']:<16} {s['message_count']:>4} msgs  {s.get('title') or ''}")
        return 0
    if args.action == "show":
        data = _run(_call(args, "sessions.get", {"id": args.id}, start=True))
        if args.json:
            _print_json(data)
        else:
            for m in data["messages"]:
                print(f"[{m['role']}] {m['content']}\n")
        return 0
    if args.action == "export":
        data = _run(_call(args, "sessions.export", {"id": args.id}, start=True))
        print(data["markdown"])
        return 0
    data = _run(_call(args, "sessions.delete", {"id": args.id}, start=True))
    print(f"deleted {data['deleted']}")
    return 0


# -- plugins / skills ---------------------------------------------------------------


def cmd_plugins(args: argparse.Namespace) -> int:
    if args.action == "new":
        from assistant.cli.scaffold import ScaffoldError, new_plugin

        try:
            path = new_plugin(args.name, Path(args.dir))
        except ScaffoldError as exc:
            raise CLIError(str(exc)) from None
        print(f"created {path}\nnext: pip install -e {path} && pytest {path}")
        return 0
    if _daemon_up(args):
        plugins = _run(_call(args, "plugins.list"))["plugins"]
        where = "daemon"
    else:
        plugins = _plugin_host(args, _load_config(args)).list()
        where = "local (no daemon running)"
    if args.json:
        _print_json({"plugins": plugins, "from": where})
        return 0
    print(f"{'NAME':<20} {'STATUS':<9} {'VERSION':<10} SOURCE")
    for p in plugins:
        print(f"{p['name']:<20} {p['status']:<9} {p['version'] or '-':<10} {p['source']}")
        if p["hooks"]:
            print(f"{'':<20} hooks: {', '.join(p['hooks'])}")
        if p["error"]:
            print(f"{'':<20} error: {p['error']}")
        for problem in p["problems"]:
            print(f"{'':<20} problem: {problem}")
    return 0


def cmd_skills(args: argparse.Namespace) -> int:
    if args.action == "list":
        skills = _run(_call(args, "skills.list", start=True))["skills"]
        if args.json:
            _print_json({"skills": skills})
        else:
            for sk in skills:
                print(f"{sk['name']:<24} {sk['plugin']:<16} {sk['description'].splitlines()[0] if sk['description'] else ''}")
        return 0
    try:
        arguments = json.loads(args.arguments) if args.arguments else {}
    except json.JSONDecodeError as exc:
        raise CLIError(f"arguments must be a JSON object: {exc}") from None
    if not isinstance(arguments, dict):
        raise CLIError(f"arguments must be a JSON object, not {type(arguments).__name__}")
    arguments = _absolute_paths(arguments)
    result = _run(_call(args, "skills.call", {"name": args.name, "arguments": arguments}, start=True))["result"]
    if args.json or not isinstance(result, str):
        _print_json(result)
    else:
        print(result)
    return 0


def _absolute_paths(arguments: dict[str, Any]) -> dict[str, Any]:
    """A skill's path arguments (``path``, ``*_path``) made absolute against this shell's working
    directory, ``~`` expanded: the daemon runs elsewhere, and ``vision.ocr '{"path": "scan.png"}'``
    means the scan here. Other values go as they are."""
    out = dict(arguments)
    for key, value in arguments.items():
        if (key == "path" or key.endswith("_path")) and isinstance(value, str) and value and "://" not in value:
            path = Path(os.path.expanduser(value))
            out[key] = str(path if path.is_absolute() else Path.cwd() / path)
    return out


# -- the terminal UI ------------------------------------------------------------------


def cmd_tui(args: argparse.Namespace) -> int:
    from assistant.tui.app import run

    return run(args)


# -- config / doctor ----------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from assistant.config import ConfigError, check_backends, dump_effective, load_config

    path = paths.config_path(args.config)
    if args.action == "path":
        print(path)
        return 0
    try:
        config = load_config(path if (args.config or os.environ.get("ASSISTANT_CONFIG")) else None)
        # Backends are checked against what the daemon would have: the built-ins and the plugins'.
        check_backends(config, local_backends(args, config).names())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.action == "check":
        print(f"ok: {config.source}" if config.source else f"ok: no file at {path}; using defaults")
        return 0
    print(dump_effective(config), end="")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from assistant.cli.doctor import diagnose, render

    report = diagnose(args)
    if args.json:
        _print_json(report)
    else:
        print(render(report))
    return 0 if report["ok"] else 1


# -- the parser -----------------------------------------------------------------------


def _add_global_options(parser: argparse.ArgumentParser, *, after_command: bool = False,
                        version: bool = True) -> None:
    """The options of every command, on the top-level parser and (``after_command``) on each command's.

    After the command they default to SUPPRESS: argparse copies a command's
    parsed values over the top-level ones, so only an option actually given
    there replaces the one given before the command."""
    from assistant import __version__ as VERSION

    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    g = parser.add_argument_group("global options") if after_command else parser
    if version:
        g.add_argument("--version", action="version", version=f"assistant {VERSION}")
    g.add_argument("--socket", help="daemon socket (default: $ASSISTANT_SOCKET or the user runtime dir)", **unset)
    g.add_argument("--config", help="config file (default: $ASSISTANT_CONFIG or config.yaml in the user config dir)",
                   **unset)
    g.add_argument("--no-plugins", action="store_true", help="load no plugins (the core backends stay)", **unset)
    g.add_argument("--trace-plugins", action="store_true", help="log every plugin hook call with its duration",
                   **unset)


class _CommandParser(argparse.ArgumentParser):
    """The parser of a command (and of its own subcommands, plugins' included): it
    takes the global options too. A command's own option of the same name wins."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("conflict_handler", "resolve")
        super().__init__(*args, **kwargs)
        _add_global_options(self, after_command=True)


class _PreParser(argparse.ArgumentParser):
    """Reads the global options only; what it cannot read, the full parser reports."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(message)


def _global_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The global options wherever they are in ``argv``, and the rest, parsed before the
    plugins' commands are known (they depend on --config and --no-plugins)."""
    pre = _PreParser(add_help=False, allow_abbrev=False)
    _add_global_options(pre, version=False)
    pre.add_argument("-h", "--help", action="store_true")
    try:
        return pre.parse_known_args(argv)
    except ValueError:  # e.g. --config without a value: the full parser says so
        return pre.parse_known_args([])[0], argv


def build_parser() -> argparse.ArgumentParser:
    """The core commands (plugins add theirs in main), in the order ``--help`` lists them."""
    p = argparse.ArgumentParser(prog="assistant", description="A local AI assistant: daemon, CLI and terminal UI.")
    _add_global_options(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)
    for add in (_add_daemon_commands, _add_ask_commands, _add_model_commands, _add_other_commands):
        add(sub)
    return p


def _add_daemon_commands(sub) -> None:
    s = sub.add_parser("serve", help="run the daemon in the foreground")
    s.add_argument("--quiet", action="store_true", help="log only to the log file, not stderr")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    s.add_argument("--http", metavar="LISTEN", help="also serve the OpenAI/Ollama HTTP API here for this run "
                   "(127.0.0.1:PORT, [::1]:PORT, HOST:PORT with an API key, unix:PATH); overrides http.listen")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("daemon", help="start, stop or check the background daemon")
    s.add_argument("action", choices=["start", "stop", "status"])
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_daemon)


def _add_ask_commands(sub) -> None:
    s = sub.add_parser("ask", help="ask a question; the answer streams to stdout")
    s.add_argument("prompt", nargs="*", help="the prompt ('-' or nothing: read stdin)")
    s.add_argument("--model", "-m", help="model alias or GGUF path (default: the config's model)")
    s.add_argument("--backend", "-b", help="llama.cpp or mlx: (re)load the model with this backend first")
    s.add_argument("--system", "-s", help="system prompt")
    s.add_argument("--temperature", "-t", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--min-p", type=float)
    s.add_argument("--repeat-penalty", type=float)
    s.add_argument("--max-tokens", "-n", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--stop", action="append", help="stop string (repeatable)")
    s.add_argument("--session", help="session id: keeps a multi-turn conversation (created if new)")
    s.add_argument("--json", action="store_true", help="print one JSON object (text, stats) at the end")
    s.add_argument("--schema", metavar="FILE", help="the answer is JSON valid against this JSON Schema file")
    s.add_argument("--format", choices=["json"], help="json: the answer is a JSON object")
    s.add_argument("--no-start", action="store_true", help="fail instead of starting a daemon")
    s.add_argument("--draft", metavar="DRAFTER",
                   help="speculative decoding: auto, ngram, draft, mtp, off (default: the config's)")
    s.add_argument("--max-draft", type=int, metavar="N", help="most tokens drafted per step (1-64)")
    s.add_argument("--draft-model", metavar="MODEL", help="draft model (alias or GGUF path) for --draft draft/auto")
    # Both append to one list, so the parts keep the order they were given in.
    s.add_argument("--image", action="append", dest="media", metavar="PATH", type=lambda p: ("image", p),
                   help="an image for the model (repeatable); a model that cannot see gets its OCR text")
    s.add_argument("--audio", action="append", dest="media", metavar="PATH", type=lambda p: ("audio", p),
                   help="a recording for the model (repeatable); a model that cannot hear gets its transcript")
    s.set_defaults(func=cmd_ask)

    s = sub.add_parser("bench", help="benchmarks on the real models (speculative decoding: bench spec)")
    bs = s.add_subparsers(dest="bench", required=True)
    from assistant.cli import bench_spec

    bench_spec.add_arguments(bs.add_parser("spec", help="plain vs each drafter vs auto vs llama-cpp-python's "
                                           "prompt lookup: tokens/s, ratio, acceptance, identical text"))
    s.set_defaults(func=cmd_bench)


def _add_model_commands(sub) -> None:
    s = sub.add_parser("models", help="list, pull, load or unload models")
    ms = s.add_subparsers(dest="action", required=True)
    m = ms.add_parser("list", help="aliases, paths and what is loaded")
    m.add_argument("--json", action="store_true")
    from assistant.cli import pull

    pull.add_arguments(ms.add_parser("pull", help="download a model (catalog name or URL) and its drafter and "
                                     "projector into the models dir, and add its alias"))
    m = ms.add_parser("load", help="load a model in the daemon")
    m.add_argument("model")
    m.add_argument("--backend", help="auto, llama.cpp, ...")
    m.add_argument("--context", type=int)
    m.add_argument("--threads", type=int)
    m.add_argument("--json", action="store_true")
    m = ms.add_parser("unload", help="unload a model")
    m.add_argument("model")
    m.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("status", help="what the daemon is doing")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("doctor", help="this machine, the chosen backend and why, and whether the model fits")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_doctor)

    s = sub.add_parser("config", help="where the config is, what it says, whether it is valid")
    s.add_argument("action", choices=["path", "show", "check"])
    s.set_defaults(func=cmd_config)


def _add_other_commands(sub) -> None:
    s = sub.add_parser("sessions", help="list, show, export or delete chat sessions")
    ss = s.add_subparsers(dest="action", required=True)
    m = ss.add_parser("list")
    m.add_argument("--json", action="store_true")
    for name in ("show", "export", "delete"):
        m = ss.add_parser(name)
        m.add_argument("id")
        m.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sessions)

    s = sub.add_parser("plugins", help="list plugins, or write a new one")
    ps = s.add_subparsers(dest="action", required=True)
    m = ps.add_parser("list", help="name, version, source, hooks, status and errors")
    m.add_argument("--json", action="store_true")
    m = ps.add_parser("new", help="write a working plugin package (pyproject, one skill, one test)")
    m.add_argument("name")
    m.add_argument("--dir", default=".", help="where to create it (default: here)")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("tui", help="the terminal UI (also what `assistant` with no command opens)")
    s.add_argument("--no-start", action="store_true", help="wait for a daemon instead of starting one")
    s.set_defaults(func=cmd_tui)

    s = sub.add_parser("skills", help="list or call plugins' skills")
    ks = s.add_subparsers(dest="action", required=True)
    m = ks.add_parser("list")
    m.add_argument("--json", action="store_true")
    m = ks.add_parser("call", help="call a skill: assistant skills call vision.ocr '{\"path\": \"scan.png\"}'")
    m.add_argument("name")
    m.add_argument("arguments", nargs="?", help="a JSON object; a relative `path` (or `*_path`) is taken from "
                                                "this directory")
    m.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_skills)


def _add_plugin_commands(parser: argparse.ArgumentParser, options: argparse.Namespace) -> None:
    """Let plugins add subcommands (register_commands). Skipped with --no-plugins."""
    if options.no_plugins:
        return
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    try:
        from assistant.config import ConfigError, load_config

        config = load_config(paths.config_path(options.config) if options.config else None)
    except ConfigError:
        return  # the command itself will report the config error
    except Exception:  # noqa: BLE001 - a broken config must not break --help
        return
    _plugin_host(options, config).call("register_commands", cli=sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    options, rest = _global_options(argv)
    if _wants_plugin_command(options, rest):
        _add_plugin_commands(parser, options)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            parser.print_help()  # no terminal to draw the TUI in
            return 0
        args.func = cmd_tui
    try:
        return args.func(args) or 0
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RPCError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


_CORE_COMMANDS = {"serve", "daemon", "ask", "bench", "models", "status", "doctor", "config", "sessions", "plugins",
                  "skills", "tui"}


def _wants_plugin_command(options: argparse.Namespace, rest: list[str]) -> bool:
    """Load plugins for the parser only when the command is not a core one (or for
    help), so core commands start fast. ``rest``: argv without the global options."""
    words = [a for a in rest if not a.startswith("-")]
    return (not words and options.help) or (bool(words) and words[0] not in _CORE_COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
