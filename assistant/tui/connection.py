"""Connecting the TUI to the daemon, with every failure turned into a sentence.

``open_client`` wraps ``Client.connect``: it refuses a path that exists but is
not a socket (so a daemon is never started over somebody's file), bounds the
``initialize`` handshake (a socket that accepts and never answers is not a
daemon), and raises :class:`ConnectFailure` with a message for people and
whether trying again later makes sense. Nothing here imports Textual.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Callable

from assistant import paths
from assistant.client import Client, DaemonNotRunning, DaemonStartError, UntrustedDaemon
from assistant.protocol import PROTOCOL_VERSION, ErrorCode, RPCError

HANDSHAKE_TIMEOUT = 5.0
START_TIMEOUT = 120.0


class ConnectFailure(Exception):
    """Could not connect. ``message`` is for people; ``retry``: worth trying again
    later by itself (no daemon yet), as opposed to a problem someone must fix."""

    def __init__(self, message: str, *, retry: bool, not_running: bool = False):
        super().__init__(message)
        self.message = message
        self.retry = retry
        self.not_running = not_running


async def open_client(socket_path: str | os.PathLike | None, *, start: bool, config_path: str | None = None,
                      flags: list[str] | None = None, on_starting: Callable[[], None] | None = None,
                      client_name: str = "assistant-tui") -> Client:
    """A connected, initialized client, or ConnectFailure."""
    sock = paths.socket_path(socket_path)
    _check_is_socket(sock)
    try:
        return await asyncio.wait_for(Client.connect(sock, client_name=client_name, start=False),
                                      HANDSHAKE_TIMEOUT)
    except DaemonNotRunning:
        if not start:
            raise ConnectFailure(f"No daemon is listening on {sock}.", retry=True, not_running=True) from None
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a message
        raise _failure(exc, sock) from None
    # Nothing listens: start a daemon (the caller shows that it is doing so).
    if on_starting is not None:
        on_starting()
    try:
        return await asyncio.wait_for(
            Client.connect(sock, client_name=client_name, start=True, config_path=config_path, flags=flags,
                           start_timeout=START_TIMEOUT),
            START_TIMEOUT + HANDSHAKE_TIMEOUT)
    except BaseException as exc:  # noqa: BLE001
        raise _failure(exc, sock) from None


def _check_is_socket(sock: Path) -> None:
    try:
        st = os.stat(sock)
    except FileNotFoundError:
        return
    except PermissionError:
        raise ConnectFailure(f"Permission denied on {sock}: it belongs to another user.", retry=False) from None
    except OSError as exc:
        raise ConnectFailure(f"Cannot use {sock}: {exc.strerror or exc}.", retry=False) from None
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
        raise ConnectFailure(f"{sock} is {kind}, not a daemon socket. Check --socket / ASSISTANT_SOCKET.",
                             retry=False)


def _failure(exc: BaseException, sock: Path) -> BaseException:
    if isinstance(exc, ConnectFailure):
        return exc
    if isinstance(exc, asyncio.CancelledError):
        return exc
    if isinstance(exc, DaemonNotRunning):
        return ConnectFailure(f"No daemon is listening on {sock}.", retry=True, not_running=True)
    if isinstance(exc, UntrustedDaemon):  # another user's socket: never retried, never sent a prompt
        return ConnectFailure(exc.message, retry=False)
    if isinstance(exc, DaemonStartError):
        detail = str(exc).strip()
        lines = detail.splitlines()
        if len(lines) > 8:
            detail = "\n".join(lines[:1] + ["..."] + lines[-6:])
        return ConnectFailure(f"Could not start the daemon: {detail}", retry=False)
    if isinstance(exc, RPCError):
        if exc.code == ErrorCode.INCOMPATIBLE_VERSION:
            theirs = (exc.data or {}).get("protocol_version", "?") if isinstance(exc.data, dict) else "?"
            return ConnectFailure(
                f"The daemon on {sock} speaks protocol version {theirs}; this TUI speaks {PROTOCOL_VERSION}. "
                "Upgrade the older one (then restart the daemon: `assistant daemon stop`).", retry=False)
        if exc.code == ErrorCode.PARSE_ERROR:
            return ConnectFailure(f"{sock} is not an assistant daemon: it answered something that is not "
                                  "JSON-RPC.", retry=False)
        return ConnectFailure(f"The daemon on {sock} refused the connection: {exc.message}", retry=False)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ConnectFailure(f"{sock} did not answer the handshake within {HANDSHAKE_TIMEOUT:.0f} s: "
                              "is it an assistant daemon?", retry=False)
    if isinstance(exc, PermissionError):
        return ConnectFailure(f"Permission denied on {sock}: it belongs to another user.", retry=False)
    if isinstance(exc, ConnectionError):
        return ConnectFailure(f"{sock} closed the connection during the handshake: is it an assistant daemon? "
                              "(If a daemon is stopping, it will be retried.)", retry=True)
    if isinstance(exc, OSError):
        return ConnectFailure(f"Cannot connect to {sock}: {exc.strerror or exc}.", retry=False)
    return ConnectFailure(f"Cannot connect to {sock}: {type(exc).__name__}: {exc}", retry=False)


# What a daemon call can fail with once connected (AttributeError: the connection went away
# meanwhile, and the app's client is None).
CALL_FAILURES = (RPCError, ConnectionError, AttributeError)


def failure_text(exc: BaseException) -> str:
    """What went wrong with a daemon call, in the daemon's words when it said something."""
    return str(getattr(exc, "message", exc))
