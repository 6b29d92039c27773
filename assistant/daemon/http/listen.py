"""Where the HTTP API listens (``http.listen``), and the rules for opening it.

``listen`` takes ``127.0.0.1:PORT``, ``[::1]:PORT``, ``HOST:PORT`` (a name or
an address; ``localhost`` counts as loopback when every address it resolves
to is one) or ``unix:PATH`` (HTTP over a Unix socket, as llama-server and
vLLM offer). Port 0 takes a free port (the log says which).

Binding anything but loopback or a Unix socket without an API key is refused
at start, with the reason (:func:`check_exposure`): the API runs models and
reads sessions, so on a network it must not be open to everyone.

The sockets are made here, synchronously, so that nothing else runs between
setting the umask and binding: a Unix socket is 0600 from the moment it
exists, in a directory checked like the JSON-RPC socket's (every directory
above it changeable only by this user or root; ``process.check_socket_dir``).
A socket file left by a killed daemon is replaced; one somebody listens on
is refused.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from assistant.daemon.process import DaemonError, check_socket_dir


@dataclass(frozen=True)
class Listen:
    """A parsed ``http.listen``: TCP (``host``, ``port``) or a Unix socket (``path``)."""

    text: str
    host: str | None = None
    port: int | None = None
    path: Path | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None


def parse(text: str) -> Listen:
    """``text`` as a Listen; DaemonError naming what is wrong with it."""
    raw = text.strip()
    if raw.startswith("unix:"):
        path = raw[len("unix:"):]
        if not path:
            raise DaemonError("http.listen: 'unix:' needs a path (unix:/path/to/api.sock)")
        p = Path(os.path.expanduser(path))
        if len(os.fsencode(str(p.absolute()))) > 100:
            raise DaemonError(f"http.listen: the socket path {p} is too long for a Unix socket (about 100 bytes)")
        return Listen(raw, path=p.absolute())
    if raw.startswith("["):
        host, sep, port = raw[1:].partition("]:")
        if not sep:
            raise DaemonError(f"http.listen: expected [IPV6]:PORT, got {text!r}")
    else:
        host, sep, port = raw.rpartition(":")
        if not sep or not host or ":" in host:
            raise DaemonError(f"http.listen: expected 127.0.0.1:PORT, [::1]:PORT, HOST:PORT or unix:PATH, got {text!r}")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DaemonError(f"http.listen: the port must be a number from 0 to 65535, got {port!r}")
    return Listen(raw, host=host, port=int(port))


def addresses(spec: Listen) -> list[tuple[int, str]]:
    """(family, address) of every address the host resolves to; DaemonError when none."""
    try:
        infos = socket.getaddrinfo(spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise DaemonError(f"http.listen: cannot resolve {spec.host!r}: {exc.strerror}") from None
    return [(family, addr[0]) for family, _, _, _, addr in infos]


def is_loopback(spec: Listen) -> bool:
    """Whether only this machine can connect: a Unix socket, or a host whose every address is loopback."""
    if spec.is_unix:
        return True
    return all(ipaddress.ip_address(addr.split("%")[0]).is_loopback for _, addr in addresses(spec))


def check_exposure(spec: Listen, have_keys: bool) -> None:
    """Refuse (DaemonError, with the reason and the fix) a bind others can reach without an API key."""
    if have_keys or is_loopback(spec):
        return
    raise DaemonError(
        f"refusing to serve the HTTP API on {spec.text}: that address is reachable from other machines and no "
        "API key is set, so anyone who can reach it could use the models and read the sessions. Set "
        "http.api_keys or http.api_key_file, or listen on 127.0.0.1, [::1] or unix:PATH")


def tcp_socket(spec: Listen) -> socket.socket:
    """A listening TCP socket on the host's first address; DaemonError when it cannot bind."""
    family, addr = addresses(spec)[0]
    try:
        return socket.create_server((addr, spec.port), family=family, backlog=128)
    except OSError as exc:
        raise DaemonError(f"cannot listen for HTTP on {spec.text}: {exc.strerror or exc}") from None


def unix_socket(spec: Listen) -> socket.socket:
    """A listening Unix socket at ``spec.path``, mode 0600, in a checked directory."""
    path = spec.path
    parent = path.parent
    try:
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise DaemonError(f"cannot create the HTTP socket's directory {parent}: {exc.strerror}") from None
    check_socket_dir(parent, private=False)
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # 0600 from the moment it exists: no window for another user to connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise DaemonError(f"cannot listen for HTTP on {spec.text}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


def _clear_stale(path: Path) -> None:
    """Remove a socket file nobody listens on; refuse anything else at ``path``."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise DaemonError(f"http.listen: {path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise DaemonError(f"http.listen: something already listens on {path} (another daemon?); refusing to replace it")

