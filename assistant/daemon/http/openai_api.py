"""OpenAI's API: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``, ``/v1/embeddings``.

Requests map onto the daemon's ``chat`` parameters (``incoming``), replies
and chunks are OpenAI's, and our own figures ride along where clients ignore
them: ``x_assistant`` (the reply's full ``stats``: drafter, acceptance,
tokens/s, ttft; its session and message ids; under a ``response_format``
``complete``, whether the reply is whole) and ``timings`` (llama-server's
names, so tools written for it read ours too). In a stream both are on the
chunk that carries ``finish_reason``.

Taken: ``messages`` (text content; in a user message, images as ``image_url``
parts with a ``data:`` URL and audio as ``input_audio`` parts, see
:func:`content_of`; ``tool`` results, assistant ``tool_calls``), ``tools``/``tool_choice``, ``stream``,
``stream_options.include_usage``, ``stop``, ``seed``, ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``response_format``;
and llama-server's extensions ``top_k``, ``min_p``, ``repeat_penalty``,
``ignore_eos``, with ours ``draft``, ``max_draft``, ``keep_alive``, ``session``.
``tool_choice`` ``required`` or a named function constrains the reply to a
call (``tool_choice``).
Ignored: ``presence_penalty``, ``frequency_penalty``, ``user``, ``store``,
``metadata``, ``parallel_tool_calls``, ``service_tier``. Refused (400): more
than one choice (``n``, ``best_of``), ``logprobs``, ``logit_bias``, ``echo``,
``suffix``, and media named by a path, a ``file:`` or an ``http(s):`` URL
(the daemon discloses no files and fetches nothing: media come inline).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
import uuid
from typing import Any

import numpy as np
from aiohttp import web

from assistant.daemon.http import models, toolcalls
from assistant.daemon.http.errors import HttpError, bad_request
from assistant.daemon.http.incoming import (chat_params, client_of, conversation_fields, flag, read_json, service,
                                            session_of)
from assistant.daemon.http.runs import ChatRun, embed
from assistant.daemon.http.streaming import sse, stream_reply
from assistant.daemon.media.parts import Source, has_media, parse_content
from assistant.protocol import RPCError

_PASSED = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "ignore_eos", "draft", "max_draft",
           "keep_alive")
MAX_EMBED_INPUTS = 2048


def routes() -> list[web.RouteDef]:
    return [web.post("/v1/chat/completions", chat_completions), web.post("/v1/completions", completions),
            web.get("/v1/models", list_models), web.get("/v1/models/{name}", get_model),
            web.post("/v1/embeddings", embeddings)]


# -- requests ----------------------------------------------------------------------


def _refuse_unsupported(body: dict[str, Any]) -> None:
    for name in ("n", "best_of"):
        if body.get(name) not in (None, 1):
            raise bad_request(f"'{name}': only one choice is generated (1)", param=name)
    for name in ("logprobs", "top_logprobs", "logit_bias", "echo", "suffix"):
        if body.get(name) not in (None, False, 0, {}, ""):
            raise bad_request(f"'{name}' is not supported", param=name)
    if "audio" in (body.get("modalities") or []):
        raise bad_request("audio output is not supported", param="modalities")


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """The decoding fields of an OpenAI request as ``chat`` parameters."""
    out = {k: body[k] for k in _PASSED if body.get(k) is not None}
    limit = body.get("max_completion_tokens")
    limit = body.get("max_tokens") if limit is None else limit
    if limit is not None:
        out["max_tokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        out["stop"] = [stop] if isinstance(stop, str) else stop
    if body.get("response_format") is not None:  # checked and compiled by the chat parameters (llguidance)
        out["response_format"] = body["response_format"]
    return out


def content_of(value: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as the daemon's: a string (null, a string, or text parts joined
    by newlines), or, where it holds media, the ``chat`` content parts (text, and
    ``{"type": "image"|"audio", "data": <base64>}``). Media come inline only: OpenAI's
    ``image_url`` with a ``data:`` URL, ``input_audio``, or our ``image``/``audio`` parts
    with ``data``; a path, ``file:`` or ``http(s):`` URL is a 400 (see the module docstring).
    The bytes are checked on the chat path (MEDIA_INVALID, MEDIA_TOO_LARGE)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        parsed = parse_content(value, where, local=False, allow_empty=True)
    except RPCError as exc:  # INVALID_PARAMS naming the part
        raise bad_request(exc.message, param="messages") from None
    if not has_media(parsed):
        return "\n".join(p["text"] for p in parsed)
    out: list[dict[str, Any]] = []
    for p in parsed:
        if isinstance(p, Source):
            out.append({"type": p.kind, "data": p.data, **({"name": p.name} if p.name else {})})
        else:
            out.append(p)
    return out


def text_only(content: str | list[dict[str, Any]], where: str) -> str:
    """``content`` of a message that may not hold media (system, assistant, tool)."""
    if isinstance(content, list):
        raise bad_request(f"'{where}': only a user's message may hold images or audio", param="messages")
    return content


def fields_of(messages: list[dict[str, Any]], session: str | None) -> dict[str, Any]:
    """The chat parameters for a conversation (``incoming.conversation_fields``), where the
    new turn may hold media: with a session, its messages' parts in order become the
    ``prompt``'s content parts."""
    if session is None or not any(isinstance(m["content"], list) for m in messages):
        return conversation_fields(messages, session)
    last_reply = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    if any(isinstance(m["content"], list) for m in messages[:last_reply + 1]):
        raise bad_request("with a session, media can be sent only in the new turn (what is before the last "
                          "assistant message is already stored)", param="messages")
    parts: list[dict[str, Any]] = []
    for m in messages[last_reply + 1:]:
        if m["role"] == "system" or not m["content"]:
            continue
        parts.extend(m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}])
    fields: dict[str, Any] = {"session": session, "prompt": parts}
    systems = [m["content"] for m in messages if m["role"] == "system"]
    if systems:  # as conversation_fields: the last system message sets the session's system prompt
        fields["system"] = systems[-1]
    return fields


def plain_messages(raw: Any) -> list[dict[str, Any]]:
    """OpenAI messages as the daemon's {role, content}: tool results and calls in the model's
    own tool format (``toolcalls``), ``developer`` as ``system``; a user's content may be
    content parts with media (:func:`content_of`)."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list", param="messages")
    names: dict[str, str] = {}  # tool_call_id -> function name
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object", param="messages")
        role, content = m.get("role"), content_of(m.get("content"), f"{where}.content")
        if role == "developer":
            role = "system"
        if role != "user":
            content = text_only(content, where)
        if role == "assistant" and m.get("tool_calls"):
            content += "".join(_call_text(call, names, where) for call in _list(m["tool_calls"], where))
        elif role in ("tool", "function"):
            name = names.get(m.get("tool_call_id")) or m.get("name")
            content, role = toolcalls.result_text(name if isinstance(name, str) else None, content), "user"
        elif role not in ("system", "user", "assistant"):
            raise bad_request(f"'{where}.role' must be system, developer, user, assistant or tool", param="messages")
        out.append({"role": role, "content": content})
    return out


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise bad_request(f"'{where}.tool_calls' must be a list", param="messages")
    return value


def _call_text(call: Any, names: dict[str, str], where: str) -> str:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(f"'{where}.tool_calls' entries need function.name", param="messages")
    if isinstance(call.get("id"), str):
        names[call["id"]] = fn["name"]
    return toolcalls.call_text(fn["name"], fn.get("arguments", {}))


# -- replies -----------------------------------------------------------------------


def usage(stats: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = stats.get("prompt_tokens") or 0, stats.get("completion_tokens") or 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_prompt_tokens") or 0}}


def timings(stats: dict[str, Any]) -> dict[str, Any]:
    """The reply's figures under llama-server's ``timings`` names."""
    cached = stats.get("cached_prompt_tokens") or 0
    prompt_n = max(0, (stats.get("prompt_tokens") or 0) - cached)
    prompt_ms = stats.get("prefill_ms") or 0.0
    predicted_n = stats.get("completion_tokens") or 0
    predicted_ms = max(0.0, (stats.get("total_ms") or 0.0) - prompt_ms - (stats.get("queue_ms") or 0.0))
    return {"cache_n": cached, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_second": round(prompt_n / prompt_ms * 1000, 2) if prompt_ms and prompt_n else None,
            "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 2),
            "predicted_per_second": stats.get("tokens_per_second"),
            "draft_n": stats.get("drafted") or 0, "draft_n_accepted": stats.get("accepted") or 0}


def extra(reply: dict[str, Any]) -> dict[str, Any]:
    """Our field: the stats, and where the reply is kept."""
    out: dict[str, Any] = {"stats": reply["stats"], "finish_reason": reply["finish_reason"]}
    if reply.get("complete") is not None:  # under a response_format: whether the reply is whole
        out["complete"] = reply["complete"]
    for key in ("session", "message_id", "user_message_id"):
        if reply.get(key) is not None:
            out[key] = reply[key]
    return out


def finish_reason(reply: dict[str, Any], calls: list) -> str:
    if calls:
        return "tool_calls"
    return "length" if reply["finish_reason"] == "length" else "stop"


def openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": toolcalls.call_id(), "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


class _Meta:
    """What every object of one reply repeats: its id, time and model name."""

    def __init__(self, prefix: str, model: str):
        self.id, self.created, self.model = f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time()), model

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


class ChatChunks:
    """A chat reply as ``chat.completion.chunk`` events."""

    content_type = "text/event-stream"

    def __init__(self, meta: _Meta, include_usage: bool, tools_offered: bool):
        self.meta, self.include_usage = meta, include_usage
        self.filter = toolcalls.CallFilter() if tools_offered else None

    def _chunk(self, delta: dict[str, Any], finish: str | None = None, **more: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**self.meta.head("chat.completion.chunk"), "choices": [choice], **more})

    def start(self) -> bytes:
        return self._chunk({"role": "assistant", "content": ""})

    def piece(self, text: str) -> bytes:
        text = self.filter.feed(text) if self.filter is not None else text
        return self._chunk({"content": text}) if text else b""

    def end(self, reply: dict[str, Any]) -> bytes:
        out, calls = b"", []
        if self.filter is not None:
            rest = self.filter.finish()
            out += self._chunk({"content": rest}) if rest else b""
            calls = toolcalls.split(reply["text"])[1]
        if calls:
            out += self._chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(openai_calls(calls))]})
        out += self._chunk({}, finish_reason(reply, calls), x_assistant=extra(reply), timings=timings(reply["stats"]))
        if self.include_usage:
            out += sse({**self.meta.head("chat.completion.chunk"), "choices": [], "usage": usage(reply["stats"])})
        return out + b"data: [DONE]\n\n"

    def error(self, error: HttpError) -> bytes:
        return sse(error.openai_body()) + b"data: [DONE]\n\n"


class TextChunks(ChatChunks):
    """A completion as ``text_completion`` events."""

    def _text(self, text: str, finish: str | None = None, **more: Any) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return sse({**self.meta.head("text_completion"), "choices": [choice], **more})

    def start(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
        return self._text(text) if text else b""

    def end(self, reply: dict[str, Any]) -> bytes:
        out = self._text("", finish_reason(reply, []), x_assistant=extra(reply), timings=timings(reply["stats"]))
        if self.include_usage:
            out += sse({**self.meta.head("text_completion"), "choices": [], "usage": usage(reply["stats"])})
        return out + b"data: [DONE]\n\n"


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", param="stream_options")
    return flag(opts, "include_usage")


# -- handlers ----------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    body = await read_json(request)
    _refuse_unsupported(body)
    model = models.resolve(svc.config, body.get("model"))
    offered = toolcalls.offered(body.get("tools"), body.get("tool_choice"))
    fields = fields_of(plain_messages(body.get("messages")), session_of(request, body))
    p = chat_params({**fields, **sampling(body), "model": model})
    forced = await toolcalls.enforced(offered, body.get("tool_choice"))
    if forced is not None:  # "required" or a named function: the reply is constrained to one call
        p = dataclasses.replace(p, response_format=forced)
    stream = flag(body, "stream")
    meta = _Meta("chatcmpl", body.get("model") or svc.config.model)
    async with ChatRun(svc.runs, client_of(request), p, stream=stream, offered=offered) as run:
        if stream:
            return await stream_reply(request, run, ChatChunks(meta, _include_usage(body), bool(offered)),
                                      svc.stall_timeout)
        reply = await run.result()
    content, calls = toolcalls.split(reply["text"]) if offered else (reply["text"], [])
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = openai_calls(calls)
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(reply, calls)}
    return web.json_response({**meta.head("chat.completion"), "choices": [choice], "usage": usage(reply["stats"]),
                              "timings": timings(reply["stats"]), "x_assistant": extra(reply)})


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise bad_request("'prompt' must be a string (one prompt; token arrays are not supported)", param="prompt")
    if not value:
        raise bad_request("'prompt' is empty", param="prompt")
    return value


async def completions(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    body = await read_json(request)
    _refuse_unsupported(body)
    model = models.resolve(svc.config, body.get("model"))
    prompt = _prompt(body.get("prompt"))
    p = chat_params({**sampling(body), "prompt": prompt, "model": model})
    stream = flag(body, "stream")
    meta = _Meta("cmpl", body.get("model") or svc.config.model)
    async with ChatRun(svc.runs, client_of(request), p, stream=stream, raw=prompt) as run:
        if stream:
            return await stream_reply(request, run, TextChunks(meta, _include_usage(body), False), svc.stall_timeout)
        reply = await run.result()
    choice = {"index": 0, "text": reply["text"], "logprobs": None, "finish_reason": finish_reason(reply, [])}
    return web.json_response({**meta.head("text_completion"), "choices": [choice], "usage": usage(reply["stats"]),
                              "timings": timings(reply["stats"]), "x_assistant": extra(reply)})


def _model_object(entry: dict[str, Any]) -> dict[str, Any]:
    return {"id": entry["name"], "object": "model", "created": int(models.modified(entry)), "owned_by": "assistant"}


async def list_models(request: web.Request) -> web.Response:
    entries = await models.listing(service(request).config)
    return web.json_response({"object": "list", "data": [_model_object(e) for e in entries]})


async def get_model(request: web.Request) -> web.Response:
    svc = service(request)
    name = models.resolve(svc.config, request.match_info["name"])
    for entry in await models.listing(svc.config):
        if entry["name"] == name:
            return web.json_response(_model_object(entry))
    raise HttpError(404, f"the model {name!r} is not available (its file is missing)", code="model_not_found")


def _inputs(value: Any) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise bad_request("'input' must be a string or a non-empty list of strings (token arrays are not "
                          "supported)", param="input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise bad_request(f"'input' has {len(texts)} texts; at most {MAX_EMBED_INPUTS} at a time", param="input")
    if any(not t for t in texts):
        raise bad_request("'input' holds an empty string", param="input")
    return texts


async def embeddings(request: web.Request) -> web.Response:
    svc = service(request)
    body = await read_json(request)
    model = models.resolve(svc.config, body.get("model"))
    texts = _inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    vectors, tokens, _key = await embed(svc.runs, client_of(request), model, texts)
    dims = body.get("dimensions")
    if dims is not None and dims != len(vectors[0]):
        raise bad_request(f"'dimensions': this model's embeddings have {len(vectors[0])} dimensions",
                          param="dimensions")

    def encoded(vec: list[float]) -> Any:
        if encoding == "float":
            return vec
        return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")

    data = [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)]
    return web.json_response({"object": "list", "data": data, "model": body.get("model") or svc.config.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})
