"""Ollama's API: ``/api/chat``, ``/api/generate`` (newline-delimited JSON streaming,
on by default as in Ollama), ``/api/tags``, ``/api/show``, ``/api/ps``,
``/api/version``, ``/api/embed`` and ``/api/embeddings``.

Options taken: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
``repeat_penalty``, ``seed``, ``num_predict`` (negative: the daemon's
default), ``stop``; the others (``num_ctx``, ``num_thread``, mirostat...) are
ignored. ``format`` (``"json"`` or a JSON schema) becomes ``response_format``.
``keep_alive`` is the daemon's own (same syntax). ``/api/generate`` with an
empty prompt loads the model (``done_reason: "load"``), and with
``keep_alive: 0`` unloads it (``"unload"``), as Ollama does. Durations are
nanoseconds. The final object also carries ``x_assistant`` (our stats).

Images: a message's (or ``/api/generate``'s) ``images``, a list of base64
strings as Ollama takes them (a ``data:`` URL too), go before the message's
text as image parts; a path or URL instead of data is a 400 (the daemon
discloses no files and fetches nothing). Their bytes are checked on the chat
path like any medium (``MEDIA_INVALID``, ``MEDIA_TOO_LARGE``).
"""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

from aiohttp import web

from assistant import __version__
from assistant.config.models import resolve_model
from assistant.daemon.http import models, toolcalls
from assistant.daemon.http.errors import HttpError, bad_request, from_rpc
from assistant.daemon.http.incoming import chat_params, client_of, flag, read_json, service, session_of
from assistant.daemon.http.openai_api import content_of, extra, fields_of, text_only
from assistant.daemon.http.runs import ChatRun, embed
from assistant.daemon.http.streaming import ndjson, stream_reply
from assistant.protocol import ErrorCode, RPCError

# The Ollama API level these endpoints follow (clients read it to know what they may call).
OLLAMA_API_VERSION = "0.6.0"
_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed")


def routes() -> list[web.RouteDef]:
    return [web.post("/api/chat", chat), web.post("/api/generate", generate), web.get("/api/tags", tags),
            web.post("/api/show", show), web.get("/api/ps", ps), web.get("/api/version", version),
            web.post("/api/embed", embed_many), web.post("/api/embeddings", embed_one)]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


# -- requests ----------------------------------------------------------------------


def sampling(body: dict[str, Any]) -> dict[str, Any]:
    """Ollama's ``options``, ``format`` and ``keep_alive`` as ``chat`` parameters."""
    opts = body.get("options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'options' must be an object")
    out = {k: opts[k] for k in _OPTIONS if opts.get(k) is not None}
    limit = opts.get("num_predict")
    if isinstance(limit, int) and not isinstance(limit, bool) and limit < 0:
        limit = None  # -1 (until the end) and -2 (fill the context): the daemon's own limit
    if limit is not None:
        out["max_tokens"] = limit
    if opts.get("stop") is not None:
        out["stop"] = [opts["stop"]] if isinstance(opts["stop"], str) else opts["stop"]
    if body.get("keep_alive") is not None:
        out["keep_alive"] = body["keep_alive"]
    fmt = body.get("format")
    if fmt not in (None, ""):
        if fmt == "json":
            out["response_format"] = {"type": "json_object"}
        elif isinstance(fmt, dict):
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}
        else:
            raise bad_request("'format' must be \"json\" or a JSON schema")
    return out


_NOT_DATA = ("~", ".", "file:", "http:", "https:")


def images_of(value: Any, where: str) -> list[dict[str, Any]]:
    """Ollama's ``images`` (base64 strings) as image parts; a path or URL is a 400."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise bad_request(f"'{where}' must be a list of base64-encoded images")
    for v in value:
        head = v[:300]
        # A path or URL: base64 has no ".", ":" or "~", and an image's starts with a letter or "/9j/".
        if head.startswith(_NOT_DATA) or (head.startswith("/") and "." in head and not v.startswith("/9j/")):
            raise bad_request(f"'{where}': images must be base64 data; file paths and URLs are not taken over "
                              "HTTP (the daemon discloses no files and fetches nothing)")
    return [{"type": "image", "data": v} for v in value]


def with_images(content: Any, images: list[dict[str, Any]]) -> Any:
    """``content`` (a string or parts) with ``images`` before its text, as parts."""
    if not images:
        return content
    text = [{"type": "text", "text": content}] if isinstance(content, str) and content else \
        (content if isinstance(content, list) else [])
    return images + text


def plain_messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama messages as the daemon's {role, content} (tool calls and results in the model's
    format); a user message's ``images`` as image parts before its text."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"'{where}' must be an object")
        role, content = m.get("role"), content_of(m.get("content"), f"{where}.content")
        images = images_of(m.get("images"), f"{where}.images")
        if role == "user":
            content = with_images(content, images)
        elif images:
            raise bad_request(f"'{where}.images': only a user's message may hold images")
        else:
            content = text_only(content, where)
        if role == "assistant" and m.get("tool_calls"):
            calls = m["tool_calls"] if isinstance(m["tool_calls"], list) else []
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise bad_request(f"'{where}.tool_calls' entries need function.name")
                content += toolcalls.call_text(fn["name"], fn.get("arguments", {}))
        elif role == "tool":
            name = m.get("tool_name") or m.get("name")
            content, role = toolcalls.result_text(name if isinstance(name, str) else None, content), "user"
        elif role not in ("system", "user", "assistant"):
            raise bad_request(f"'{where}.role' must be system, user, assistant or tool")
        out.append({"role": role, "content": content})
    return out


def _model(svc: Any, body: dict[str, Any]) -> str | None:
    return models.resolve(svc.config, body.get("model") or body.get("name"))


# -- replies -----------------------------------------------------------------------


def figures(stats: dict[str, Any]) -> dict[str, Any]:
    """The reply's figures in Ollama's names (nanoseconds)."""
    ns = 1_000_000
    total, prefill, queue = stats.get("total_ms") or 0.0, stats.get("prefill_ms") or 0.0, stats.get("queue_ms") or 0.0
    return {"total_duration": int(total * ns), "load_duration": 0, "prompt_eval_count": stats.get("prompt_tokens") or 0,
            "prompt_eval_duration": int(prefill * ns), "eval_count": stats.get("completion_tokens") or 0,
            "eval_duration": int(max(0.0, total - prefill - queue) * ns)}


def done_reason(reply: dict[str, Any]) -> str:
    return "length" if reply["finish_reason"] == "length" else "stop"


def ollama_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Calls as Ollama's (arguments an object: one that is not is wrapped as ``value``)."""
    def args(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else {"value": value}
    return [{"function": {"name": c["name"], "arguments": args(c["arguments"])}} for c in calls]


class ChatLines:
    """A chat reply as Ollama's chat objects, one per line."""

    content_type = "application/x-ndjson"

    def __init__(self, model: str, tools_offered: bool):
        self.model = model
        self.filter = toolcalls.CallFilter() if tools_offered else None

    def _line(self, message: dict[str, Any], done: bool = False, **more: Any) -> bytes:
        return ndjson({"model": self.model, "created_at": now(), "message": {"role": "assistant", **message},
                       "done": done, **more})

    def start(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
        text = self.filter.feed(text) if self.filter is not None else text
        return self._line({"content": text}) if text else b""

    def end(self, reply: dict[str, Any]) -> bytes:
        out, calls = b"", []
        if self.filter is not None:
            rest = self.filter.finish()
            out += self._line({"content": rest}) if rest else b""
            calls = toolcalls.split(reply["text"])[1]
        if calls:
            out += self._line({"content": "", "tool_calls": ollama_calls(calls)})
        return out + self._line({"content": ""}, True, done_reason=done_reason(reply), **figures(reply["stats"]),
                                x_assistant=extra(reply))

    def error(self, error: HttpError) -> bytes:
        return ndjson(error.ollama_body())


class GenerateLines(ChatLines):
    """A generation as Ollama's generate objects, one per line."""

    def _response(self, text: str, done: bool = False, **more: Any) -> bytes:
        return ndjson({"model": self.model, "created_at": now(), "response": text, "done": done, **more})

    def piece(self, text: str) -> bytes:
        return self._response(text) if text else b""

    def end(self, reply: dict[str, Any]) -> bytes:
        return self._response("", True, done_reason=done_reason(reply), **figures(reply["stats"]),
                              x_assistant=extra(reply))


# -- handlers ----------------------------------------------------------------------


async def chat(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    body = await read_json(request)
    model = _model(svc, body)
    offered = toolcalls.offered(body.get("tools"))
    fields = fields_of(plain_messages(body.get("messages")), session_of(request, body))
    p = chat_params({**fields, **sampling(body), "model": model})
    stream = flag(body, "stream", True)
    name = body.get("model") or svc.config.model
    async with ChatRun(svc.runs, client_of(request), p, stream=stream, offered=offered) as run:
        if stream:
            return await stream_reply(request, run, ChatLines(name, bool(offered)), svc.stall_timeout)
        reply = await run.result()
    content, calls = toolcalls.split(reply["text"]) if offered else (reply["text"], [])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = ollama_calls(calls)
    return web.json_response({"model": name, "created_at": now(), "message": message, "done": True,
                              "done_reason": done_reason(reply), **figures(reply["stats"]),
                              "x_assistant": extra(reply)})


async def generate(request: web.Request) -> web.StreamResponse:
    svc = service(request)
    body = await read_json(request)
    model = _model(svc, body)
    name = body.get("model") or svc.config.model
    for unsupported in ("suffix", "template", "context"):
        if body.get(unsupported):
            raise bad_request(f"'{unsupported}' is not supported")
    prompt = body.get("prompt")
    images = images_of(body.get("images"), "images")
    if prompt in (None, "") and not images:
        return await _load_or_unload(svc, model, name, body.get("keep_alive"))
    if not isinstance(prompt, (str, type(None))):
        raise bad_request("'prompt' must be a string")
    raw = flag(body, "raw")
    if raw and images:
        raise bad_request("'images' cannot go with 'raw' (a raw prompt has no place for them)")
    fields: dict[str, Any] = {"prompt": with_images(prompt or "", images), **sampling(body), "model": model}
    if not raw:
        fields["system"] = body.get("system")
        session = session_of(request, body)
        if session is not None:
            fields["session"] = session
    p = chat_params(fields)
    stream = flag(body, "stream", True)
    async with ChatRun(svc.runs, client_of(request), p, stream=stream, raw=prompt if raw else None) as run:
        if stream:
            return await stream_reply(request, run, GenerateLines(name, False), svc.stall_timeout)
        reply = await run.result()
    return web.json_response({"model": name, "created_at": now(), "response": reply["text"], "done": True,
                              "done_reason": done_reason(reply), **figures(reply["stats"]),
                              "x_assistant": extra(reply)})


async def _load_or_unload(svc: Any, model: str | None, name: str, keep_alive: Any) -> web.Response:
    """Ollama's empty generate: load the model (or, with keep_alive 0, unload it)."""
    unload = keep_alive in (0, "0", "0s")
    try:
        if unload:  # shielded: a client that hangs up must not leave a model half unloaded
            await asyncio.shield(svc.daemon.models.unload(model or svc.config.model))
        else:
            await svc.daemon.models.get(model)
    except RPCError as exc:
        if not (unload and exc.code == ErrorCode.MODEL_NOT_FOUND):  # not loaded: unloaded already
            raise from_rpc(exc) from None
    reason = "unload" if unload else "load"
    return web.json_response({"model": name, "created_at": now(), "response": "", "done": True,
                              "done_reason": reason})


def _details(entry: dict[str, Any], info: dict[str, Any] | None) -> dict[str, Any]:
    info = info or {}
    params = info.get("n_params")
    return {"parent_model": "", "format": "gguf" if str(entry.get("path", "")).endswith(".gguf") else "",
            "family": info.get("architecture") or "", "families": [info["architecture"]] if info.get("architecture")
            else None, "parameter_size": f"{params / 1e6:.0f}M" if params else "",
            "quantization_level": info.get("quantization") or ""}


def _loaded(svc: Any) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in svc.daemon.models.describe() if m.get("state") == "ready"}


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


async def tags(request: web.Request) -> web.Response:
    svc = service(request)
    loaded = _loaded(svc)
    out = [{"name": e["name"], "model": e["name"], "modified_at": _iso(models.modified(e)),
            "size": e.get("size_bytes") or 0, "digest": models.digest(e),
            "details": _details(e, (loaded.get(e["name"]) or {}).get("info"))}
           for e in await models.listing(svc.config)]
    return web.json_response({"models": out})


async def ps(request: web.Request) -> web.Response:
    svc = service(request)
    out = []
    for name, m in _loaded(svc).items():
        info = m.get("info") or {}
        expires = m.get("unload_at") or (time.time() + 10 * 365 * 86400)
        out.append({"name": name, "model": name, "size": info.get("size_bytes") or 0, "size_vram": 0,
                    "digest": models.digest({"path": m.get("path"), "size_bytes": info.get("size_bytes")}),
                    "details": _details({"path": m.get("path")}, info), "expires_at": _iso(expires),
                    "context_length": info.get("context_length")})
    return web.json_response({"models": out})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": OLLAMA_API_VERSION, "assistant": __version__})


def _file_facts(name: str | None, config: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's GGUF metadata without arrays, its path) read from the file, nothing loaded."""
    from backends import gguf
    from backends.base import ModelLoadError

    spec = resolve_model(name, config, ensure=False)
    try:
        meta = gguf.read_metadata(spec.path)
    except ModelLoadError:
        meta = {}
    return {k: v for k, v in meta.items() if not isinstance(v, dict)}, {"path": str(spec.path)}


async def show(request: web.Request) -> web.Response:
    svc = service(request)
    body = await read_json(request)
    model = _model(svc, body)
    key = model or svc.config.model
    try:
        meta, entry = await asyncio.get_running_loop().run_in_executor(None, _file_facts, model, svc.config)
    except Exception as exc:  # noqa: BLE001 - ModelNotFoundError and file errors: the model is not usable
        raise HttpError(404, f"model {key!r} is not available: {exc}", code="model_not_found") from None
    info = (_loaded(svc).get(key) or {}).get("info") or {
        "architecture": meta.get("general.architecture"), "n_params": meta.get("general.parameter_count")}
    template = meta.get("tokenizer.chat_template") or ""
    capabilities = ["completion", "tools"] + (["embedding"] if str(entry["path"]).endswith(".gguf") else [])
    model_info = {k: v for k, v in meta.items() if not k.startswith("tokenizer.")}
    return web.json_response({"modelfile": "", "parameters": "", "template": template, "license": "",
                              "details": _details(entry, info), "model_info": model_info,
                              "capabilities": capabilities, "modified_at": _iso(models.modified(entry))})


async def embed_many(request: web.Request) -> web.Response:
    svc = service(request)
    body = await read_json(request)
    model = _model(svc, body)
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise bad_request("'input' must be a non-empty string or list of non-empty strings")
    t0 = time.perf_counter()
    vectors, tokens, _key = await embed(svc.runs, client_of(request), model, texts)
    return web.json_response({"model": body.get("model") or svc.config.model, "embeddings": vectors,
                              "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                              "prompt_eval_count": tokens})


async def embed_one(request: web.Request) -> web.Response:
    svc = service(request)
    body = await read_json(request)
    model = _model(svc, body)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string")
    vectors, _tokens, _key = await embed(svc.runs, client_of(request), model, [prompt])
    return web.json_response({"embedding": vectors[0]})
