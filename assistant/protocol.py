"""The wire protocol: JSON-RPC 2.0, one JSON object per line, over a Unix socket.

Everything both ends agree on lives here: the protocol version, the error
codes, and the helpers that build and parse messages. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
import math
import re
from typing import Any

PROTOCOL_VERSION = 1
# A line longer than this is refused with ErrorCode.LINE_TOO_LONG (the
# connection stays open). Big enough for a base64 image attachment.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024
# A request nested deeper than this (the request object is level 1) is
# refused: no method needs it, and deep values break code that recurses.
MAX_DEPTH = 64


class ErrorCode(enum.IntEnum):
    """Stable error codes. The JSON-RPC ones, then ours from -32000 down."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603

    LINE_TOO_LONG = -32000
    NOT_INITIALIZED = -32001
    INCOMPATIBLE_VERSION = -32002
    MODEL_NOT_FOUND = -32010
    MODEL_LOAD_FAILED = -32011
    BACKEND_UNAVAILABLE = -32012
    CONTEXT_OVERFLOW = -32013
    BUSY = -32014  # the model's queue is at its bound (max_queued_requests): try again later
    SESSION_NOT_FOUND = -32020
    REQUEST_NOT_FOUND = -32021
    SKILL_NOT_FOUND = -32040
    SKILL_FAILED = -32041
    # Media (images, audio) in a chat's content parts; ``data`` names the part ("part": "prompt[1]").
    MEDIA_INVALID = -32050  # not a medium we read, a file that cannot be read, truncated, bad base64, a codec we take not
    MEDIA_TOO_LARGE = -32051  # over media.max_bytes, media.max_pixels or media.max_audio_seconds
    MEDIA_UNSUPPORTED = -32052  # the model cannot take this kind and no fallback skill can turn it into text
    SHUTTING_DOWN = -32030
    CLIENT_TOO_SLOW = -32031


class RPCError(Exception):
    """An error to send back as a JSON-RPC error object (or received as one)."""

    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code = int(code)
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __str__(self) -> str:
        try:
            name = ErrorCode(self.code).name
        except ValueError:
            name = str(self.code)
        return f"{self.message} ({name})"


def encode(obj: Any) -> bytes:
    """One message (or a batch: a list of them) as one line of compact UTF-8 JSON.

    Only standard JSON comes out: NaN and the infinities raise ValueError, a
    lone surrogate raises UnicodeEncodeError (a ValueError), a value JSON
    has no type for raises TypeError."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


_SURROGATE = re.compile("[\ud800-\udfff]")


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate (from an escape like ``\\ud800``): it is
    not Unicode text and cannot be sent back as UTF-8. A proper pair of escapes
    is decoded by ``json`` into one character and does not count."""
    return _SURROGATE.search(text) is not None


def id_problem(rid: Any) -> str | None:
    """Why ``rid`` cannot be a request id (None if it can): JSON-RPC ids are strings,
    numbers or null; ours must also be finite numbers and valid Unicode, so that the
    reply can carry them back as JSON."""
    if isinstance(rid, bool) or not isinstance(rid, (str, int, float, type(None))):
        return "id must be a string, a number or null"
    if isinstance(rid, float) and not math.isfinite(rid):
        return "id must be a finite number"
    if isinstance(rid, str) and has_lone_surrogate(rid):
        return "id must be valid Unicode (it holds a lone surrogate)"
    return None


def content_problem(value: Any, max_depth: int = MAX_DEPTH, *, surrogates: bool = True) -> str | None:
    """Why a parsed JSON value cannot be taken (None if it can): nested deeper than
    ``max_depth`` (``value`` itself is level 1), or, with ``surrogates``, a string or
    key holding a lone surrogate. Level by level, so that no depth overflows the
    stack and the memory it takes is one reference per container of a level."""
    level, depth = [value], 1
    while level:
        below: list[Any] = []
        for v in level:
            if isinstance(v, str):
                if surrogates and has_lone_surrogate(v):
                    return "a string is not valid Unicode (it holds a lone surrogate)"
                continue
            if not isinstance(v, (dict, list)):
                continue
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels"
            if isinstance(v, dict):
                if surrogates and any(has_lone_surrogate(k) for k in v):
                    return "a key is not valid Unicode (it holds a lone surrogate)"
                v = v.values()
            below.extend(item for item in v if isinstance(item, (str, dict, list)))
        level, depth = below, depth + 1
    return None


def request(id_: int | str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
    if params is not None:
        msg["params"] = params
    return msg


def result(id_: Any, value: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "result": value}


def error(id_: Any, err: RPCError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "error": err.to_dict()}


def notification(method: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}
