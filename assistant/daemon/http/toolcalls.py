"""Tools an HTTP client defines and runs itself (OpenAI's and Ollama's function calling).

Over JSON-RPC the daemon offers its skills and runs them; over HTTP the
client sends ``tools`` (JSON Schema function definitions), the model is
told about them in the same Hermes format (``assistant.daemon.tools``), and
a call it makes comes back as ``tool_calls`` for the client to run. The
client then sends the result as a ``tool`` message, which goes to the model
as a ``<tool_response>``; an earlier assistant message's ``tool_calls`` go
back as the ``<tool_call>`` text the model wrote.

``tool_choice``: ``none`` offers nothing (the model is not told of the
tools, and markup it writes stays text), ``auto`` (the default) offers every
tool and lets the model choose, ``required`` offers every tool and a named
function only that one, and both of those constrain the reply to one call
(``tool_choice``).
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from assistant.daemon import tools
from assistant.daemon.http import tool_choice
from assistant.daemon.http.errors import bad_request

# The daemon's tool-call markup; blocks are found one by one (``tools.CALL_PATTERN``) so that a
# malformed one can stay text.
OPEN, CLOSE = tools.CALL_OPEN, tools.CALL_CLOSE
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_TOOLS = 128  # OpenAI's own limit on a request's tools


@dataclass(frozen=True)
class ToolSpec:
    """A client's function, in the shape ``tools.system_prompt`` describes to the model."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


def offered(raw_tools: Any, choice: Any = None) -> dict[str, ToolSpec] | None:
    """The tools to describe to the model (name -> spec), from a request's ``tools`` and
    ``tool_choice``; None when none are offered. HttpError 400 for a malformed one."""
    if raw_tools is None or raw_tools == []:
        if forces_call(choice):
            raise bad_request("'tool_choice' asks for a tool call, but 'tools' is empty", param="tool_choice")
        return None
    if not isinstance(raw_tools, list):
        raise bad_request("'tools' must be a list of {type: function, function: {name, description, parameters}}",
                          param="tools")
    if len(raw_tools) > MAX_TOOLS:
        raise bad_request(f"'tools' has {len(raw_tools)} entries; at most {MAX_TOOLS}", param="tools")
    specs: dict[str, ToolSpec] = {}
    for i, item in enumerate(raw_tools):
        spec = _spec(item, f"tools[{i}]")
        specs[spec.name] = spec
    if choice is None or choice in ("auto", "required"):
        return specs
    if choice == "none":
        return None
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise bad_request("'tool_choice' must be 'none', 'auto', 'required' or {type: function, function: {name}}",
                          param="tool_choice")
    if name not in specs:
        raise bad_request(f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice")
    return {name: specs[name]}


def forces_call(choice: Any) -> bool:
    """Whether ``tool_choice`` asks for a call (``required`` or a named function)."""
    return choice == "required" or isinstance(choice, dict)


async def enforced(specs: dict[str, ToolSpec] | None, choice: Any) -> tool_choice.ToolCallFormat | None:
    """The constraint that makes the reply a call of one of ``specs`` (``offered``'s result)
    when ``choice`` asks for a call; None otherwise. Built in a thread (a grammar per tool)."""
    if not specs or not forces_call(choice):
        return None
    return await asyncio.to_thread(tool_choice.call_format, specs)


def _spec(item: Any, where: str) -> ToolSpec:
    fn = item.get("function") if isinstance(item, dict) else None
    if not isinstance(fn, dict) or item.get("type", "function") != "function":
        raise bad_request(f"'{where}' must be {{type: function, function: {{name, description, parameters}}}}",
                          param=where)
    name, desc, params = fn.get("name"), fn.get("description", ""), fn.get("parameters", {})
    if not isinstance(name, str) or not _NAME.match(name):
        raise bad_request(f"'{where}.function.name' must be 1-64 letters, digits, '_', '.' or '-'", param=where)
    if not isinstance(desc, (str, type(None))) or not isinstance(params, (dict, type(None))):
        raise bad_request(f"'{where}.function': description must be a string and parameters an object",
                          param=where)
    return ToolSpec(name, desc or "", params or {})


def split(text: str) -> tuple[str, list[dict[str, Any]]]:
    """A reply's text without its well-formed tool calls, and those calls
    (``{"name", "arguments"}``); a malformed block stays in the text."""
    calls: list[dict[str, Any]] = []

    def take(match: re.Match) -> str:
        parsed = tools.parse_calls(match.group(0))
        if parsed and "error" not in parsed[0]:
            calls.append(parsed[0])
            return ""
        return match.group(0)

    content = tools.CALL_PATTERN.sub(take, text)
    return (content.strip() if calls else content), calls


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def call_text(name: str, arguments: Any) -> str:
    """A call as the model writes it (for an assistant message the client sends back)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CLOSE


def result_text(name: str | None, content: str) -> str:
    """A tool's result as the model reads it (``tools.response_message``)."""
    entry: dict[str, Any] = {"name": name, "result": content} if name else {"result": content}
    return tools.response_message([entry])["content"]


class CallFilter:
    """Streamed text without its ``<tool_call>`` blocks: text that may begin one
    is held back until it is known not to (as stop strings are)."""

    def __init__(self) -> None:
        self._buf = ""
        self._inside = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that can go out now."""
        self._buf += text
        out = []
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return "".join(out)
                self._buf, self._inside = self._buf[end + len(CLOSE):], False
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                out.append(self._buf[:start])
                self._buf, self._inside = self._buf[start + len(OPEN):], True
                continue
            hold = _partial_suffix(self._buf, OPEN)
            out.append(self._buf[: len(self._buf) - hold])
            self._buf = self._buf[len(self._buf) - hold:]
            return "".join(out)

    def finish(self) -> str:
        """What was held back, at the end (nothing if a block never closed)."""
        rest, self._buf = ("" if self._inside else self._buf), ""
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that is a beginning of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
