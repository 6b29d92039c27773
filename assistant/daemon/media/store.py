"""The media store: checked media kept content-addressed under ``<data_dir>/media``.

A medium lives at ``media/<sha[:2]>/<sha256>.<ext>``: the same bytes are
stored once, whoever sent them and however often; a session's message names
its media by sha256 (and mime, which gives the extension), so a session
replays and exports after a restart. Directories are 0700 and files 0600
(media are as private as the chat history); a file is written to a
temporary name in its directory, fsynced, renamed into place and the
directory fsynced, so a crash leaves the old state or the whole file,
never part of one. Nothing here is named by a client: paths are built from
a sha256 checked to be 64 hex digits, and an extension from a fixed table.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from assistant.daemon.files import write_atomically
from assistant.daemon.media.checks import EXTENSIONS

__all__ = ["MediaStore", "MediaStoreError", "is_sha256"]

_SHA256 = re.compile(r"[0-9a-f]{64}")


class MediaStoreError(Exception):
    """A medium that is not in the store, or one the store could not write."""


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 as the store names media (64 lowercase hex digits)."""
    return isinstance(value, str) and _SHA256.fullmatch(value) is not None


class MediaStore:
    """Media files under ``root`` (``<data_dir>/media``), by content hash."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, sha256: str, mime: str) -> Path:
        """Where the medium ``sha256`` of type ``mime`` is (or would be) kept."""
        if not is_sha256(sha256):
            raise MediaStoreError(f"not a media hash: {sha256!r}")
        ext = EXTENSIONS.get(mime)
        if ext is None:
            raise MediaStoreError(f"not a stored media type: {mime!r}")
        return self.root / sha256[:2] / f"{sha256}.{ext}"

    def find(self, sha256: str, mime: str) -> Path:
        """The stored file of ``sha256``; MediaStoreError where it is missing (deleted by hand)."""
        path = self.path(sha256, mime)
        if not path.is_file():
            raise MediaStoreError(f"the medium {sha256[:12]}... ({mime}) is no longer in the media store "
                                  f"({self.root})")
        return path

    def put(self, data: bytes, mime: str) -> tuple[str, Path]:
        """Keep ``data`` (checked by ``checks``) and return its (sha256, path). The same
        bytes stored before are not written again."""
        sha = hashlib.sha256(data).hexdigest()
        path = self.path(sha, mime)
        if path.is_file() and path.stat().st_size == len(data):
            return sha, path
        self._dir(path.parent)
        write_atomically(path, data)
        return sha, path

    def _dir(self, d: Path) -> None:
        """``d`` (and the store's root) made 0700 if missing; an existing one is made 0700 too."""
        for p in (self.root, d):
            try:
                p.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise MediaStoreError(f"cannot create the media store folder {p}: {exc.strerror or exc}") from None
            if p.stat().st_mode & 0o077:
                os.chmod(p, 0o700)

