"""Skills as tools the model can call during a chat.

The format is the widely used Hermes/Qwen one, which works with any chat
template: the tools are described in the system prompt, and the model
answers a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
The daemon runs the skill, hands the result back inside
``<tool_response>...</tool_response>`` and lets the model go on, for at
most a few rounds.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

MAX_TOOL_ROUNDS = 4
# A call as the model writes it: CALL_OPEN, the JSON {"name", "arguments"}, CALL_CLOSE.
# CALL_PATTERN finds one (group 1: the JSON); the HTTP API's tool calls use the same three.
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALL_PATTERN = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


def system_prompt(skills: Iterable[Any], base: str | None = None) -> str:
    """``base`` plus the tool instructions for ``skills`` (objects with name, description, parameters)."""
    specs = [{"type": "function", "function": {"name": s.name, "description": s.description,
                                               "parameters": s.parameters}} for s in skills]
    lines = [base.strip(), ""] if base else []
    lines += [
        "You can call these tools. To call one, answer with nothing but:",
        '<tool_call>{"name": "<tool name>", "arguments": {<arguments as JSON>}}</tool_call>',
        "The result comes back in a <tool_response> block; then answer the user.",
        "<tools>",
        *(json.dumps(s, ensure_ascii=False) for s in specs),
        "</tools>",
    ]
    return "\n".join(lines)


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The tool calls in a reply: ``{"name", "arguments"}``, or ``{"error"}`` for a malformed one."""
    calls = []
    for raw in CALL_PATTERN.findall(text):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            calls.append({"error": f"the tool call is not valid JSON: {exc}", "raw": raw})
            continue
        if not isinstance(data, dict) or not isinstance(data.get("name"), str):
            calls.append({"error": "a tool call needs a string 'name'", "raw": raw})
            continue
        args = data.get("arguments", {})
        if isinstance(args, str):  # some models double-encode
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        calls.append({"name": data["name"], "arguments": args})
    return calls


def response_message(results: list[dict[str, Any]]) -> dict[str, str]:
    """The message that hands tool results back to the model."""
    body = "\n".join(f"<tool_response>{json.dumps(r, ensure_ascii=False, default=str)}</tool_response>"
                     for r in results)
    return {"role": "user", "content": body}
