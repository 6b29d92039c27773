"""Who is at the other end of a Unix socket: both sides of the daemon's socket ask.

The daemon refuses a client of another uid; the client refuses a daemon of
another uid before it sends anything (docs/security.md).
"""

from __future__ import annotations

import pwd
import socket
import struct
import sys


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a Unix socket, or None if unknown."""
    if hasattr(socket, "SO_PEERCRED"):  # Linux
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    if sys.platform == "darwin":  # getpeereid() is LOCAL_PEERCRED on SOL_LOCAL (0)
        LOCAL_PEERCRED = 0x001
        xucred = sock.getsockopt(0, LOCAL_PEERCRED, struct.calcsize("IIh16I"))
        return struct.unpack_from("IIh", xucred)[1]
    return None


def describe_uid(uid: int) -> str:
    """``user 'ada' (uid 1000)``, or ``uid 1000`` for a uid without a name."""
    try:
        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
