"""The daemon as a process on the machine: one per socket, and its files.

Three things happen before the daemon listens: its runtime directory is
made private, it takes the per-socket lock (so a second daemon is refused),
and a socket file left by a killed daemon is replaced. The kernel drops the
lock when the process dies, even by kill -9, so a stale lock never blocks a
restart.

Nothing another user controls is trusted on the way (docs/security.md): the
socket's directory and every directory above it must be changeable only by
this user or root, the default runtime directory must be this user's own
with no group or other bits, and the lock file is opened without following
a symbolic link and must be this user's own plain file.
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
from assistant.peer import describe_uid

log = logging.getLogger("assistant.daemon")


class DaemonError(Exception):
    """The daemon cannot start (another one runs, the socket is taken, ...)."""


# -- the socket's directory ------------------------------------------------------


def _writable_by_others(mode: int) -> str | None:
    """Who besides the owner may create, rename or delete entries (the sticky bit stops the last two)."""
    if mode & stat.S_ISVTX:
        return None
    who = [name for bit, name in ((stat.S_IWGRP, "its group"), (stat.S_IWOTH, "every user")) if mode & bit]
    return " and ".join(who) or None


def why_untrusted(path: Path) -> str | None:
    """Why someone but this user or root could replace ``path`` or anything in it (None: nobody can).

    Any file the daemon trusts can be checked with it (the socket's directory
    here; plugin files and their directories would be the next).

    Each component is looked at with ``lstat``: a symbolic link counts by its
    owner (only the owner can change where it points); where it points is
    checked by the caller on the resolved path.
    """
    trusted = (0, os.geteuid())
    for part in (path, *path.parents):
        st = os.lstat(part)
        if st.st_uid not in trusted:
            return f"{part} belongs to {describe_uid(st.st_uid)}"
        if stat.S_ISLNK(st.st_mode):
            continue
        who = _writable_by_others(st.st_mode)
        if who is not None:
            return f"{part} can be written by {who} (mode {stat.S_IMODE(st.st_mode):04o}, no sticky bit)"
    return None


def _check_private(directory: Path) -> None:
    """The default runtime dir: a real directory (not a link), ours, no group or other bits."""
    st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise DaemonError(f"refusing the runtime directory {directory}: it is a symbolic link "
                          f"(owned by {describe_uid(st.st_uid)}); remove it and start again")
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"refusing the runtime directory {directory}: it is not a directory")
    if st.st_uid != os.geteuid():
        raise DaemonError(f"refusing the runtime directory {directory}: it belongs to {describe_uid(st.st_uid)}, "
                          f"not to {describe_uid(os.geteuid())}; another user made it, so they could replace "
                          "the socket or plant files in it. Remove it (or set XDG_RUNTIME_DIR / --socket)")
    if st.st_mode & 0o077:
        raise DaemonError(f"refusing the runtime directory {directory}: its mode is {stat.S_IMODE(st.st_mode):04o}, "
                          "so other users may have used it; it must be 0700. Check what is in it, then "
                          f"`chmod 700 {directory}` or remove it")


def check_socket_dir(directory: Path, *, private: bool) -> None:
    """Refuse a socket directory that another user could tamper with (DaemonError says why).

    Every directory from ``/`` down to ``directory``, before and after
    resolving links, must be owned by this user or root and not writable by
    others unless sticky (as /tmp). ``private`` (the default runtime dir)
    also asks that ``directory`` itself be ours, 0700 and not a link.
    """
    absolute = Path(os.path.abspath(directory))
    for candidate in (absolute, Path(os.path.realpath(absolute))):
        reason = why_untrusted(candidate)
        if reason is not None:
            raise DaemonError(f"refusing the socket directory {directory}: {reason}; another user could replace "
                              "the socket or plant files beside it. Use a directory only you can write to")
    if private:
        _check_private(absolute)


def prepare_runtime_dir(sock_path: Path) -> None:
    """Create the socket's directory (0700) if missing, then check it (:func:`check_socket_dir`).

    The default runtime dir is created with one ``mkdir`` (never ``chmod``-ed
    into shape: a dir we did not make is refused, not adopted); a missing
    directory for an explicit ``--socket`` is created with its parents.
    """
    parent = sock_path.parent
    private = Path(os.path.abspath(parent)) == Path(os.path.abspath(paths.runtime_dir()))
    try:
        if private:
            os.mkdir(parent, 0o700)
        else:
            parent.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise DaemonError(f"cannot create the socket directory {parent}: {exc.strerror}") from None
    check_socket_dir(parent, private=private)


# -- the lock ---------------------------------------------------------------------


def _open_lock(lock_file: Path) -> int:
    """Open (or create, 0600) the lock file without following a link; only our own plain file will do."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(lock_file, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DaemonError(f"refusing the lock file {lock_file}: it is a symbolic link; remove it") from None
        raise DaemonError(f"cannot open the lock file {lock_file}: {exc.strerror}") from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"it belongs to {describe_uid(st.st_uid)}"
    elif st.st_nlink != 1:
        problem = f"it has {st.st_nlink} hard links (it may be another file's name)"
    if problem is not None:
        os.close(fd)
        raise DaemonError(f"refusing the lock file {lock_file}: {problem}; remove it")
    return fd


def acquire_lock(lock_file: Path) -> int:
    """Hold an exclusive flock on ``lock_file`` for the life of the process.

    Returns the file descriptor, which the caller closes at exit. The pid of
    the holder is written into the file so a refused daemon can name it; the
    file is truncated only once it is known to be our own (see _open_lock).
    """
    fd = _open_lock(lock_file)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonError(f"another daemon (pid {pid}) is already running on this socket; lock: {lock_file}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# -- the socket --------------------------------------------------------------------


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
        try:
            sock_path.unlink()
        except OSError as exc:
            raise DaemonError(f"cannot replace the stale socket {sock_path}: {exc.strerror}") from None
        return
    finally:
        probe.close()
    raise DaemonError(f"{sock_path} is in use by a process that does not hold the daemon lock; refusing to replace it")


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
