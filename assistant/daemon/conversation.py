"""The conversation a chat request sends to the model.

Either the request's own ``messages``, or a session's history plus the new
``prompt`` (the user's message is stored before generation starts); then
the system prompt, the skills offered as tools, and roles merged so they
alternate, as many chat templates require.
"""

from __future__ import annotations

from typing import Any

from assistant.daemon import tools
from assistant.daemon.params import Chat, invalid

Message = dict[str, str]


def check_messages(messages: Any) -> list[Message]:
    """A request's ``messages``: a non-empty list of {role, content} with a known role."""
    if not isinstance(messages, list) or not messages:
        raise invalid("parameter 'messages': expected a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise invalid(f"parameter 'messages[{i}]': expected {{role: system|user|assistant, content: string}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def alternate(messages: list[Message]) -> list[Message]:
    """Merge consecutive messages of one role: many chat templates (Gemma's
    among them) refuse a conversation whose roles do not alternate, which
    happens when a turn failed and the user asked again."""
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "system":
            out[-1] = {"role": m["role"], "content": out[-1]["content"] + "\n\n" + m["content"]}
        else:
            out.append(dict(m))
    return out


def from_request(p: Chat) -> tuple[list[Message], str | None]:
    """The messages the request gives, and the new user text (None with ``messages``)."""
    if p.messages is not None:
        if p.session is not None:
            raise invalid("give either 'messages' or 'session' with 'prompt', not both")
        messages = check_messages(p.messages)
        if p.system is not None:
            messages = [{"role": "system", "content": p.system}] + [m for m in messages if m["role"] != "system"]
        return messages, None
    if p.prompt is None:
        raise invalid("missing parameter 'prompt'")
    return [], p.prompt


def history_messages(history: list[dict[str, Any]]) -> list[Message]:
    """A stored session's turns as chat messages."""
    return [{"role": m["role"], "content": m["content"]} for m in history
            if m["role"] in ("user", "assistant") and m["content"]]


def with_system(messages: list[Message], system: str | None) -> list[Message]:
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}] + messages
    return messages


def tools_param(value: Any, skills: dict[str, Any]) -> set[str]:
    """``tools: true`` offers every skill to the model; a list offers those named."""
    if value in (None, False):
        return set()
    if value is True:
        return set(skills)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        unknown = [v for v in value if v not in skills]
        if unknown:
            raise invalid(f"parameter 'tools': no skill {unknown[0]!r}; known: {', '.join(sorted(skills)) or 'none'}")
        return set(value)
    raise invalid("parameter 'tools': expected true or a list of skill names")


def with_tools(messages: list[Message], allowed: set[str], skills: dict[str, Any]) -> list[Message]:
    """The system prompt that describes the allowed skills as tools (Hermes format)."""
    offered = [skills[n] for n in sorted(allowed)]
    base = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    rest = messages[1:] if base is not None else messages
    return [{"role": "system", "content": tools.system_prompt(offered, base)}] + rest
