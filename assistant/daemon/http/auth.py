"""API keys: where they come from and how a request's key is checked.

Keys come from ``http.api_keys`` and ``http.api_key_file`` (one key per
line; blank lines and ``#`` comments skipped), so a key need not sit in the
config file. The key file must be a plain file that only this user (or
root) can change, since whoever can write it can let themselves in.

A request's key (``Authorization: Bearer KEY``) is compared with every
configured key in constant time: both sides are hashed (SHA-256) first, so
the comparison's time depends neither on where they differ nor on their
lengths, and every key is compared, so nor does it say which one matched
by when it stops. The match is the key's index: it names the client for
scheduling (each key takes its turn).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
from pathlib import Path

from assistant.daemon.process import DaemonError, why_untrusted

log = logging.getLogger("assistant.daemon.http")


class KeyRing:
    """The accepted API keys, as digests."""

    def __init__(self, keys: list[str]):
        self._digests = [_digest(k) for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    @classmethod
    def load(cls, api_keys: list[str], api_key_file: str | None) -> "KeyRing":
        """The keys of the config and its key file; DaemonError for a bad key or key file."""
        keys = [_checked(k, "http.api_keys") for k in api_keys]
        if api_key_file:
            keys += _read_key_file(Path(os.path.expanduser(api_key_file)))
        return cls(keys)

    def match(self, given: str) -> int | None:
        """The index of the key ``given`` is, or None; constant time (see the module docstring)."""
        probe = _digest(given)
        found = None
        for i, digest in enumerate(self._digests):
            if hmac.compare_digest(probe, digest) and found is None:
                found = i
        return found


def bearer(header: str | None) -> str | None:
    """The key in an ``Authorization: Bearer KEY`` header (None when there is none)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _checked(key: object, where: str) -> str:
    if not isinstance(key, str) or not key.strip():
        raise DaemonError(f"{where}: an API key must be a non-empty string")
    if any(c.isspace() for c in key.strip()):
        raise DaemonError(f"{where}: an API key cannot contain spaces")
    return key.strip()


def _read_key_file(path: Path) -> list[str]:
    try:
        st = path.stat()
    except OSError as exc:
        raise DaemonError(f"http.api_key_file: cannot read {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise DaemonError(f"http.api_key_file: {path} is not a plain file")
    reason = why_untrusted(Path(os.path.realpath(path)))
    if reason is not None:
        raise DaemonError(f"http.api_key_file: refusing {path}: {reason}; another user could add a key to it")
    if st.st_mode & 0o044:
        log.warning("http.api_key_file %s can be read by other users (mode %04o): chmod 600 it",
                    path, stat.S_IMODE(st.st_mode))
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DaemonError(f"http.api_key_file: cannot read {path}: {exc}") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise DaemonError(f"http.api_key_file: {path} holds no key")
    return [_checked(k, f"http.api_key_file ({path})") for k in keys]
