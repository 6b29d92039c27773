"""The chat input's history, kept between runs: one JSON string per line in the data dir."""

from __future__ import annotations

import json
from pathlib import Path

from assistant import paths

HISTORY_LIMIT = 500  # lines read back at start


def history_path() -> Path:
    """Where the TUI keeps what was typed (``tui-history.jsonl`` in the data dir)."""
    return paths.data_dir() / "tui-history.jsonl"


def load_history(path: Path | None) -> list[str]:
    """The last ``HISTORY_LIMIT`` messages in ``path``, oldest first; unreadable lines are skipped."""
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = []
    for line in lines[-HISTORY_LIMIT:]:
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(item, str):
            out.append(item)
    return out


def append_history(path: Path | None, text: str) -> None:
    """Add ``text`` to the history file (None: no history); a failure to write is ignored."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(text, ensure_ascii=False) + "\n")
    except OSError:
        pass  # history is a convenience; never an error on screen
