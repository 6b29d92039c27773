"""What every handler reads from a request, the same for both APIs: its JSON
body, its session, its client, and the chat parameters that come of them.

A session is named by the ``X-Session-Id`` header or a ``session`` field in
the body. With one, the daemon keeps the history (as over JSON-RPC): of the
messages a client sends, the system message sets the session's system
prompt and only the turn after the last assistant message is new (what a
client that resends the whole history each time sends last); the rest is
already stored.

Chat parameters go through ``params.parse`` like JSON-RPC's, so a wrong
type gets the same message (naming the parameter and what it expects) as a
400.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from assistant.daemon import params
from assistant.daemon.http.deadline import within
from assistant.daemon.http.errors import HttpError, bad_request
from assistant.protocol import RPCError, content_problem

SESSION_HEADER = "X-Session-Id"
MAX_SESSION_CHARS = 200
# The HttpService, on the application; the client's scheduling identity, on a request (set by app.py).
SERVICE = web.AppKey("assistant_http_service", object)
CLIENT = "assistant_http_client"


def service(request: web.Request) -> Any:
    """The ``app.HttpService`` serving ``request``."""
    return request.app[SERVICE]


def client_of(request: web.Request) -> str:
    """The request's scheduling identity (see ``runs``)."""
    return request.get(CLIENT, "http:local")


def flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field; 400 when it is something else."""
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false", param=name)
    return value


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 when it is not one, 413 (aiohttp) past the size limit,
    408 (and the connection closed) when it takes longer than ``http.read_timeout`` to come."""
    limit = float(service(request).settings.read_timeout)
    try:
        raw = await within(request.read(), limit)
    except asyncio.TimeoutError:
        raise HttpError(408, f"the request body did not arrive within {limit:g} s (http.read_timeout)",
                        code="request_timeout", close=True) from None
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        body = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except RecursionError:
        raise bad_request("invalid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more digits than Python parses
        raise bad_request(f"invalid JSON: {str(exc).split(';')[0]}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {type(body).__name__}")
    problem = content_problem(body)
    if problem is not None:
        raise bad_request(f"the request body is {problem}" if problem.startswith("nested")
                          else f"the request body has {problem}")
    return body


def session_of(request: web.Request, body: dict[str, Any]) -> str | None:
    """The session the request names (header first), checked; None for none."""
    value = request.headers.get(SESSION_HEADER, body.get("session"))
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_SESSION_CHARS \
            or any(ord(c) < 32 for c in value):
        raise bad_request(f"a session id must be 1-{MAX_SESSION_CHARS} printable characters", param="session")
    return value


def conversation_fields(messages: list[dict[str, str]], session: str | None) -> dict[str, Any]:
    """The chat parameters for a conversation of plain {role, content} messages: all of
    them, or with a session its system prompt and the new turn (see the module docstring)."""
    if session is None:
        return {"messages": messages}
    systems = [m["content"] for m in messages if m["role"] == "system"]
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    new = [m["content"] for m in messages[last_reply + 1:] if m["role"] != "system" and m["content"]]
    if not new:
        raise bad_request("with a session, the messages must end with a new user (or tool) message",
                          param="messages")
    fields: dict[str, Any] = {"session": session, "prompt": "\n\n".join(new)}
    if systems:
        fields["system"] = systems[-1]
    return fields


def chat_params(fields: dict[str, Any]) -> params.Chat:
    """``fields`` checked as JSON-RPC's ``chat`` parameters; 400 naming a bad one."""
    try:
        return params.parse(params.Chat, fields)
    except RPCError as exc:  # INVALID_PARAMS, naming the parameter
        raise HttpError(400, exc.message) from None
