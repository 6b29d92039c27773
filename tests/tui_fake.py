"""A stand-in for ``assistant.client.Client`` with canned, deterministic data.

The snapshot tests render the TUI against it (no daemon, no clock, no pids,
no paths), and ``bench/tui_startup.py`` streams a synthetic reply through it
at a fixed rate. It answers the methods the TUI uses, the same shapes as the
daemon (see docs/protocol.md). Behaviour tests use the real daemon instead.
It lives in tests/, not in the package: nothing the TUI ships runs against
it. The app takes it through ``AssistantApp(client_factory=...)``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from assistant.protocol import ErrorCode, RPCError

T0 = 1_700_000_000.0  # fixed timestamps: snapshots must not depend on the clock

STATS = {"backend": "llama.cpp", "model": "smollm2-135m", "prompt_tokens": 31, "cached_prompt_tokens": 0,
         "completion_tokens": 8, "ttft_ms": 41.2, "prefill_ms": 38.0, "queue_ms": 0.1, "tokens_per_second": 104.7,
         "total_ms": 110.3, "context_length": 2048, "context_used": 38, "context_full": False,
         "finish_reason": "stop", "drafter": "ngram", "drafted": 12, "accepted": 9, "acceptance_rate": 0.75}


def demo_sessions() -> dict[str, dict[str, Any]]:
    code = ("Here is a function that reverses a string:\n\n```python\ndef reverse(text: str) -> str:\n"
            "    return text[::-1]\n```\n\nIt uses **slicing** with a step of `-1`.")
    return {
        "s-python": {"id": "s-python", "title": "Reverse a string", "created": T0, "updated": T0 + 60,
                     "model": None, "system_prompt": "You are a concise programming assistant.",
                     "settings": {"temperature": 0.2, "draft": "ngram"},
                     "messages": [
                         {"id": 1, "role": "user", "content": "How do I reverse a string in Python?",
                          "created": T0, "stats": None, "status": "complete"},
                         {"id": 2, "role": "assistant", "content": code, "created": T0 + 1, "stats": STATS,
                          "status": "complete"}]},
        "s-paris": {"id": "s-paris", "title": "Capital of France", "created": T0 - 3600, "updated": T0 - 3000,
                    "model": None, "system_prompt": None, "settings": {},
                    "messages": [
                        {"id": 3, "role": "user", "content": "Tell me the capital of France.", "created": T0 - 3600,
                         "stats": None, "status": "complete"},
                        {"id": 4, "role": "assistant", "content": "The capital of France is Paris.",
                         "created": T0 - 3599, "stats": STATS, "status": "complete"}]},
        "s-empty": {"id": "s-empty", "title": None, "created": T0 - 7200, "updated": T0 - 7200, "model": None,
                    "system_prompt": None, "settings": {}, "messages": []},
    }


PLUGINS = [
    {"name": "core", "version": "0.1.0", "source": "core", "status": "loaded",
     "hooks": ["register_backends", "register_drafters"], "error": None, "problems": []},
    {"name": "filewatch", "version": "0.1.0", "source": "entry point (local-assistant 0.1.0)", "status": "loaded",
     "hooks": ["register_skills", "startup", "shutdown"], "error": None, "problems": []},
    {"name": "weather", "version": "0.2.0", "source": "entry point (assistant-weather 0.2.0)", "status": "failed",
     "hooks": [], "error": "ImportError: No module named 'requests'", "problems": []},
    {"name": "shout", "version": None, "source": "file: plugins/shout.py", "status": "disabled", "hooks": [],
     "error": None, "problems": []},
]

SKILLS = [
    {"name": "filewatch.rules", "description": "List the file-watching rules.", "plugin": "filewatch",
     "parameters": {"type": "object", "properties": {}}},
    {"name": "vision.describe", "description": "Describe an image.", "plugin": "vision",
     "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "prompt": {"type": "string"}},
                    "required": ["path"]}},
]

EVENTS = [
    {"type": "daemon.started", "time": T0, "source": "daemon", "data": {"pid": 4242}},
    {"type": "model.loaded", "time": T0 + 2, "source": "daemon",
     "data": {"model": "smollm2-135m", "backend": "llama.cpp", "path": "/models/smollm2.gguf"}},
    {"type": "filewatch.run", "time": T0 + 30, "source": "filewatch",
     "data": {"rule": "summarise-notes", "path": "notes/today.md", "status": "ok", "result": "wrote today.summary.md"}},
    {"type": "chat.finished", "time": T0 + 61, "source": "daemon",
     "data": {"session": "s-python", "model": "smollm2-135m", "finish_reason": "stop", "completion_tokens": 42,
              "tokens_per_second": 104.7}},
]


class FakeStream:
    """Like ``client.ChatStream``: iterate for deltas, ``result()``, ``cancel()``."""

    def __init__(self, client: "FakeClient", rid: int, tokens: list[str], rate: float | None,
                 on_produce: Callable[[int, str], None] | None, *, media: str | None = None,
                 error: RPCError | None = None):
        self._client = client
        self._media = media  # stats.media of the reply (None: no media in the message)
        self._error = error  # the daemon refuses the request: no deltas, result() raises
        self.id = rid
        self.text = ""
        self._queue: asyncio.Queue = asyncio.Queue()
        self._future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._cancel = asyncio.Event()
        self._tokens = tokens
        self._rate = rate
        self._on_produce = on_produce
        self._task = asyncio.ensure_future(self._produce())

    async def _produce(self) -> None:
        if self._error is not None:
            await asyncio.sleep(0)
            self._queue.put_nowait(None)
            self._future.set_exception(self._error)
            return
        start = time.perf_counter()
        reason = "stop"
        for i, tok in enumerate(self._tokens):
            if self._rate:
                delay = start + (i + 1) / self._rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self._cancel.is_set():
                reason = "cancelled"
                break
            self.text += tok
            if self._on_produce is not None:
                self._on_produce(i, tok)
            self._queue.put_nowait(tok)
        self._queue.put_nowait(None)
        stats = dict(STATS, completion_tokens=len(self._tokens), finish_reason=reason)
        if self._media:
            stats["media"] = self._media
        self._future.set_result(self._client._finish(self, reason, stats))

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            yield item

    async def chunks(self) -> AsyncIterator[str]:
        while True:
            item = await self._queue.get()
            parts: list[str] = []
            while item is not None:
                parts.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if parts:
                yield "".join(parts)
            if item is None:
                return

    async def result(self) -> dict[str, Any]:
        return await self._future

    async def cancel(self) -> bool:
        self._cancel.set()
        return True


class FakeClient:
    """Canned daemon. ``reply`` (text or a list of token strings) is what every chat answers;
    ``rate``: tokens per second (None: as fast as possible)."""

    def __init__(self, *, sessions: dict[str, dict[str, Any]] | None = None, reply: str | list[str] =
                 "The capital of France is Paris.", rate: float | None = None,
                 on_produce: Callable[[int, str], None] | None = None, events: list[dict[str, Any]] | None = None,
                 plugins: list[dict[str, Any]] | None = None, skills: list[dict[str, Any]] | None = None,
                 modalities: list[str] | None = None):
        """``modalities``: what the loaded model takes (``info.modalities`` in ``models.list``);
        None leaves ``info`` out, as before a model says. A chat message's media parts are
        read natively for those kinds, else by the fallback skill (``vision.ocr``,
        ``audio.transcribe``) when ``skills`` has it, else refused with MEDIA_UNSUPPORTED."""
        self.socket_path = Path("/fake/assistant.sock")
        self.server_info = {"protocol_version": 1, "daemon_version": "0.1.0", "pid": 1,
                            "capabilities": ["chat", "sessions.rewind"], "plugins": ["core", "filewatch"],
                            "default_model": "smollm2-135m"}
        self.sessions = copy.deepcopy(demo_sessions() if sessions is None else sessions)
        self.reply = reply
        self.rate = rate
        self.on_produce = on_produce
        self.events = EVENTS if events is None else events
        self.plugins = PLUGINS if plugins is None else plugins
        self.skills = SKILLS if skills is None else skills
        self.modalities = modalities
        self.on_notification: Callable[[str, dict[str, Any]], None] | None = None
        self.closed = asyncio.Event()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self._ids = 100
        self._next_session = 1
        self._pending_user: dict[int, dict[str, Any]] = {}

    async def __aenter__(self) -> "FakeClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed.set()

    def _session(self, sid: str) -> dict[str, Any]:
        if sid not in self.sessions:
            raise RPCError(ErrorCode.SESSION_NOT_FOUND, f"no session {sid!r}")
        return self.sessions[sid]

    @staticmethod
    def _public(s: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in s.items() if k != "messages"}
        out["message_count"] = len(s["messages"])
        return out

    def _new_id(self) -> int:
        self._ids += 1
        return self._ids

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        params = params or {}
        self.calls.append((method, params))
        await asyncio.sleep(0)
        if method == "status":
            return {"models": [{"name": "smollm2-135m", "backend": "llama.cpp", "state": "ready"}]}
        if method == "models.list":
            loaded = {"name": "smollm2-135m", "backend": "llama.cpp", "state": "ready"}
            if self.modalities is not None:
                loaded["info"] = {"modalities": list(self.modalities)}
            return {"loaded": [loaded],
                    "available": [{"name": "smollm2-135m"}, {"name": "gemma3-270m"}], "default": "smollm2-135m"}
        if method == "models.load":
            return {"name": params.get("model"), "backend": params.get("backend") or "llama.cpp", "state": "ready"}
        if method == "sessions.list":
            ordered = sorted(self.sessions.values(), key=lambda s: -s["updated"])
            return {"sessions": [self._public(s) for s in ordered]}
        if method == "sessions.get":
            s = self._session(params["id"])
            return {**self._public(s), "messages": copy.deepcopy(s["messages"])}
        if method == "sessions.create":
            sid = params.get("id") or f"s-new{self._next_session}"
            self._next_session += 1
            updated = max([s["updated"] for s in self.sessions.values()] + [T0]) + 1
            self.sessions[sid] = {"id": sid, "title": params.get("title"), "created": updated, "updated": updated,
                                  "model": params.get("model"), "system_prompt": params.get("system"),
                                  "settings": params.get("settings") or {}, "messages": []}
            return self._public(self.sessions[sid])
        if method == "sessions.update":
            s = self._session(params["id"])
            for key, field in (("title", "title"), ("model", "model"), ("system", "system_prompt"),
                               ("settings", "settings")):
                if key in params:
                    s[field] = params[key]
            return self._public(s)
        if method == "sessions.delete":
            self._session(params["id"])
            del self.sessions[params["id"]]
            return {"deleted": params["id"]}
        if method == "sessions.export":
            s = self._session(params["id"])
            parts = [f"# {s['title'] or 'Session ' + s['id']}"]
            parts += [f"**{m['role'].title()}**\n\n{m['content']}" for m in s["messages"]]
            return {"markdown": "\n\n".join(parts) + "\n"}
        if method == "sessions.rewind":
            s = self._session(params["id"])
            before = len(s["messages"])
            s["messages"] = [m for m in s["messages"] if m["id"] < params["message_id"]]
            return {"deleted": before - len(s["messages"])}
        if method == "plugins.list":
            return {"plugins": self.plugins}
        if method == "skills.list":
            return {"skills": self.skills}
        if method == "skills.call":
            return {"result": f"A picture ({Path(params['arguments'].get('path', '?')).name})."}
        if method == "events.subscribe":
            return {"subscribed": params.get("types", ["*"]), "recent": self.events}
        if method == "cancel":
            return {"cancelled": True}
        raise RPCError(ErrorCode.METHOD_NOT_FOUND, f"unknown method {method!r}")

    async def chat(self, **params: Any) -> FakeStream:
        self.calls.append(("chat", params))
        rid = self._new_id()
        tokens = self.reply if isinstance(self.reply, list) else _words(self.reply)
        try:
            content, parts, media = self._read_parts(params.get("prompt", ""))
        except RPCError as exc:  # refused before anything is stored, as the daemon does
            return FakeStream(self, rid, tokens, self.rate, self.on_produce, error=exc)
        sid = params.get("session")
        if sid is not None:
            s = self.sessions.setdefault(sid, {"id": sid, "title": None, "created": T0, "updated": T0,
                                               "model": None, "system_prompt": None, "settings": {},
                                               "messages": []})
            user = {"id": self._new_id(), "role": "user", "content": content, "created": T0,
                    "stats": None, "status": "complete"}
            if parts is not None:  # as the daemon keeps a message with media: its text, and its parts
                user["parts"] = parts
            s["messages"].append(user)
            self._pending_user[rid] = user
        return FakeStream(self, rid, tokens, self.rate, self.on_produce, media=media)

    def _read_parts(self, prompt: Any) -> tuple[str, list[dict[str, Any]] | None, str | None]:
        """A message as the session keeps it (its text, and its parts when it holds media: media
        by sha256, no path) and the reply's stats.media; RPCError for a part the daemon would
        refuse (the shapes of docs/protocol.md, checked loosely). A stored part (sha256, as
        sessions.get gives it) is taken back, as the daemon does over its socket."""
        if isinstance(prompt, str):
            return prompt, None, None
        if not isinstance(prompt, list):
            raise RPCError(ErrorCode.INVALID_PARAMS, "parameter 'prompt': expected a string or a list of parts")
        stored, paths = [], []
        for i, part in enumerate(prompt):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                stored.append({"type": "text", "text": str(part.get("text", ""))})
                continue
            if kind not in ("image", "audio"):
                raise RPCError(ErrorCode.INVALID_PARAMS, f"part {i}: unknown type {kind!r}")
            if part.get("sha256"):
                path, sha = None, str(part["sha256"])
            else:
                path = Path(str(part.get("path", "")))
                if not path.is_absolute() or not path.is_file():
                    raise RPCError(_code("MEDIA_INVALID"), f"part {i}: cannot read {path}")
                sha = hashlib.sha256(path.read_bytes()).hexdigest()
            if kind in (self.modalities or []):
                how = "native"
            elif any(s.get("name") == FALLBACK[kind] for s in self.skills):
                how = "ocr" if kind == "image" else "transcript"
            else:
                raise RPCError(_code("MEDIA_UNSUPPORTED"),
                               f"smollm2-135m cannot read {kind} and no {FALLBACK[kind]} skill is installed")
            if how not in paths:
                paths.append(how)
            stored.append({"type": kind, "sha256": sha, "mime": "image/png" if kind == "image" else "audio/wav",
                           "name": part.get("name") or (path.name if path else None)})
        text = "\n".join(p["text"] for p in stored if p["type"] == "text" and p["text"])
        if not paths:
            return text, None, None
        return text, stored, "+".join(p for p in ("native", "ocr", "transcript") if p in paths)

    def _finish(self, stream: FakeStream, reason: str, stats: dict[str, Any]) -> dict[str, Any]:
        reply = {"text": stream.text, "finish_reason": reason, "model": "smollm2-135m", "stats": stats}
        user = self._pending_user.pop(stream.id, None)
        if user is not None:
            for s in self.sessions.values():
                if user in s["messages"]:
                    msg = {"id": self._new_id(), "role": "assistant", "content": stream.text, "created": T0,
                           "stats": stats, "status": "cancelled" if reason == "cancelled" else "complete"}
                    s["messages"].append(msg)
                    s["updated"] = max(x["updated"] for x in self.sessions.values()) + 1
                    reply.update(session=s["id"], message_id=msg["id"], user_message_id=user["id"])
                    break
        return reply

    def emit(self, event: dict[str, Any]) -> None:
        """Deliver an event notification, as the daemon does after events.subscribe."""
        if self.on_notification is not None:
            self.on_notification("event", event)


FALLBACK = {"image": "vision.ocr", "audio": "audio.transcribe"}


def _code(name: str) -> int:
    """The daemon's error code ``name`` (INVALID_PARAMS on a protocol.py that has not got it yet)."""
    return int(getattr(ErrorCode, name, ErrorCode.INVALID_PARAMS))


def _words(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        if ch == " " and word:
            out.append(word)
            word = ""
        word += ch
    if word:
        out.append(word)
    return out
