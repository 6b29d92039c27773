"""Logging of the daemon: to a file in the user log dir, and to stderr in the foreground."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from assistant import paths

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "info", *, stderr: bool = True) -> None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(FORMAT)
    log_file = paths.log_file()
    try:
        # Logs hold prompts' metadata and errors: private to the user (docs/security.md).
        log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(log_file, maxBytes=5 * 1024 * 1024, backupCount=3)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    except OSError as exc:  # an unwritable log dir must not stop the daemon
        print(f"warning: cannot write the log file {log_file}: {exc}", file=sys.stderr)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(fmt)
        root.addHandler(sh)
