"""`assistant models pull NAME|URL`: fetch a model and its companions, with progress, and record its alias.

The work is :mod:`assistant.config.pull` (what to fetch, and the alias) and
:mod:`assistant.config.download` (one resumable, checked transfer); this
module is the command: its options, the progress bar (redrawn in place on a
terminal, a line per tenth otherwise) and the messages. It runs without the
daemon: a running daemon reads the new alias the next time it is named.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from assistant.config.catalog import CATALOG


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", metavar="NAME|URL",
                   help="a catalog name (run without it to list them) or the http(s) URL of a GGUF file")
    p.add_argument("--name", help="the alias to record (default: the catalog name, or the file's name)")
    p.add_argument("--sha256", help="the sha256 the model file must have (replaces the catalog's pin)")
    p.add_argument("--mtp", metavar="URL", help="also fetch this MTP drafter (mtp-*.gguf) beside the model")
    p.add_argument("--mmproj", metavar="URL", help="also fetch this media projector (mmproj-*.gguf) beside it")
    p.add_argument("--force", action="store_true", help="fetch again files already pulled; replace an alias "
                   "pulled from elsewhere")
    p.add_argument("--retries", type=int, default=3, help="retries after a broken connection, each resuming "
                   "where it stopped (default 3)")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    from assistant.cli import CLIError, _load_config
    from assistant.config.download import DownloadError
    from assistant.config.models import models_dir
    from assistant.config.pull import plan_pull, run_pull

    if not args.source:
        return _print_catalog(args.json)
    config = _load_config(args)
    try:
        plan = plan_pull(args.source, models_dir=models_dir(config), name=args.name, sha256=args.sha256,
                         mtp=args.mtp, mmproj=args.mmproj)
    except DownloadError as exc:
        raise CLIError(str(exc)) from None
    if plan.name in (getattr(config, "models", None) or {}):
        print(f"note: the config's models: entry {plan.name!r} has the same name and wins over this pull; "
              "choose another alias with --name to use both", file=sys.stderr)
    bars: list[_Bar] = []

    def progress_for(f):
        bars.append(_Bar(f"{f.role} {f.transfer.dest.name}", sys.stderr))
        return bars[-1]

    def on_file(f, what: str) -> None:
        if what == "present":
            print(f"{f.role}: {f.transfer.dest.name} is already pulled", file=sys.stderr)

    try:
        result = run_pull(plan, force=args.force, progress_for=progress_for, on_file=on_file,
                          retries=max(0, args.retries))
    except DownloadError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: what arrived is kept (as .part) in {plan.directory}; run the same command again "
              "to resume", file=sys.stderr)
        return 130
    finally:
        for bar in bars:
            bar.close()
    _report(result, args.json)
    return 0 if result.ok else 1


def _report(result, as_json: bool) -> None:
    plan = result.plan
    if as_json:
        print(json.dumps(_result_json(result), indent=2))
        return
    print(f"pulled {plan.name} into {plan.directory}")
    for f in sorted(plan.files, key=lambda f: f.role != "model"):
        got = result.fetched.get(f.role)
        if f.role in result.failed:
            print(f"  {f.role:<7} failed: {result.failed[f.role]}")
        elif got is not None:
            checked = f"sha256 checked against {got.verified}" if got.verified else (
                f"sha256 {got.sha256} (nothing published to check it against; pass --sha256 to)")
            resumed = f", resumed at {_human(got.resumed_from)}" if got.resumed_from else ""
            print(f"  {f.role:<7} {got.path.name}  {_human(got.size)}{resumed}  {checked}")
        else:
            print(f"  {f.role:<7} {f.transfer.dest.name}  already pulled")
    print(f"use it: assistant ask -m {plan.name} \"...\"  (assistant models list shows it)")


def _result_json(result) -> dict[str, Any]:
    plan = result.plan
    files = {}
    for f in plan.files:
        got = result.fetched.get(f.role)
        files[f.role] = {"path": str(f.transfer.dest),
                         "status": ("failed" if f.role in result.failed else "fetched" if got else "present"),
                         "error": str(result.failed[f.role]) if f.role in result.failed else None,
                         "size": got.size if got else None, "sha256": got.sha256 if got else None,
                         "verified": got.verified if got else None,
                         "resumed_from": got.resumed_from if got else None}
    return {"name": plan.name, "directory": str(plan.directory), "source": plan.source,
            "manifest": str(result.manifest) if result.manifest else None, "ok": result.ok, "files": files}


def _print_catalog(as_json: bool) -> int:
    if as_json:
        print(json.dumps([{"name": e.name, "description": e.description,
                           "files": [{"role": f.role, "repo": f.repo, "path": f.path, "url": f.url,
                                      "size": f.size, "sha256": f.sha256} for f in e.files]}
                          for e in CATALOG.values()], indent=2))
        return 0
    print("models `assistant models pull NAME` knows (or give the http(s) URL of a GGUF file):")
    for e in CATALOG.values():
        roles = " + ".join(f.role for f in e.files)
        print(f"  {e.name:<16} {roles:<22} {e.description}")
        print(f"  {'':<16} from {e.model.repo}")
    return 0


def _human(n: int | None) -> str:
    """Sizes as `assistant models list` prints them (KiB, MiB, GiB)."""
    from assistant.cli import _human_bytes

    return "?" if n is None else "0 B" if n == 0 else _human_bytes(n)


class _Bar:
    """Progress of one file: redrawn in place on a terminal (at most 10 times a second), else a
    plain line at each further tenth (or each 100 MB when the size is not known)."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label, self.stream = label, stream
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.start: tuple[float, int] | None = None
        self.last_draw = 0.0
        self.last_step = -1
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if self.start is None:
            self.start = (now, done)
            if done:
                self._line(f"{self.label}: resuming at {_human(done)}")
        if self.tty:
            if now - self.last_draw >= 0.1 or (total is not None and done >= total):
                self.last_draw = now
                self._draw(done, total, now)
            return
        step = int(done * 10 / total) if total else done // 100_000_000
        if step > self.last_step:
            self.last_step = step
            pct = f"{done * 100 // total}% " if total else ""
            self._line(f"{self.label}: {pct}{_human(done)}" + (f" of {_human(total)}" if total else ""))

    def _draw(self, done: int, total: int | None, now: float) -> None:
        t0, d0 = self.start or (now, done)
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if total:
            filled = int(24 * done / total) if total else 0
            eta = f"  {int((total - done) / rate)}s left" if rate > 0 and done < total else ""
            text = (f"\r{self.label}  [{'#' * filled}{'.' * (24 - filled)}] {done * 100 // total:3d}%  "
                    f"{_human(done)}/{_human(total)}  {_human(int(rate))}/s{eta}   ")
        else:
            text = f"\r{self.label}  {_human(done)}  {_human(int(rate))}/s   "
        self.stream.write(text)
        self.stream.flush()
        self.drawn = True

    def _line(self, text: str) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
