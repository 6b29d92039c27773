"""The conversation a chat request sends to the model.

Either the request's own ``messages``, or a session's history plus the new
``prompt`` (the user's message is stored before generation starts); then
the system prompt, the skills offered as tools, and roles merged so they
alternate, as many chat templates require.

A message is ``{role, content}``, plus ``parts`` where it holds media: its
content parts (``assistant.daemon.media.parts``: parsed from the request;
once ingested, the parts a session keeps), ``content`` being its text. Only
a user's message may hold media.
"""

from __future__ import annotations

from typing import Any

from assistant.daemon import tools
from assistant.daemon.media.parts import has_media, parse_content
from assistant.daemon.params import Chat, invalid

Message = dict[str, Any]


def message_of(role: str, content: Any, where: str, *, local: bool) -> Message:
    """One message from a request's content (a string or content parts, checked)."""
    value = parse_content(content, where, local=local)
    if isinstance(value, str):
        return {"role": role, "content": value}
    if has_media(value) and role != "user":
        raise invalid(f"parameter {where!r}: only a user's message may hold images or audio")
    text = "\n".join(p["text"] for p in value if isinstance(p, dict) and p.get("text"))
    if not has_media(value):
        return {"role": role, "content": text}
    return {"role": role, "content": text, "parts": value}


def check_messages(messages: Any, *, local: bool = True) -> list[Message]:
    """A request's ``messages``: a non-empty list of {role, content} with a known role,
    content a string or content parts (``local``: paths may name media)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("parameter 'messages': expected a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), (str, list)):
            raise invalid(f"parameter 'messages[{i}]': expected {{role: system|user|assistant, "
                          "content: a string or a list of content parts}")
        out.append(message_of(m["role"], m["content"], f"messages[{i}].content", local=local))
    return out


def _parts(m: Message) -> list[dict[str, Any]]:
    return m["parts"] if m.get("parts") else ([{"type": "text", "text": m["content"]}] if m["content"] else [])


def alternate(messages: list[Message]) -> list[Message]:
    """Merge consecutive messages of one role: many chat templates (Gemma's
    among them) refuse a conversation whose roles do not alternate, which
    happens when a turn failed and the user asked again. Media parts keep their order."""
    out: list[Message] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"] and m["role"] != "system":
            prev = out[-1]
            merged: Message = {"role": m["role"], "content": prev["content"] + "\n\n" + m["content"]}
            if prev.get("parts") or m.get("parts"):
                merged["parts"] = _parts(prev) + _parts(m)
            out[-1] = merged
        else:
            out.append(dict(m))
    return out


def from_request(p: Chat, *, local: bool = True) -> tuple[list[Message], Message | None]:
    """The messages the request gives, and the new user message (None with ``messages``).
    ``local``: the caller is the daemon's own user over its socket (paths may name media)."""
    if p.messages is not None:
        if p.session is not None:
            raise invalid("give either 'messages' or 'session' with 'prompt', not both")
        messages = check_messages(p.messages, local=local)
        if p.system is not None:
            messages = [{"role": "system", "content": p.system}] + [m for m in messages if m["role"] != "system"]
        return messages, None
    if p.prompt is None:
        raise invalid("missing parameter 'prompt'")
    return [], message_of("user", p.prompt, "prompt", local=local)


def history_messages(history: list[dict[str, Any]]) -> list[Message]:
    """A stored session's turns as chat messages (with their media parts)."""
    out: list[Message] = []
    for m in history:
        if m["role"] not in ("user", "assistant") or not (m["content"] or m.get("parts")):
            continue
        msg: Message = {"role": m["role"], "content": m["content"]}
        if m.get("parts"):
            msg["parts"] = m["parts"]
        out.append(msg)
    return out


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
