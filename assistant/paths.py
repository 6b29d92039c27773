"""Where things live on disk: one place that answers it for every command.

platformdirs gives the per-user directories (and honours the XDG_* variables
on Linux, which is how the tests isolate themselves). ``ASSISTANT_CONFIG``
and ``ASSISTANT_SOCKET`` override the two paths users most often move.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import platformdirs

APP = "assistant"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP, appauthor=False))


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP, appauthor=False))


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP, appauthor=False))


def log_dir() -> Path:
    return Path(platformdirs.user_log_dir(APP, appauthor=False))


def runtime_dir() -> Path:
    """A private directory for the socket and lock file.

    platformdirs names $XDG_RUNTIME_DIR/assistant on Linux; where that has no
    usable parent (root in a container has no /run/user/0) we fall back to a
    per-user folder in the temp dir. The daemon creates it with mode 0700 and
    refuses one it did not make: another user's, a link, or one with group or
    other bits (``assistant.daemon.process.check_socket_dir``; the temp dir is
    shared, so someone may have made ``assistant-<uid>`` first).
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; the fallback below covers it.
        warnings.simplefilter("ignore")
        path = Path(platformdirs.user_runtime_dir(APP, appauthor=False))
    if path.parent.is_dir() and os.access(path.parent, os.W_OK):
        return path
    return Path(tempfile.gettempdir()) / f"{APP}-{os.getuid()}"


def default_config_path() -> Path:
    return config_dir() / "config.yaml"


def config_path(explicit: str | os.PathLike | None = None) -> Path:
    """--config, then $ASSISTANT_CONFIG, then config.yaml in the user config dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("ASSISTANT_CONFIG")
    if env:
        return Path(env).expanduser()
    return default_config_path()


def socket_path(explicit: str | os.PathLike | None = None) -> Path:
    """--socket, then $ASSISTANT_SOCKET, then assistant.sock in the runtime dir."""
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("ASSISTANT_SOCKET")
    if env:
        return Path(env).expanduser()
    return runtime_dir() / "assistant.sock"


def lock_path(sock: Path) -> Path:
    """The lock file that makes one daemon per socket (and so one per user)."""
    return sock.with_name(sock.name + ".lock")


def database_path() -> Path:
    return data_dir() / "assistant.db"


def log_file() -> Path:
    return log_dir() / "daemon.log"
