"""Downloading model files: resumable, checked, never half-written under the final name.

A file is written to ``NAME.part`` beside its final place (with ``NAME.part.json``
saying which URL and which checksum it belongs to), resumed from where it
stopped with an HTTP ``Range`` request, fsynced, checked (size, sha256, and
that it is a GGUF file whose header reads), and only then renamed into place.

The sha256 it must have comes from the caller (the catalog's pin or
``--sha256``), else from the server: the hub publishes the sha256 of an LFS
file as ``X-Linked-ETag`` on its redirect; ``Repr-Digest`` / ``Digest``
(``sha-256``) are read too. A pin that disagrees with the server's digest is
refused before a byte is fetched.

Why the standard library's urllib rather than aiohttp (which the HTTP API
uses): ``models pull`` is a command that runs one transfer at a time and has
no event loop to share, and urllib follows redirects, sends a Range header
and honours a timeout. What it does not do by itself is done here: it
forwards every header to wherever a redirect leads, so the token goes in an
unredirected header, re-added only for a redirect to the same host; and it
forgets the redirect responses' headers, where the hub puts its digest, so a
redirect handler records them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backends.base import ModelLoadError
from backends.gguf import GGUF_MAGIC, read_metadata

from assistant.config.catalog import hf_endpoint

CHUNK = 1 << 20
Progress = Callable[[int, "int | None"], None]  # (bytes on disk, total or None)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\:]")


class DownloadError(Exception):
    """A download that did not produce the file; ``str()`` says why and what to do."""


class NotFound(DownloadError):
    """The server has no file at that URL (HTTP 404)."""


class ChecksumMismatch(DownloadError):
    """The file's sha256 is not the one it must have; nothing of it is kept."""


class NotGGUF(DownloadError):
    """What came is not a GGUF model file; nothing of it is kept."""


class DiskFull(DownloadError):
    """The disk (or a file-size limit) ran out; what arrived is kept in the .part file."""


class Interrupted(DownloadError):
    """The transfer broke off and the retries ran out; what arrived is kept in the .part file."""


class _Retry(Exception):
    """A failure worth another attempt (the connection broke, the server had a moment)."""


class _PinConflict(Exception):
    """The server publishes another sha256 than the one the file must have (seen on a redirect)."""

    def __init__(self, server: str) -> None:
        super().__init__(server)
        self.server = server


class _Restart(Exception):
    """The partial file cannot be continued: start again from byte 0 (not counted as an attempt)."""


# --------------------------------------------------------------------------
# Names and URLs


def check_url(url: str) -> urllib.parse.SplitResult:
    """``url`` split, if it is an http(s) URL with a host; DownloadError otherwise."""
    if not isinstance(url, str) or any(c.isspace() or ord(c) < 32 for c in url):
        raise DownloadError("a download URL may not contain spaces or control characters")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise DownloadError(f"only http:// and https:// URLs can be pulled, not {parts.scheme or 'no scheme'}:")
    if not parts.hostname:
        raise DownloadError(f"the URL names no host: {redact(url)}")
    return parts


def redact(url: str) -> str:
    """``url`` for messages: without user:password@ and without the query (signed URLs carry keys there)."""
    try:
        p = urllib.parse.urlsplit(url)
        host = p.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{p.port}" if p.port else "")
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))
    except ValueError:
        return "(an unreadable URL)"


def safe_filename(name: str) -> str:
    """``name`` if it can be a file's name inside the models dir: one plain name,
    not hidden, no path, no ``..``, no control characters; DownloadError otherwise."""
    if not name or name in (".", "..") or name.startswith(".") or _BAD_NAME_CHARS.search(name):
        raise DownloadError(f"refusing the file name {name!r}: it must be one plain, visible file name")
    if len(name.encode()) > 200:
        raise DownloadError(f"refusing a file name of {len(name.encode())} bytes (at most 200)")
    return name


def url_filename(url: str) -> str:
    """The file name a URL's path ends in, decoded and checked (:func:`safe_filename`)."""
    path = urllib.parse.unquote(check_url(url).path)
    return safe_filename(path.rstrip("/").rsplit("/", 1)[-1] if "/" in path else path)


def hf_token_for(url: str) -> str | None:
    """$HF_TOKEN, but only for a URL on the hub's own host: never sent to another server."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        return None
    host = urllib.parse.urlsplit(hf_endpoint()).hostname
    return token if host and urllib.parse.urlsplit(url).hostname == host else None


# --------------------------------------------------------------------------
# HTTP


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, recording each response's headers (the hub's digest is on its 302),
    refusing other schemes and https -> http, and re-adding the token only on the same host."""

    def __init__(self, token: str | None, host: str | None, expect: str | None) -> None:
        self.seen: list = []
        self.token, self.host, self.expect = token, host, expect

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        server = _server_sha256([headers])
        if self.expect and server and server != self.expect:
            raise _PinConflict(server)  # before the file itself is asked for
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if new.scheme not in ("http", "https"):
            raise DownloadError(f"refused a redirect from {redact(req.full_url)} to a {new.scheme or 'relative'} URL")
        if old.scheme == "https" and new.scheme == "http":
            raise DownloadError(f"refused a redirect from https to plain http ({redact(newurl)})")
        out = super().redirect_request(req, fp, code, msg, headers, newurl)
        if out is not None and self.token and new.hostname == self.host:
            out.add_unredirected_header("Authorization", f"Bearer {self.token}")
        return out


def _user_agent() -> str:
    try:
        from assistant import __version__
    except Exception:  # noqa: BLE001 - a missing version must not stop a download
        __version__ = "0"
    return f"local-assistant/{__version__} (models pull)"


def _open(url: str, offset: int, token: str | None, timeout: float, expect: str | None = None):
    """(response, headers of every response on the way) for a GET from ``offset``.

    An HTTP 416 comes back as its HTTPError (the partial file may be complete);
    other failures raise DownloadError, or _Retry where another try may help."""
    req = urllib.request.Request(url, headers={"User-Agent": _user_agent(), "Accept-Encoding": "identity"})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    host = urllib.parse.urlsplit(url).hostname
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    redirects = _Redirects(token, host, expect)
    opener = urllib.request.build_opener(redirects)
    try:
        resp = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc, redirects.seen + [exc.headers]
        exc.close()
        raise _http_error(exc.code, exc.reason, url, token) from None
    except urllib.error.URLError as exc:
        raise _Retry(f"cannot reach {host}: {getattr(exc.reason, 'strerror', None) or exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Retry(f"cannot reach {host}: {exc}") from None
    return resp, redirects.seen + [resp.headers]


def _http_error(code: int, reason: str, url: str, token: str | None) -> Exception:
    where = redact(url)
    if code == 404:
        return NotFound(f"not found (HTTP 404): {where}")
    if code in (401, 403):
        hint = ("the token in HF_TOKEN was not accepted for it" if token else
                "the repository may be gated: accept its licence on the hub and set HF_TOKEN to an access token")
        return DownloadError(f"access refused (HTTP {code}) for {where}: {hint}")
    if code == 429 or code >= 500:
        return _Retry(f"the server answered HTTP {code} {reason}")
    return DownloadError(f"the server answered HTTP {code} {reason} for {where}")


def _server_sha256(headers_seen) -> str | None:
    """The sha256 a server publishes for the file, from any response on the way, or None."""
    for headers in headers_seen:
        etag = (headers.get("X-Linked-ETag") or "").strip()
        etag = etag[2:] if etag.startswith("W/") else etag
        etag = etag.strip('"').lower()
        if _SHA256.match(etag):
            return etag
        for name in ("Repr-Digest", "Digest"):
            for part in (headers.get(name) or "").split(","):
                algo, _, value = part.strip().partition("=")
                if algo.strip().lower() in ("sha-256", "sha256"):
                    with contextlib.suppress(ValueError):
                        import base64

                        raw = base64.b64decode(value.strip().strip(":"), validate=True)
                        if len(raw) == 32:
                            return raw.hex()
    return None


def _total_size(resp, headers_seen) -> int | None:
    """The whole file's size: Content-Range's total, else Content-Length of a 200, else X-Linked-Size."""
    match = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", resp.headers.get("Content-Range") or "")
    if match:
        return int(match.group(1))
    if getattr(resp, "status", None) == 200 and (resp.headers.get("Content-Length") or "").isdigit():
        return int(resp.headers["Content-Length"])
    for headers in headers_seen:
        if (headers.get("X-Linked-Size") or "").isdigit():
            return int(headers["X-Linked-Size"])
    return None


# --------------------------------------------------------------------------
# The partial file


class _Part:
    """``NAME.part`` and its ``NAME.part.json`` (which URL and checksum it belongs to): what has
    arrived so far, hashed as it is written, checked to start with the GGUF magic."""

    def __init__(self, dest: Path, url: str) -> None:
        self.dest, self.url = dest, redact(url)
        self.path = dest.with_name(dest.name + ".part")
        self.meta_path = dest.with_name(dest.name + ".part.json")
        self.fd: int | None = None
        self.offset = 0
        self.hasher = hashlib.sha256()
        self.head = b""
        self.resumed = 0  # bytes that were on disk when this download began, and were kept

    def open(self, sha256: str | None) -> None:
        """Open for appending, keeping what is there only if it belongs to this URL and checksum."""
        meta = self._meta()
        keep = meta.get("url") == self.url and (sha256 is None or meta.get("sha256") in (None, sha256))
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.path, flags, 0o644)  # O_NOFOLLOW: a planted link is not written through
        if not keep:
            os.ftruncate(self.fd, 0)
        self._rehash()
        self.resumed = self.offset
        self.save_meta(sha256, meta.get("size") if keep else None)

    def _meta(self) -> dict:
        try:
            data = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def save_meta(self, sha256: str | None, size: int | None) -> None:
        try:
            self.meta_path.write_text(json.dumps({"url": self.url, "sha256": sha256, "size": size}),
                                      encoding="utf-8")
        except OSError as exc:
            raise _write_error(exc, self.meta_path, size, kept=self.offset) from None

    def _rehash(self) -> None:
        """Hash what is on disk (a resumed transfer continues the same sha256)."""
        self.hasher, self.head, self.offset = hashlib.sha256(), b"", 0
        os.lseek(self.fd, 0, os.SEEK_SET)
        while chunk := os.read(self.fd, CHUNK):
            self._took(chunk)
        os.lseek(self.fd, 0, os.SEEK_END)

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        self._rehash()
        self.resumed = 0

    def _took(self, data: bytes) -> None:
        self.hasher.update(data)
        if len(self.head) < 4:
            self.head = (self.head + data[:4])[:4]
        self.offset += len(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            self._took(bytes(view[:n]))
            view = view[n:]

    def looks_like_gguf(self) -> bool | None:
        """False once the first 4 bytes are not GGUF's magic; None before 4 bytes came."""
        return None if len(self.head) < 4 else self.head == GGUF_MAGIC

    def sync(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        self.close()
        for p in (self.path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def commit(self) -> None:
        """Rename into place (after fsync) and make the rename itself durable."""
        self.sync()
        self.close()
        os.replace(self.path, self.dest)
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()
        with contextlib.suppress(OSError):
            dfd = os.open(self.dest.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


# --------------------------------------------------------------------------
# One file


@dataclass
class Transfer:
    """One file to fetch: from where, to where, and what it must be."""

    url: str
    dest: Path
    sha256: str | None = None  # the sha256 it must have (lower-case hex); None: the server's digest, if any
    sha256_from: str = "the catalog"  # where that sha256 comes from, for messages
    size: int | None = None  # expected size, when known before asking (the disk check uses the server's)
    label: str = ""  # what it is, for messages ("model", "MTP drafter", ...)


@dataclass
class Downloaded:
    """A file that is now in place, and how it was checked."""

    path: Path
    size: int
    sha256: str
    verified: str | None  # what its sha256 was checked against ("the catalog", "the server", ...); None: nothing
    resumed_from: int = 0
    architecture: str | None = None


def download(t: Transfer, *, token: str | None = None, progress: Progress | None = None, retries: int = 3,
             timeout: float = 30.0, backoff: float = 1.0) -> Downloaded:
    """Fetch ``t.url`` into ``t.dest`` (see the module docstring); resumes a ``.part`` left by an earlier try.

    A broken connection is retried ``retries`` times (``backoff`` * n seconds apart), each from where it
    stopped. Raises NotFound, ChecksumMismatch, NotGGUF (nothing kept), DiskFull, Interrupted (the
    .part is kept: the same call again resumes) or DownloadError."""
    check_url(t.url)
    if t.sha256 is not None and not _SHA256.match(t.sha256):
        raise DownloadError(f"not a sha256 (64 hex digits): {t.sha256!r}")
    from assistant.config.models import _file_lock  # the lock the built-in models' assembly uses

    where = t.dest.parent
    part = _Part(t.dest, t.url)
    with contextlib.ExitStack() as stack:
        try:
            where.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_file_lock(where / f".{t.dest.name}.lock"))  # two pulls of one file wait
            stack.callback(part.close)
            part.open(t.sha256)
        except OSError as exc:
            raise _write_error(exc, part.path if where.is_dir() else where, None) from None
        try:
            return _attempts(t, part, token, progress, retries, timeout, backoff)
        except BaseException:
            if part.offset == 0:  # nothing arrived: nothing to resume, so nothing is left behind
                part.discard()
            raise


def _attempts(t: Transfer, part: _Part, token, progress, retries, timeout, backoff) -> Downloaded:
    failures = restarts = 0
    while True:
        try:
            return _attempt(t, part, token, progress, timeout)
        except _Restart:
            restarts += 1
            if restarts > 3:
                raise DownloadError(f"the server does not continue partial downloads correctly: {redact(t.url)}")
        except _Retry as exc:
            with contextlib.suppress(OSError):
                part.sync()
            failures += 1
            if failures > retries:
                raise Interrupted(_interrupted(t, part, str(exc))) from None
            time.sleep(backoff * failures)


def _interrupted(t: Transfer, part: _Part, why: str) -> str:
    if not part.offset:
        return f"{t.label or 'download'} failed: {why} ({redact(t.url)})"
    return (f"{t.label or 'download'} interrupted: {why}; {part.offset:,} bytes are kept in {part.path}: "
            f"run the same pull again to resume")


def _attempt(t: Transfer, part: _Part, token, progress, timeout) -> Downloaded:
    try:
        resp, seen = _open(t.url, part.offset, token, timeout, expect=t.sha256)
    except _PinConflict as exc:
        part.discard()
        raise _pin_mismatch(t, exc.server) from None
    with contextlib.closing(resp):
        server = _server_sha256(seen)
        want, verified = (t.sha256, t.sha256_from) if t.sha256 else (server, "the server's digest" if server else None)
        if t.sha256 and server and server != t.sha256:
            part.discard()
            raise _pin_mismatch(t, server)
        total = _total_size(resp, seen)
        if part.offset and _part_stale(part, want, total):
            part.reset()
            raise _Restart()
        part.save_meta(want, total)
        if resp.status == 416:
            if not (total is not None and part.offset == total):
                part.reset()
                raise _Restart()
        else:
            _begin_stream(resp, part, total, t.size)
            _stream(t, resp, part, total, progress)
    return _finish(t, part, want, verified, total)


def _pin_mismatch(t: Transfer, server: str) -> ChecksumMismatch:
    return ChecksumMismatch(
        f"{t.label or 'file'} {t.dest.name}: the server publishes sha256 {server}, but {t.sha256_from} says "
        f"{t.sha256}: the file was changed upstream; nothing was downloaded (pass --sha256 {server} "
        "to take the new file)")


def _part_stale(part: _Part, want: str | None, total: int | None) -> bool:
    meta = part._meta()
    return ((want is not None and meta.get("sha256") not in (None, want))
            or (total is not None and meta.get("size") not in (None, total))
            or (total is not None and part.offset > total))


def _begin_stream(resp, part: _Part, total: int | None, expected: int | None) -> None:
    """Check that the response continues the partial file where it ends, and that the rest fits on
    the disk (by the server's size, else the size the catalog expects)."""
    if resp.status == 200 and part.offset:
        part.reset()  # the server ignored the Range: this response is the whole file
    elif resp.status == 206:
        m = re.match(r"bytes\s+(\d+)-", resp.headers.get("Content-Range") or "")
        if not m or int(m.group(1)) != part.offset:
            part.reset()
            raise _Restart()
    elif resp.status not in (200, 206):
        raise DownloadError(f"the server answered HTTP {resp.status} instead of the file")
    size = total if total is not None else expected
    if size is not None:
        _check_space(part, size - part.offset, size)


def _check_space(part: _Part, need: int, total: int) -> None:
    try:
        free = shutil.disk_usage(part.path.parent).free
    except OSError:
        return
    if need > free:
        raise DiskFull(f"not enough disk space for {part.dest.name}: it needs {_mb(need)} more "
                       f"({_mb(total)} in all) and {part.path.parent} has {_mb(free)} free; free some "
                       f"space (or set models_dir in the config to a bigger disk) and run the pull again")


def _stream(t: Transfer, resp, part: _Part, total: int | None, progress: Progress | None) -> None:
    if progress:
        progress(part.offset, total)
    # read1: what has arrived (up to CHUNK), so the .part and the progress keep up with the network
    read = getattr(resp, "read1", resp.read)
    while True:
        try:
            chunk = read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(f"the connection broke ({type(exc).__name__}: {exc})") from None
        if not chunk:
            break
        try:
            part.write(chunk)
        except OSError as exc:
            raise _write_error(exc, part.path, total, kept=part.offset) from None
        if part.looks_like_gguf() is False:
            head = part.head
            part.discard()
            raise NotGGUF(f"{t.label or 'file'} from {redact(t.url)} is not a GGUF file (it starts with "
                          f"{head!r}; a GGUF file starts with b'GGUF'): the server sent something else, "
                          f"such as a web page; nothing was kept")
        if progress:
            progress(part.offset, total)
    if total is not None and part.offset < total:
        raise _Retry(f"the connection closed after {part.offset:,} of {total:,} bytes")


def _finish(t: Transfer, part: _Part, want: str | None, verified: str | None, total: int | None) -> Downloaded:
    try:
        part.sync()
    except OSError as exc:
        raise _write_error(exc, part.path, total, kept=part.offset) from None
    if total is not None and part.offset != total:
        part.discard()
        raise DownloadError(f"{t.dest.name}: got {part.offset:,} bytes but the server said {total:,}; "
                            "nothing was kept")
    digest = part.hasher.hexdigest()
    if want is not None and digest != want:
        part.discard()
        raise ChecksumMismatch(f"checksum mismatch for {t.dest.name}: its sha256 is {digest}, {verified} says "
                               f"{want}; the download was removed (run the pull again to fetch it anew)")
    try:
        meta = read_metadata(part.path)
    except ModelLoadError as exc:
        part.discard()
        raise NotGGUF(f"{t.label or 'file'} {t.dest.name} is not a usable GGUF file "
                      f"({str(exc).replace(str(part.path), 'it')}); nothing was kept") from None
    try:
        part.commit()
    except OSError as exc:
        raise _write_error(exc, t.dest, total, kept=part.offset) from None
    return Downloaded(t.dest, part.offset, digest, verified, part.resumed, meta.get("general.architecture"))


def _write_error(exc: OSError, path: Path, total: int | None, kept: int | None = None) -> DownloadError:
    """A clear message for a failure to write ``path``."""
    what = exc.strerror or type(exc).__name__
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        why = ("the file is larger than this file system or this process's file-size limit allows"
               if exc.errno == errno.EFBIG else "the disk is full")
        keep = (f"; {kept:,} of {total:,} bytes are kept in {path}: free space (or set models_dir in the config to "
                "another disk) and run the pull again to resume") if kept and total else ""
        return DiskFull(f"cannot write {path}: {why} ({what}){keep}")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return DownloadError(f"cannot write to {path}: {what}; set models_dir in the config to a folder "
                             "you can write to")
    if exc.errno == errno.ELOOP:
        return DownloadError(f"refusing to write {path}: it is a symbolic link")
    return DownloadError(f"cannot write {path}: {what}")


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
