"""``assistant automations ...``: the CLI of the filewatch plugin."""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
from typing import Any


def add_commands(cli) -> None:
    p = cli.add_parser("automations", help="file-watching automations: list, show, log, test, enable, disable")
    sub = p.add_subparsers(dest="automations_action", required=True)
    s = sub.add_parser("list", help="rules, whether enabled, last run")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("show", help="one rule and its recent runs")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("log", help="recent runs (of one rule, or all)")
    s.add_argument("id", nargs="?")
    s.add_argument("--limit", type=int, default=20)
    s.add_argument("--json", action="store_true")
    s = sub.add_parser("test", help="run a rule on a file now and print its trace")
    s.add_argument("id")
    s.add_argument("path")
    s.add_argument("--dry-run", action="store_true", help="evaluate and record, change nothing")
    s.add_argument("--json", action="store_true")
    for name in ("enable", "disable"):
        s = sub.add_parser(name, help=f"{name} a rule (remembered across restarts)")
        s.add_argument("id")
        s.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


async def _call(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    from assistant.client import Client

    client = await Client.connect(args.socket, client_name="assistant-automations", start=True,
                                  config_path=args.config)
    try:
        return await client.call(method, params)
    finally:
        await client.close()


def _when(ts: float | None) -> str:
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _print_run(r: dict[str, Any]) -> None:
    print(f"#{r['id']} {r['rule_id']} {r['status']} {_when(r.get('started'))} "
          f"{r.get('duration_ms', '-')} ms {r.get('path')}")
    for c in r.get("conditions", []):
        print(f"    condition {c['condition']}: {'ok' if c['ok'] else 'FAILED'} ({c['detail']})")
    for a in r.get("actions", []):
        line = f"    action {a['type']}: {a.get('duration_ms')} ms"
        if a.get("error"):
            line += f" ERROR {a['error']}"
        print(line)
    if r.get("error"):
        print(f"    error: {r['error']}")


def run(args: argparse.Namespace) -> int:
    from assistant.protocol import RPCError

    action = args.automations_action
    params: dict[str, Any] = {}
    if getattr(args, "id", None):
        params["id"] = args.id
    method = f"automations.{action}"
    if action == "log":
        params["limit"] = args.limit
    if action == "test":
        params.update(path=args.path, dry_run=True if args.dry_run else None)
    try:
        data = asyncio.run(_call(args, method, params))
    except RPCError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (ConnectionError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0 if action != "test" or data["status"] in ("ok", "dry_run", "skipped") else 1
    if action == "list":
        for r in data["rules"]:
            last = r["last_run"]
            state = "enabled" if r["enabled"] else "disabled"
            print(f"{r['id']:<24} {state:<9} {r['mode']:<8} "
                  f"last: {last['status'] + ' ' + _when(last['started']) if last else 'never'}")
        for e in data["errors"]:
            print(f"error: {e}")
        for path, why in data["problems"].items():
            print(f"problem: {why}")
    elif action == "show":
        print(json.dumps({k: v for k, v in data.items() if k != "runs"}, indent=2))
        for r in data["runs"]:
            _print_run(r)
    elif action == "log":
        for r in data["runs"]:
            _print_run(r)
    elif action == "test":
        _print_run(data)
        return 0 if data["status"] in ("ok", "dry_run", "skipped") else 1
    else:
        print(f"{data['id']}: {'enabled' if data['enabled'] else 'disabled'}")
    return 0
