"""The HTTP API as an aiohttp application, and its place in the daemon's lifecycle.

Every request passes, in order:

1. ``errors``: whatever is raised becomes an error in the shape of the API
   the path belongs to (``errors``); a bug is a 500 and a log line;
2. ``guard``: over a Unix socket the peer must be this user (as for the
   JSON-RPC socket); the Host header must be a loopback name (or one of
   ``http.allowed_hosts``) on a loopback bind, which stops DNS rebinding (a
   web page whose name its owner points at 127.0.0.1); a request with an
   ``Origin`` (a browser's) must come from one of ``http.cors_origins``
   (globs; none by default), so a web page can neither read replies nor make
   the daemon work through a "simple" cross-origin POST; preflights of
   allowed origins are answered here;
3. ``auth``: with API keys set, ``Authorization: Bearer KEY`` must hold one
   (constant-time check, ``auth``); the key names the client for scheduling.

Bodies are bounded by ``http.max_body_bytes`` (aiohttp's
``client_max_size``: 413 past it). Handlers are cancelled when their client
disconnects (``handler_cancellation``), which cancels the generation.

Slow clients (slowloris): aiohttp has no option named a header timeout, but
its keep-alive timer (``keepalive_timeout``, ``http.read_timeout`` here)
starts when a connection opens and again when a reply ends, and closes the
connection if no whole request head has arrived by then: that is a bound on
the time to send the headers, and on idle connections. A body gets the same
time again (``incoming.read_json``: 408), and what is left of a body no
handler read is drained for at most that long too (``lingering_time``).
The head's size is bounded too
(``MAX_LINE``, ``MAX_FIELD``, ``MAX_HEADERS``: 400 past them). Not bounded:
the number of connections (each costs a socket and a few KiB until its
timeout closes it).
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import logging
import os
from typing import Any

from aiohttp import web

from assistant.daemon.http import errors, listen, ollama_api, openai_api
from assistant.daemon.http.auth import KeyRing, bearer
from assistant.daemon.http.errors import HttpError
from assistant.daemon.http.incoming import CLIENT, SERVICE
from assistant.daemon.http.runs import Runs
from assistant.daemon.process import DaemonError
from assistant.peer import peer_uid

log = logging.getLogger("assistant.daemon.http")

# Seconds handlers get to finish at shutdown once their generations were cancelled.
SHUTDOWN_GRACE_S = 5.0
# The request head's bounds: the request line (its URL), one header, how many headers (aiohttp's
# defaults are 8190, 8190 and 128; no client of these APIs sends more than a few dozen headers).
MAX_LINE, MAX_FIELD, MAX_HEADERS = 8190, 8190, 64
# Seconds the rest of a body no handler read (after a 408 or 413) is still taken and dropped, so the
# client reads its answer rather than a reset (aiohttp's lingering close; its default is 10 s).
LINGER_S = 10.0
_CORS_HEADERS = "Authorization, Content-Type, X-Session-Id, OpenAI-Organization, OpenAI-Project"


def host_name(header: str) -> str:
    """The name in a Host header, without port, brackets or a final dot, lowercased."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HttpService:
    """The HTTP API of one daemon: checked when made (``DaemonError`` with the reason),
    listening after ``start``, stopped (its requests cancelled and answered) by ``stop``."""

    def __init__(self, daemon: Any, listen_text: str):
        settings = daemon.config.http
        self.daemon, self.settings = daemon, settings
        self.spec = listen.parse(listen_text)
        self.keys = KeyRing.load(settings.api_keys, settings.api_key_file)
        listen.check_exposure(self.spec, bool(self.keys))
        self.loopback = listen.is_loopback(self.spec)
        self.runs = Runs(daemon, per_client=daemon.config.max_queued_requests // 2,
                         load_wait_s=float(settings.load_timeout))
        self.stall_timeout = float(daemon.config.send_stall_timeout)
        self.runner: web.AppRunner | None = None
        self.url: str | None = None
        self._socket_id: tuple[int, int] | None = None  # our Unix socket file (dev, inode)

    @property
    def config(self) -> Any:
        return self.daemon.config

    # -- the application ------------------------------------------------------------

    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes,
                              middlewares=[self._errors, self._guard, self._auth])
        app[SERVICE] = self
        app.router.add_routes(openai_api.routes() + ollama_api.routes())
        app.router.add_get("/", _root)
        app.on_response_prepare.append(self._cors_headers)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as err:
            return errors.response(err, request.path)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return errors.response(self._http_exception(request, exc), request.path)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the daemon
            log.exception("HTTP %s %s failed", request.method, request.path)
            return errors.response(HttpError(500, f"internal error: {type(exc).__name__}: {exc}",
                                             code="internal_error"), request.path)

    def _http_exception(self, request: web.Request, exc: web.HTTPException) -> HttpError:
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        if exc.status == 413:
            return HttpError(413, f"the request body is larger than {self.settings.max_body_bytes} bytes "
                                  "(http.max_body_bytes)", code="request_too_large")
        if exc.status == 404:
            return HttpError(404, f"no such endpoint: {request.method} {request.path}", code="not_found")
        if exc.status == 405:
            return HttpError(405, f"{request.method} is not allowed on {request.path}", headers=headers)
        return HttpError(exc.status, exc.reason or "bad request", headers=headers)

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        self._check_peer(request)
        host = request.headers.get("Host")
        if host is not None and not self._host_ok(host_name(host)):
            raise HttpError(403, f"the Host {host!r} is not allowed (a loopback name is, and those in "
                                 "http.allowed_hosts)", code="host_not_allowed")
        origin = request.headers.get("Origin")
        if origin is not None and not self._origin_ok(origin):
            raise HttpError(403, f"requests from the web origin {origin!r} are refused; allow it with "
                                 "http.cors_origins", code="origin_not_allowed")
        if request.method == "OPTIONS" and origin is not None:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    _CORS_HEADERS)})
        return await handler(request)

    def _check_peer(self, request: web.Request) -> None:
        if not self.spec.is_unix or request.transport is None:
            return
        sock = request.transport.get_extra_info("socket")
        uid = peer_uid(sock) if sock is not None else None
        if uid is not None and uid != os.getuid():
            raise HttpError(403, "permission denied: wrong user", code="wrong_user")

    def _host_ok(self, name: str) -> bool:
        allowed = [h.lower().rstrip(".") for h in self.settings.allowed_hosts]
        if self.spec.is_unix or "*" in allowed:
            return True  # no browser reaches a Unix socket
        if not self.loopback and not allowed:
            return True  # a network bind has API keys; the names it is reached by are the user's
        return is_loopback_name(name) or name in allowed

    def _origin_ok(self, origin: str) -> bool:
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.settings.cors_origins)

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and self._origin_ok(origin):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"

    @web.middleware
    async def _auth(self, request: web.Request, handler) -> web.StreamResponse:
        if self.keys:
            key = bearer(request.headers.get("Authorization"))
            if key is None:
                raise HttpError(401, "an API key is required: send Authorization: Bearer KEY",
                                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            index = self.keys.match(key)
            if index is None:
                raise HttpError(401, "invalid API key", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
            request[CLIENT] = f"http:key{index}"
        else:
            request[CLIENT] = "http:local"  # keyless means loopback or the Unix socket (checked at start)
        return await handler(request)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; DaemonError when the address cannot be had."""
        sock = listen.unix_socket(self.spec) if self.spec.is_unix else listen.tcp_socket(self.spec)
        if self.spec.is_unix:
            st = os.stat(self.spec.path)
            self._socket_id = (st.st_dev, st.st_ino)
        self.runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None,
                                    shutdown_timeout=SHUTDOWN_GRACE_S,
                                    keepalive_timeout=float(self.settings.read_timeout),
                                    lingering_time=min(LINGER_S, float(self.settings.read_timeout)),
                                    max_line_size=MAX_LINE, max_field_size=MAX_FIELD, max_headers=MAX_HEADERS)
        await self.runner.setup()
        try:
            await web.SockSite(self.runner, sock).start()
        except OSError as exc:
            sock.close()
            raise DaemonError(f"cannot serve HTTP on {self.spec.text}: {exc}") from None
        self.url = (f"http+unix://{self.spec.path}" if self.spec.is_unix
                    else _url(sock.getsockname()))
        log.info("HTTP API (OpenAI and Ollama compatible) on %s%s", self.url,
                 "" if self.keys else " (no API key: this machine only)")

    def describe(self) -> dict[str, Any]:
        """What ``status`` shows: where the API is served and how many requests are in flight."""
        return {"url": self.url, "in_flight": self.runs.in_flight()}

    async def stop(self) -> None:
        """Stop taking requests, cancel those in flight (they answer with what they have), close."""
        if self.runner is None:
            return
        for site in list(self.runner.sites):
            await site.stop()
        await self.runs.stop()
        await self.runner.cleanup()
        self.runner = None
        if self.spec.is_unix:
            self._remove_socket()

    def _remove_socket(self) -> None:
        try:
            st = os.lstat(self.spec.path)
            if (st.st_dev, st.st_ino) == self._socket_id:  # ours, not one another daemon put there since
                os.unlink(self.spec.path)
        except FileNotFoundError:
            pass


def _url(sockname: Any) -> str:
    host, port = sockname[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _root(request: web.Request) -> web.Response:
    return web.Response(text="assistant is running (OpenAI API under /v1, Ollama API under /api)\n")
