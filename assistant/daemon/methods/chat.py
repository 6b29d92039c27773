"""``chat``: one reply from a model, streamed, with tools, kept in a session.

The request path: parameters are parsed at the edge; the user's message is
stored (on disk before any of the reply goes out: its commit runs while the
model reads the prompt, and the text waits for it, see ``_AfterCommit``);
the model is fetched from the registry (loaded if needed, and a draft model
with it); the conversation is rendered with the model's own template and
generated on the model's thread, text deltas going out as ``chat.delta``
notifications; skills the model calls as tools run and the model goes on;
the reply is stored, and only then is the final response sent.

Media (images, audio; ``assistant.daemon.media``): a message's media parts
are read, checked and stored before the user's message is (a bad medium is
an error and leaves the session as it was); once the model is known each
medium is routed: read natively (``Backend.tokenize_media`` on the model's
thread), turned into a fallback skill's text (OCR, transcript), or refused
(``MEDIA_UNSUPPORTED``); the reply's ``stats.media`` says which paths ran.

Scheduling: the request holds its model from ``get`` to its end (no eviction
or keep-alive unload meanwhile) and queues on it with a ``Ticket`` (its
priority, its connection for fairness, its cancel flag): a cancel while it
waits answers at once; past the queue's bound it is refused with ``BUSY``
(and a session forgets the message it was refused for).

``respond`` is that path for every caller: the JSON-RPC ``chat`` handler
here and the HTTP API (``assistant.daemon.http``) each describe who asks and
where the text goes (a ``Caller``) and call it, so sessions, scheduling,
stats and tools are the same whichever door a request came through.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.base import Backend, ContextOverflowError, MediaError
from backends.media import MediaInput
from backends.chat_template import ChatTemplateError

from assistant.daemon import chat_settings, conversation, drafts, params, remote_chat, tools
from assistant.daemon.methods import MethodTable
from assistant.daemon.media import Limits, ingest, routing
from assistant.daemon.methods.sessions import media_store, store_call
from assistant.daemon.server import TextStream
from assistant.daemon.worker import (BACKGROUND, Busy, CancelFlag, ModelWorker, Ticket, Withdrawn, WorkerClosed,
                                     prefill_in_steps)
from assistant.inference import speculative
from assistant.inference.constraints import ConstraintError
from assistant.inference.generation import GenerationResult, common_prefix, generate
from assistant.inference.stats import GenerationStats
from assistant.protocol import ErrorCode, RPCError

rpc = MethodTable()

# Errors that mean the model never read the request: a session does not keep its message.
_REFUSED = frozenset({ErrorCode.BUSY, ErrorCode.MEDIA_INVALID, ErrorCode.MEDIA_TOO_LARGE, ErrorCode.MEDIA_UNSUPPORTED})


@dataclass
class Turn:
    """What one chat request works with, once its parameters are checked."""

    p: params.Chat
    messages: list[dict[str, Any]]
    session: str | None = None
    user_message: dict[str, Any] | None = None  # once stored (``storing`` done)
    storing: asyncio.Future | None = None  # the user message's commit, in flight beside the prefill
    tools: set[str] = field(default_factory=set)
    raw: str | None = None  # a prompt sent as it is, without the chat template (HTTP's completions)
    media: list[MediaInput] = field(default_factory=list)  # read natively, one per marker, in order
    media_label: str | None = None  # stats.media: "native", "ocr", "transcript", "remote", joined by "+"
    notes: list[str] = field(default_factory=list)  # what the user should be told (a GIF's first frame)
    refused: bool = False  # its media could not be routed: the user's message is taken back


def _no_tool_events(event: dict[str, Any]) -> None:
    pass


@dataclass
class Caller:
    """Who a chat is for and where its output goes (a JSON-RPC request, an HTTP request).

    ``cancel`` stops it (set from any thread); ``client`` is its scheduling
    identity (clients take turns); ``deltas`` takes the text as it comes:
    ``push(text)`` from the model's thread, ``flush()`` on the loop (a
    ``server.TextStream``); ``on_tool`` gets each skill call's outcome. ``local``: the
    daemon's own user over its socket, whose media parts may name files (HTTP's may not)."""

    cancel: CancelFlag
    client: Any
    deltas: Any
    on_tool: Callable[[dict[str, Any]], None] = _no_tool_events
    local: bool = True


@rpc.method("chat", params.Chat)
async def chat(d, req, p: params.Chat) -> dict[str, Any]:
    # A flag that says when it is set, so a generation still queued leaves the queue
    # at once on cancel or disconnect (the server makes a plain Event, only pollable).
    req.cancel = CancelFlag.adopt(req.cancel)
    caller = Caller(req.cancel, getattr(req.conn, "id", None), TextStream(req.conn, "chat.delta", {"id": req.id}),
                    lambda event: req.conn.notify("chat.tool", {"id": req.id, **event}))
    return await respond(d, p, caller)


async def respond(d, p: params.Chat, caller: Caller, *, raw: str | None = None,
                  offered: dict[str, Any] | None = None) -> dict[str, Any]:
    """One reply for ``caller``: the chat path (see the module docstring). ``raw``: a prompt
    to send as it is (no template, no session). ``offered``: tools the caller runs itself
    (name -> an object with name, description and parameters), described to the model
    but never run here: their calls stay in the reply's text for the caller to take."""
    started = time.perf_counter()
    ticket = Ticket(chat_settings.priority(p), client=caller.client, cancel=caller.cancel)
    keep_alive = chat_settings.keep_alive(p)
    spec_request = chat_settings.requested(p, d.drafters)
    turn = Turn(p, [], raw=raw) if raw is not None else await _prepare(d, p, offered, local=caller.local)
    caller = _gated(caller, turn)
    try:
        worker = await d.models.get(turn.p.model, backend=p.backend, hold=True)
        try:
            return await _reply(d, caller, turn, worker, ticket, spec_request, started)
        except RPCError as exc:
            if turn.storing is not None and (exc.code in _REFUSED or turn.refused):
                # Refused before the model read it (busy; media it cannot take): the client asks
                # again, the message must not be there twice.
                await _forget_message(d, turn)
            raise
        finally:
            d.models.release(worker, keep_alive)
    finally:
        if turn.storing is not None:  # an error's answer, too, comes after the message's commit ended
            await asyncio.wait([turn.storing])


async def _reply(d, caller: Caller, turn: Turn, worker: ModelWorker, ticket: Ticket,
                 spec_request: dict[str, Any], started: float) -> dict[str, Any]:
    """Generate with ``worker``, store the reply in the session, report it."""
    spec = dataclasses.replace(chat_settings.configured(d.config, worker.key), **spec_request)
    wants_draft = spec.wants_draft_model() and not worker.remote  # a server's model drafts there, if at all
    draft = await drafts.load_draft(d.models, worker, spec.draft_model) if wants_draft else None
    try:
        await _route_media(d, turn, worker)
    except RPCError:
        turn.refused = True
        raise
    gens, tool_calls = await _generate(d, caller, turn, worker, ticket, spec, draft, started)
    await _committed(turn, caller.deltas)  # the store's error, if the user's message could not be kept
    gen = gens[-1]
    stats = dataclasses.replace(gen.stats, completion_tokens=sum(g.stats.completion_tokens or 0 for g in gens),
                                tool_calls=len(tool_calls) or None, media=turn.media_label).as_dict()
    if ticket.yields:  # a background reply that let interactive ones go first
        stats.update(yielded=ticket.yields, yielded_ms=round(ticket.yielded_s * 1000, 1))
    worker.record(stats)
    text = "".join(g.text for g in gens)
    reply: dict[str, Any] = {"text": text, "finish_reason": gen.finish_reason, "stats": stats, "model": worker.key}
    if tool_calls:
        reply["tool_calls"] = tool_calls
    if turn.notes:
        reply["notes"] = turn.notes
    if turn.p.response_format is not None and gen.complete is not None:
        reply["complete"] = gen.complete  # a whole reply of its grammar (not cut by max_tokens or a stop)
    if turn.session is not None:
        status = "complete" if gen.finish_reason != "cancelled" else "cancelled"
        msg = await store_call(d, d.store.add_message, turn.session, "assistant", text, stats=stats, status=status)
        reply.update(session=turn.session, message_id=msg["id"],
                     user_message_id=turn.user_message["id"] if turn.user_message else None)
    d.emit("chat.finished", {"session": turn.session, "model": worker.key, "finish_reason": gen.finish_reason,
                             "completion_tokens": stats.get("completion_tokens"),
                             "tokens_per_second": stats.get("tokens_per_second")})
    return reply


async def _prepare(d, p: params.Chat, offered: dict[str, Any] | None = None, *, local: bool = True) -> Turn:
    """The conversation: the request's messages, or the session's history and the new
    message (its commit started, ``Turn.storing``); the system prompt; the skills (or
    the caller's ``offered`` tools) described as tools. Media parts are read, checked
    and stored first: a bad one fails the request before anything is kept."""
    messages, user = conversation.from_request(p, local=local)
    await _ingest(d, messages + ([user] if user is not None else []))
    user_text = user["content"] if user is not None else None
    turn = Turn(p, messages)
    if p.session is not None:
        sess = await store_call(d, d.store.ensure_session, p.session, model=p.model, system_prompt=p.system)
        if p.system is not None and sess.get("system_prompt") != p.system:
            await store_call(d, d.store.update_session, p.session, system_prompt=p.system)
            sess["system_prompt"] = p.system
        turn.p = dataclasses.replace(p, model=p.model or sess.get("model"), system=sess.get("system_prompt"))
        turn.session = p.session
        turn.messages = conversation.history_messages(await d.db(d.store.messages, p.session))
    if user is not None:
        turn.messages.append(user)
    system = turn.p.system if turn.p.system is not None else d.config.system_prompt
    turn.messages = conversation.with_system(turn.messages, system)
    turn.tools = conversation.tools_param(p.tools, d.plugins.skills)
    if turn.tools:
        turn.messages = conversation.with_tools(turn.messages, turn.tools, d.plugins.skills)
    elif offered:
        turn.messages = conversation.with_tools(turn.messages, set(offered), offered)
    turn.messages = conversation.alternate(turn.messages)
    if turn.session is not None:  # last: nothing here fails after it, and the caller waits for it
        # Committed (an fsync) on the database thread while the model reads the prompt.
        turn.storing = asyncio.ensure_future(store_call(d, d.store.add_message, p.session, "user", user_text,
                                                        parts=user.get("parts")))
    return turn


async def _ingest(d, messages: list[dict[str, Any]]) -> None:
    """Each message's media parts read, checked and stored (``media.ingest``, on a thread:
    file reads, Pillow, fsync), in place: the parts a session keeps."""
    if not any(m.get("parts") for m in messages):
        return
    store, limits = media_store(d), Limits.from_config(d.config)

    def work() -> None:
        for m in messages:
            if m.get("parts"):
                m["parts"] = ingest.ingest(m["parts"], store, limits)
    await asyncio.to_thread(work)


async def _route_media(d, turn: Turn, worker: ModelWorker) -> None:
    """The conversation's media routed for ``worker``'s model (``media.routing``): native
    ones become markers and ``Turn.media``, the others their fallback's text; a remote
    model gets them as OpenAI content parts (its server decides what it takes)."""
    if not routing.needs_routing(turn.messages):
        return
    store = media_store(d)
    if worker.remote:
        turn.messages, _kinds = await asyncio.to_thread(routing.remote_messages, turn.messages, store)
        turn.media_label = "remote"
        return
    backend = worker.backend
    allowed = d.config.media.fallback and turn.p.media_fallback is not False
    routed = await routing.route(
        turn.messages, native=backend.media_support(), marker=backend.media_marker(), store=store,
        skills=d.plugins.skills, call_skill=d.call_skill,
        cache_get=lambda sha, method: d.db(d.store.media_text, sha, method),
        cache_put=lambda sha, method, text: d.db(d.store.put_media_text, sha, method, text),
        fallback=allowed, model=worker.key)
    turn.messages, turn.media, turn.media_label = routed.messages, routed.media, routed.label
    turn.notes.extend(routed.notes)


class _AfterCommit:
    """A reply's deltas (``Caller.deltas``) held back until the user's message is on disk.

    The message's commit runs on the database thread while the model reads the
    prompt (an fsync costs milliseconds that the first token need not wait for),
    but a client that got any of the reply may count on its message being kept
    (DESIGN.md, "Persistence and config"): what the model writes meanwhile
    waits here and goes out, in order, once the commit returned (:meth:`open`,
    on the loop); after a failed commit nothing ever does (:meth:`fail`).
    ``push`` from any thread."""

    def __init__(self, inner: Any):
        self.inner = inner
        self._lock = threading.Lock()
        self._held: list[str] = []
        self._open = False  # set only once what was held went to ``inner``
        self._failed = False
        self._flush = False  # a flush asked for before the commit returned

    def push(self, text: str) -> None:
        if self._open:  # the hot path, without the lock: once open, always open
            self.inner.push(text)
            return
        with self._lock:
            if not self._open:
                if not self._failed:
                    self._held.append(text)
                return
        self.inner.push(text)

    def open(self) -> None:
        """The commit returned: what was held goes out (flushed, if that was asked), then all."""
        with self._lock:
            if self._open or self._failed:
                return
            if self._held:  # under the lock: a push from the model's thread cannot pass it
                self.inner.push("".join(self._held))
                self._held.clear()
            self._open = True
        if self._flush:
            self.inner.flush()

    def fail(self) -> None:
        """The commit failed: nothing of the reply goes out."""
        with self._lock:
            self._failed = True
            self._held.clear()

    def flush(self) -> None:
        if self._open:
            self.inner.flush()
        else:
            self._flush = True


def _gated(caller: Caller, turn: Turn) -> Caller:
    """``caller`` with its deltas behind the user message's commit (``_AfterCommit``), where
    one is in flight; a commit that fails cancels the generation (its error is the answer)."""
    if turn.storing is None:
        return caller
    gate = _AfterCommit(caller.deltas)

    def committed(task: asyncio.Future) -> None:
        if task.cancelled() or task.exception() is not None:
            gate.fail()
            caller.cancel.set()
        else:
            gate.open()
    turn.storing.add_done_callback(committed)
    return dataclasses.replace(caller, deltas=gate)


async def _committed(turn: Turn, deltas: Any) -> None:
    """Wait for the user's message to be on disk (raising the store's error where it could
    not be), and let the reply's text go (``_AfterCommit.open``; the callback may not have run)."""
    if turn.storing is not None:
        turn.user_message = await turn.storing
        deltas.open()


async def _forget_message(d, turn: Turn) -> None:
    """Take the user's message out of its session again, once (and if) it was stored."""
    await asyncio.wait([turn.storing])
    if not turn.storing.cancelled() and turn.storing.exception() is None:
        await store_call(d, d.store.delete_messages_from, turn.session, turn.storing.result()["id"])


async def _generate(d, caller: Caller, turn: Turn, worker: ModelWorker, ticket: Ticket,
                    spec: chat_settings.SpecSettings, draft: Backend | None,
                    started: float) -> tuple[list[GenerationResult], list[dict[str, Any]]]:
    """Generate, running the skills the model calls and letting it go on, up to MAX_TOOL_ROUNDS."""
    sampling, max_tokens = chat_settings.sampling(turn.p, d.config, worker.spec)
    deltas = caller.deltas

    def work(messages: list[dict[str, Any]]) -> GenerationResult:
        if worker.remote:  # the server generates: the turn's messages and settings go there
            return remote_chat.generate(worker.backend, messages, sampling, max_tokens=max_tokens, stop=turn.p.stop,
                                        on_text=deltas.push, cancel=ticket.cancel, started=started,
                                        ignore_eos=turn.p.ignore_eos, label=worker.key, raw=turn.raw)
        # Background work: a context of its own where memory allows (media: the one whose
        # projector routing asked, and whose cache may hold them from the last turn).
        backend = worker.backend if turn.media else worker.backend_for(ticket)
        engine = chat_settings.engine(spec, backend, draft, d.drafters, d.calibration, worker.costs)  # bad ones fail here
        text = turn.raw if turn.raw is not None else backend.apply_chat_template(messages)
        prompt = backend.tokenize_media(text, turn.media) if turn.media else backend.tokenize(text, special=True)
        gate = worker.checkpoint(ticket, engine, backend)  # the cancel flag, and where background work gives way
        # (A media prompt's prefill is generate's: it evaluates each medium at its place.)
        early = _prefill_in_steps(backend, prompt, gate) if ticket.priority == BACKGROUND and not turn.media \
            else None
        result = generate(backend, prompt, sampling, max_tokens=max_tokens, stop=turn.p.stop, on_text=deltas.push,
                          cancel=gate, started=started, ignore_eos=turn.p.ignore_eos, speculative=engine,
                          label=worker.key)
        if early is not None:  # the stats count that prefill as generate's own
            reused, ms = early
            result.stats = dataclasses.replace(result.stats, cached_prompt_tokens=reused,
                                               prefill_ms=round(result.stats.prefill_ms + ms, 2),
                                               queue_ms=round(result.stats.queue_ms - ms, 2))
        return result

    gens: list[GenerationResult] = []
    tool_calls: list[dict[str, Any]] = []
    messages = turn.messages
    while True:
        gens.append(await _run(worker, ticket, work, messages, deltas, spec, started))
        gen = gens[-1]
        calls = tools.parse_calls(gen.text) if turn.tools else []
        if not calls or gen.finish_reason == "cancelled" or len(tool_calls) >= tools.MAX_TOOL_ROUNDS:
            return gens, tool_calls
        # The model asked for skills: run them, hand back the results, let it go on.
        await _committed(turn, caller.deltas)  # tool events, like text, after the user's message is kept
        results = [await _run_tool(d, call, turn.tools, caller) for call in calls]
        tool_calls.extend(results)
        messages = conversation.alternate(messages + [{"role": "assistant", "content": gen.text},
                                                      tools.response_message(results)])


async def _run(worker: ModelWorker, ticket: Ticket, work, messages, deltas: TextStream,
               spec: chat_settings.SpecSettings, started: float) -> GenerationResult:
    """One generation on the model's thread, its errors as protocol errors."""
    try:
        return await worker.run(work, messages, ticket=ticket)
    except Withdrawn:  # cancelled while it waited: answered now, not after the running one
        return _withdrawn(worker, started)
    except Busy as exc:
        raise RPCError(ErrorCode.BUSY, f"model {worker.key!r} is busy: {exc}; try again shortly",
                       {"model": worker.key, "waiting": exc.waiting, "limit": exc.limit}) from None
    except WorkerClosed:
        raise RPCError(ErrorCode.MODEL_NOT_FOUND, f"model {worker.key!r} was unloaded before this request ran") \
            from None
    except ContextOverflowError as exc:
        raise RPCError(ErrorCode.CONTEXT_OVERFLOW, str(exc), {"needed": exc.needed, "available": exc.available}) \
            from None
    except speculative.DraftModelError as exc:
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc), {"draft_model": spec.draft_model}) from None
    except speculative.DrafterError as exc:
        raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    except ChatTemplateError as exc:  # the model's template refused the conversation or went over a bound
        raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    except ConstraintError as exc:  # a response_format this model cannot follow (no end-of-generation token...)
        raise RPCError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    except MediaError as exc:  # a medium the model's own reader refused (a codec its decoder lacks...)
        raise RPCError(ErrorCode.MEDIA_INVALID, str(exc)) from None
    finally:
        deltas.flush()  # every delta goes out before the tool calls or the final response


def _prefill_in_steps(backend: Backend, prompt: list[int], gate) -> tuple[int, float]:
    """A background request's prefill in small steps that give way to a person
    (``worker.prefill_in_steps``); returns (prompt tokens it found cached, ms)."""
    t0 = time.perf_counter()
    reused = min(common_prefix(backend.cached_tokens, prompt), max(0, len(prompt) - 1))
    prefill_in_steps(backend, prompt, gate)
    return reused, (time.perf_counter() - t0) * 1000


def _withdrawn(worker: ModelWorker, started: float) -> GenerationResult:
    """The result of a generation cancelled before it started: nothing generated."""
    info = worker.backend.info
    waited = round((time.perf_counter() - started) * 1000, 2)
    return GenerationResult("", [], "cancelled", GenerationStats(
        backend=info.backend, model=worker.key, prompt_tokens=0, cached_prompt_tokens=0, completion_tokens=0,
        ttft_ms=None, prefill_ms=0.0, queue_ms=waited, tokens_per_second=None, total_ms=waited,
        context_length=info.context_length, context_used=0, context_full=False, finish_reason="cancelled"))


async def _run_tool(d, call: dict[str, Any], allowed: set[str], caller: Caller) -> dict[str, Any]:
    """Run one tool call the model made and tell the caller (``chat.tool`` over JSON-RPC)."""
    if "error" in call:
        result: dict[str, Any] = {"error": call["error"]}
    elif call["name"] not in allowed:
        result = {"name": call["name"], "error": f"no tool {call['name']!r}"}
    else:
        args = call["arguments"] if isinstance(call["arguments"], dict) else {}
        try:
            result = {"name": call["name"], "result": await d.call_skill(call["name"], args)}
        except RPCError as exc:
            result = {"name": call["name"], "error": exc.message}
    caller.on_tool({**({"arguments": call.get("arguments")} if "name" in call else {}), **result})
    return result
