"""HTTP errors, each API in its own shape.

Handlers raise ``HttpError`` (or let an ``RPCError`` from the chat path
through, turned into one by :func:`from_rpc`); the error middleware writes
it the way the API a path belongs to writes errors:

- OpenAI (``/v1/...``, and anything that is not Ollama's):
  ``{"error": {"message", "type", "param", "code"}}``;
- Ollama (``/api/...``): ``{"error": "message"}``.

Status codes: 400 a bad request (invalid JSON, wrong types, a prompt longer
than the context: OpenAI's own choice, with code ``context_length_exceeded``),
401 a missing or wrong API key, 403 a refused Host, Origin or peer, 404 an
unknown model or path, 408 a body slower than ``http.read_timeout``, 413 a
body over ``http.max_body_bytes``, 501 what the
model's backend cannot do (embeddings), 503 busy, loading too long or
shutting down (with ``Retry-After``), 500 a bug.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from assistant.protocol import ErrorCode, RPCError

# OpenAI's error "type" for each status.
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 501: "not_implemented_error", 503: "server_error"}


@dataclass
class HttpError(Exception):
    """An error reply: its status, message, OpenAI ``code`` and ``param``, and extra headers;
    ``close``: the connection is closed after it (what the client sent next cannot be trusted)."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def openai_body(self) -> dict[str, Any]:
        kind = _OPENAI_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


def is_ollama(path: str) -> bool:
    """Whether ``path`` is in Ollama's API (its errors are ``{"error": "..."}``)."""
    return path == "/api" or path.startswith("/api/")


def response(error: HttpError, path: str) -> web.Response:
    """``error`` as the reply to a request for ``path``."""
    body = error.ollama_body() if is_ollama(path) else error.openai_body()
    resp = web.Response(status=error.status, text=json.dumps(body, ensure_ascii=False),
                        content_type="application/json", headers=error.headers)
    if error.close:
        resp.force_close()
    return resp


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> HttpError:
    return HttpError(400, message, code=code, param=param)


def busy(message: str) -> HttpError:
    """503 with a hint to retry in a second (OpenAI's and Ollama's clients both honour it)."""
    return HttpError(503, message, code="server_busy", headers={"Retry-After": "1"})


# RPC error code -> (HTTP status, OpenAI code)
_FROM_RPC = {
    ErrorCode.INVALID_PARAMS: (400, None),
    ErrorCode.INVALID_REQUEST: (400, None),
    ErrorCode.CONTEXT_OVERFLOW: (400, "context_length_exceeded"),
    ErrorCode.MODEL_NOT_FOUND: (404, "model_not_found"),
    ErrorCode.SESSION_NOT_FOUND: (404, "session_not_found"),
    ErrorCode.BUSY: (503, "server_busy"),
    ErrorCode.SHUTTING_DOWN: (503, "shutting_down"),
    ErrorCode.MODEL_LOAD_FAILED: (500, "model_load_failed"),
    ErrorCode.BACKEND_UNAVAILABLE: (500, "backend_unavailable"),
    ErrorCode.MEDIA_INVALID: (400, "media_invalid"),  # the client's bytes: not a medium we read
    ErrorCode.MEDIA_TOO_LARGE: (413, "media_too_large"),
    ErrorCode.MEDIA_UNSUPPORTED: (400, "media_unsupported"),  # this model cannot take it, no fallback
}


def from_rpc(exc: RPCError) -> HttpError:
    """The HTTP error for an error of the chat path (unknown ones are 500)."""
    status, code = _FROM_RPC.get(exc.code, (500, "internal_error"))
    headers = {"Retry-After": "1"} if status == 503 else {}
    return HttpError(status, exc.message, code=code, headers=headers)
