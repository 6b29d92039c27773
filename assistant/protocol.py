"""The wire protocol: JSON-RPC 2.0, one JSON object per line, over a Unix socket.

Everything both ends agree on lives here: the protocol version, the error
codes, and the helpers that build and parse messages. See docs/protocol.md.
"""

from __future__ import annotations

import enum
import json
from typing import Any

PROTOCOL_VERSION = 1
# A line longer than this is refused with ErrorCode.LINE_TOO_LONG (the
# connection stays open). Big enough for a base64 image attachment.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


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
    SESSION_NOT_FOUND = -32020
    REQUEST_NOT_FOUND = -32021
    SKILL_NOT_FOUND = -32040
    SKILL_FAILED = -32041
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


def encode(obj: dict[str, Any]) -> bytes:
    """One message as one line of compact UTF-8 JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


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
