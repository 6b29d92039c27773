"""The daemon as a process on the machine: one per socket, and its files.

Three things happen before the daemon listens: its runtime directory is
made private, it takes the per-socket lock (so a second daemon is refused),
and a socket file left by a killed daemon is replaced. The kernel drops the
lock when the process dies, even by kill -9, so a stale lock never blocks a
restart.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
from pathlib import Path

from assistant import paths

log = logging.getLogger("assistant.daemon")


class DaemonError(Exception):
    """The daemon cannot start (another one runs, the socket is taken, ...)."""


def acquire_lock(lock_file: Path) -> int:
    """Hold an exclusive flock on ``lock_file`` for the life of the process.

    Returns the file descriptor, which the caller closes at exit. The pid of
    the holder is written into the file so a refused daemon can name it.
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonError(f"another daemon (pid {pid}) is already running on this socket; lock: {lock_file}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def clear_stale_socket(sock_path: Path) -> None:
    """Remove a socket file nobody listens on (we hold the lock, so no daemon does)."""
    if not sock_path.exists() and not sock_path.is_symlink():
        return
    if not stat.S_ISSOCK(sock_path.lstat().st_mode):
        raise DaemonError(f"{sock_path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(sock_path))
    except OSError:
        log.info("replacing stale socket %s", sock_path)
        sock_path.unlink()
        return
    finally:
        probe.close()
    raise DaemonError(f"{sock_path} is in use by a process that does not hold the daemon lock; refusing to replace it")


def prepare_runtime_dir(sock_path: Path) -> None:
    """Create the socket's directory (0700); our own runtime dir is made private whatever the umask was."""
    parent = sock_path.parent
    if not parent.exists():
        parent.mkdir(mode=0o700, parents=True)
    if parent == paths.runtime_dir():
        os.chmod(parent, 0o700)


class ProcessGuard:
    """The daemon's hold on its socket path: runtime dir, lock and stale socket.

    ``acquire()`` before listening, ``release()`` after the server closed.
    """

    def __init__(self, socket_path: Path):
        self.socket_path = socket_path
        self._lock_fd: int | None = None

    def acquire(self) -> None:
        prepare_runtime_dir(self.socket_path)
        self._lock_fd = acquire_lock(paths.lock_path(self.socket_path))
        clear_stale_socket(self.socket_path)

    def release(self) -> None:
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
