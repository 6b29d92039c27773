"""Files the daemon writes whole: never half-written, never readable by others.

One way to do it for every such file (a stored medium, an export and the media
copied beside it): a 0600 temporary file in the target's directory (``mkstemp``,
``O_EXCL``), filled, fsynced, renamed over the target, and the directory fsynced
so the rename itself survives a crash. A crash leaves the old state or the whole
new file; a failure removes the temporary file and raises.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["write_atomically"]


def write_atomically(path: Path, fill: bytes | Callable[[BinaryIO], None]) -> None:
    """``path`` replaced by ``fill`` (bytes, or a function that writes to the open file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(fill, bytes):
                f.write(fill)
            else:
                fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    """The rename made durable: fsync of its directory (where the platform allows it)."""
    try:
        fd = os.open(d, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
