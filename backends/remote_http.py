"""The remote backend's HTTP side: one aiohttp session to one server.

- a refused connection (or a connect timeout, a connection the server closed
  before answering, a 503 while it loads its model) is tried again after
  ``RETRY_DELAYS``; then a clear error that says how often and how long;
- a kept-alive connection the server had closed is sent on again at once;
- no redirect is followed (the API key stays with the host it is for);
- an error status becomes what ``remote_stream.classify_error`` makes of
  its body (read bounded);
- URLs in messages and logs never carry a user name or password
  (:func:`display_url`), and the headers (the key) are never shown.

aiohttp is imported on first use, so importing the backend costs nothing
where no remote model is configured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from typing import Any, Callable

from .base import BackendError, ModelLoadError
from .remote_stream import RemoteError, classify_error

log = logging.getLogger("backends.remote")

# Seconds between tries of a connection the server refused: five tries over 3.75 s
# (a server restarting, or still binding its port).
RETRY_DELAYS = (0.25, 0.5, 1.0, 2.0)
CONNECT_TIMEOUT = 10.0
# Seconds the server may stay silent within a reply (its keep-alive comments count):
# a long prompt's prefill on a busy server takes a while.
READ_TIMEOUT = 600.0
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streamed answer at most
NO_ENDPOINT = (404, 405, 501)  # statuses of a server without the endpoint asked for


class Never:
    """A cancel flag that is never set (so there is nothing to watch: ``listen`` never calls)."""

    def is_set(self) -> bool:
        return False

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        return _nothing


def _nothing() -> None:
    pass


def display_url(url: str) -> str:
    """``url`` as messages and logs show it: without a user name or password."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_url(url: str) -> str:
    """``url`` without its trailing slash; ModelLoadError unless it is an http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ModelLoadError(f"the remote backend runs a model alias with backend: remote and url (an "
                             f"OpenAI-compatible server's base URL, e.g. http://gpu-box:8000/v1); "
                             f"{display_url(url)!r} is not an http(s) URL")
    return url.rstrip("/")


def loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


class Connection:
    """Requests to one server's OpenAI-compatible base URL, on the running event loop.

    ``shown`` is the URL as messages say it. :meth:`open` makes the session
    (inside the loop that will use it), :meth:`close` ends it."""

    def __init__(self, url: str, headers: dict[str, str], *, total_timeout: float | None = None):
        self.url = check_url(url)
        self.shown = display_url(self.url)
        self._headers = headers
        self._total = total_timeout
        self._session: Any = None

    def __repr__(self) -> str:
        return f"<Connection {self.shown}>"

    async def open(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self._total, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
        self._session = aiohttp.ClientSession(timeout=timeout, headers=self._headers)

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def request(self, method: str, endpoint: str, cancel: Any, *, retries: bool = True, **kw: Any) -> Any:
        """The response to ``METHOD {url}/{endpoint}`` once its status is good (see the
        module docstring); None when ``cancel`` is set while it waits to try again."""
        import aiohttp

        url = f"{self.url}/{endpoint}"
        delays = RETRY_DELAYS if retries else ()
        for attempt in range(len(delays) + 1):
            try:
                resp = await self._send(method, url, **kw)
            except aiohttp.ClientConnectorError as exc:
                why = reason(exc)
                if not retryable(exc):
                    raise RemoteError(f"cannot reach the server at {self.shown}: {why}") from None
            except asyncio.TimeoutError:
                why = f"no connection within {CONNECT_TIMEOUT:g} s"
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                why = f"the server closed the connection ({reason(exc)})"  # restarting, or cleaning up
            except aiohttp.ClientError as exc:
                raise RemoteError(f"the request to {self.shown} failed: {reason(exc)}") from None
            else:
                if resp.status == 503 and attempt < len(delays):
                    why = f"503 {resp.reason or ''}".strip() + " (loading?)"
                    resp.release()
                elif resp.status >= 300:
                    raise await self._failure(resp)
                else:
                    return resp
            if attempt == len(delays):
                tries = f"{attempt + 1} tries over {sum(delays):g} s" if delays else "one try"
                raise RemoteError(f"cannot reach the server at {self.shown}: {why} ({tries}); is it running, "
                                  "and is the model alias's url right?")
            log.info("%s: %s; trying again in %g s", self.shown, why, delays[attempt])
            await asyncio.sleep(delays[attempt])
            if cancel.is_set():
                return None
        raise AssertionError("unreachable")

    async def _send(self, method: str, url: str, **kw: Any) -> Any:
        """One request; sent again at once if a kept-alive connection turns out to have
        been closed by the server (it never saw the request)."""
        import aiohttp

        try:
            return await self._session.request(method, url, allow_redirects=False, **kw)
        except aiohttp.ServerDisconnectedError:
            return await self._session.request(method, url, allow_redirects=False, **kw)

    async def _failure(self, resp: Any) -> BackendError:
        try:
            raw = await read_bounded(resp, 64 * 1024)
        except Exception:  # noqa: BLE001 - the status says enough
            raw = b""
        finally:
            resp.release()
        if 300 <= resp.status < 400:
            where = display_url(resp.headers.get("Location", "?"))
            return RemoteError(f"the server at {self.shown} redirects to {where}; put that URL in the model "
                               "alias (redirects are not followed, so the API key stays with its host)",
                               status=resp.status)
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw
        return classify_error(resp.status, body, self.shown)

    async def get_json(self, endpoint: str, cancel: Any, *, retries: bool = True) -> Any:
        """``GET {url}/{endpoint}``'s JSON body; None where the server has no such endpoint."""
        try:
            resp = await self.request("GET", endpoint, cancel, retries=retries)
        except RemoteError as exc:
            if exc.status in NO_ENDPOINT:
                return None
            raise
        try:
            return parse_json(await read_bounded(resp), self.shown)
        finally:
            resp.release()

    async def list_models(self, cancel: Any, *, retries: bool = True) -> list[dict[str, Any]] | None:
        """The server's ``GET /models`` entries; None where it lists none."""
        body = await self.get_json("models", cancel, retries=retries)
        data = body.get("data") if isinstance(body, dict) else body
        return [m for m in data if isinstance(m, dict)] if isinstance(data, list) else None


async def drained(resp: Any) -> bool:
    """Whether the rest of a reply after its [DONE] (normally nothing) came within a second."""
    async def rest() -> None:
        async for _chunk in resp.content.iter_any():
            pass
    try:
        await asyncio.wait_for(rest(), 1.0)
    except Exception:  # noqa: BLE001 - a stream left open or broken: the connection is closed instead
        return False
    return True


async def read_bounded(resp: Any, limit: int = MAX_BODY_BYTES) -> bytes:
    parts, size = [], 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise RemoteError(f"the server's answer is over {limit:,} bytes")
        parts.append(chunk)
    return b"".join(parts)


def parse_json(raw: bytes | str, where: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        raise RemoteError(f"the server at {where} sent something that is not JSON: {' '.join(text.split())[:120]!r}") \
            from None


def reason(exc: BaseException) -> str:
    """A connection error in a few words."""
    os_error = getattr(exc, "os_error", None) or exc
    if isinstance(os_error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(os_error, (asyncio.TimeoutError, TimeoutError)):
        return "timed out"
    if type(os_error).__name__ == "gaierror":
        return "host name not found"
    text = getattr(os_error, "strerror", None) or str(os_error) or type(os_error).__name__
    return text[:200]


def retryable(exc: BaseException) -> bool:
    os_error = getattr(exc, "os_error", None)
    return isinstance(os_error, (ConnectionRefusedError, TimeoutError, asyncio.TimeoutError))
