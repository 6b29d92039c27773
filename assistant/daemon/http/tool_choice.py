"""``tool_choice`` enforced: ``"required"`` or a named function makes the reply a tool call.

Offering tools only describes them to the model, which may still answer in
text. For ``required`` and ``{"type": "function", "function": {"name"}}``
the reply is constrained instead, with the same machinery as structured
output (``assistant.inference.constraints``: an llguidance grammar applied
in the daemon's sampler, so on every local backend and with speculative
decoding): it is exactly one call in the daemon's tool-call format
(``assistant.daemon.tools``),

    <tool_call>{"name": "<one of the tools>", "arguments": {...}}</tool_call>

with ``arguments`` valid against that tool's ``parameters`` schema. A
schema the grammar engine cannot enforce (or one over its size bounds)
falls back, for that tool alone, to "any JSON object" (the name is still
enforced), and the reason is logged. Whitespace between JSON tokens is
bounded as in structured output. The grammar is built off the event loop
(``asyncio.to_thread``): a request may carry up to ``toolcalls.MAX_TOOLS``
schemas.

A remote model (``backend: remote``) is not constrained here: the grammar's
``to_openai()`` is None, so nothing is forwarded, and the tools reach the
server as the system prompt's description only.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from assistant.daemon import tools
from assistant.daemon.http.errors import bad_request
from assistant.inference.constraints import ConstraintError, ResponseFormat, parse_response_format
from assistant.inference.constraints.response_format import WHITESPACE

log = logging.getLogger("assistant.daemon.http")

# Any JSON object: the arguments of a tool whose schema cannot be enforced.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# The arguments of a tool without parameters: nothing but {} (OpenAI sends "{}" for those).
NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True)
class ToolCallFormat(ResponseFormat):
    """The grammar of a forced tool call, carried where a ``response_format`` is
    (``SamplingParams.response_format``) so every local decode loop applies it."""

    tools: tuple[str, ...] = ()

    def to_openai(self) -> dict[str, Any] | None:  # type: ignore[override]
        return None  # nothing a server could take for it: tool_choice is enforced locally only


def call_format(specs: dict[str, Any]) -> ToolCallFormat:
    """The constraint that makes a reply one call of one of ``specs`` (name -> an object
    with ``name`` and ``parameters``, as ``toolcalls.offered`` gives). Runs a grammar
    compile per tool: call it in a thread."""
    if not specs:
        raise ValueError("a forced tool call needs at least one tool")
    rules, fallbacks = [], []
    for i, spec in enumerate(specs.values()):
        schema = call_schema(spec.name, spec.parameters)
        try:
            parse_response_format({"type": "json_schema", "json_schema": {"name": "tool_call", "schema": schema}})
        except ConstraintError as exc:
            log.warning("tool %r: its parameters cannot be enforced (%s); its arguments are constrained to "
                        "any JSON object", spec.name, exc)
            schema = call_schema(spec.name, ANY_OBJECT)
            fallbacks.append(spec.name)
        rules.append(f"call{i}: %json " + json.dumps({**schema, "x-guidance": _OPTIONS}, ensure_ascii=False))
    alternatives = " | ".join(f"call{i}" for i in range(len(rules)))
    lark = "\n".join([f"start: {_literal(tools.CALL_OPEN)} ({alternatives}) {_literal(tools.CALL_CLOSE)}",
                      *rules])
    grammar = _compiled(lark)
    warnings = tuple(f"tool {name!r}: arguments constrained to any JSON object" for name in fallbacks)
    return ToolCallFormat("tool_call", name="tool_call", grammar=grammar, warnings=warnings,
                          tools=tuple(specs))


def call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON of one call: ``{"name": <name>, "arguments": <parameters>}``, in that order."""
    return {"type": "object",
            "properties": {"name": {"const": name}, "arguments": parameters or NO_ARGUMENTS},
            "required": ["name", "arguments"], "additionalProperties": False}


# llguidance's options for each call's JSON (lenient: keywords it cannot enforce are ignored, as
# OpenAI does for a function without strict: true).
_OPTIONS = {"whitespace_pattern": WHITESPACE, "lenient": True}


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal: the same quoting and escapes as JSON


def _compiled(lark: str) -> str:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except (ValueError, TypeError) as exc:
        failed, messages = True, [str(exc)]
    if failed:
        raise bad_request(f"'tool_choice': the tools' call grammar cannot be built: {str(messages[0])[:300]}",
                          param="tool_choice")
    return grammar
