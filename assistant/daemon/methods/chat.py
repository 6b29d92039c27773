"""``chat``: one reply from a model, streamed, with tools, kept in a session.

The request path: parameters are parsed at the edge; the user's message is
stored (on disk before generation starts); the model is fetched from the
registry (loaded if needed, and a draft model with it); the conversation is
rendered with the model's own template and generated on the model's thread,
text deltas going out as ``chat.delta`` notifications; skills the model
calls as tools run and the model goes on; the reply is stored, and only then
is the final response sent.

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

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from backends.base import Backend, ContextOverflowError
from backends.chat_template import ChatTemplateError

from assistant.daemon import chat_settings, conversation, drafts, params, remote_chat, tools
from assistant.daemon.methods import MethodTable
from assistant.daemon.methods.sessions import store_call
from assistant.daemon.server import TextStream
from assistant.daemon.worker import (BACKGROUND, Busy, CancelFlag, ModelWorker, Ticket, Withdrawn, WorkerClosed,
                                     prefill_in_steps)
from assistant.inference import speculative
from assistant.inference.constraints import ConstraintError
from assistant.inference.generation import GenerationResult, common_prefix, generate
from assistant.inference.stats import GenerationStats
from assistant.protocol import ErrorCode, RPCError

rpc = MethodTable()


@dataclass
class Turn:
    """What one chat request works with, once its parameters are checked."""

    p: params.Chat
    messages: list[dict[str, str]]
    session: str | None = None
    user_message: dict[str, Any] | None = None
    tools: set[str] = field(default_factory=set)
    raw: str | None = None  # a prompt sent as it is, without the chat template (HTTP's completions)


def _no_tool_events(event: dict[str, Any]) -> None:
    pass


@dataclass
class Caller:
    """Who a chat is for and where its output goes (a JSON-RPC request, an HTTP request).

    ``cancel`` stops it (set from any thread); ``client`` is its scheduling
    identity (clients take turns); ``deltas`` takes the text as it comes:
    ``push(text)`` from the model's thread, ``flush()`` on the loop (a
    ``server.TextStream``); ``on_tool`` gets each skill call's outcome."""

    cancel: CancelFlag
    client: Any
    deltas: Any
    on_tool: Callable[[dict[str, Any]], None] = _no_tool_events


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
    turn = Turn(p, [], raw=raw) if raw is not None else await _prepare(d, p, offered)
    worker = await d.models.get(turn.p.model, backend=p.backend, hold=True)
    try:
        return await _reply(d, caller, turn, worker, ticket, spec_request, started)
    except RPCError as exc:
        if exc.code == ErrorCode.BUSY and turn.user_message is not None:
            # Refused before it waited: the client asks again, the message must not be there twice.
            await store_call(d, d.store.delete_messages_from, turn.session, turn.user_message["id"])
        raise
    finally:
        d.models.release(worker, keep_alive)


async def _reply(d, caller: Caller, turn: Turn, worker: ModelWorker, ticket: Ticket,
                 spec_request: dict[str, Any], started: float) -> dict[str, Any]:
    """Generate with ``worker``, store the reply in the session, report it."""
    spec = dataclasses.replace(chat_settings.configured(d.config, worker.key), **spec_request)
    wants_draft = spec.wants_draft_model() and not worker.remote  # a server's model drafts there, if at all
    draft = await drafts.load_draft(d.models, worker, spec.draft_model) if wants_draft else None
    gens, tool_calls = await _generate(d, caller, turn, worker, ticket, spec, draft, started)
    gen = gens[-1]
    stats = dataclasses.replace(gen.stats, completion_tokens=sum(g.stats.completion_tokens or 0 for g in gens),
                                tool_calls=len(tool_calls) or None).as_dict()
    if ticket.yields:  # a background reply that let interactive ones go first
        stats.update(yielded=ticket.yields, yielded_ms=round(ticket.yielded_s * 1000, 1))
    worker.record(stats)
    text = "".join(g.text for g in gens)
    reply: dict[str, Any] = {"text": text, "finish_reason": gen.finish_reason, "stats": stats, "model": worker.key}
    if tool_calls:
        reply["tool_calls"] = tool_calls
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


async def _prepare(d, p: params.Chat, offered: dict[str, Any] | None = None) -> Turn:
    """The conversation: the request's messages, or the session's history and the new
    message (stored now); the system prompt; the skills (or the caller's ``offered``
    tools) described as tools."""
    messages, user_text = conversation.from_request(p)
    turn = Turn(p, messages)
    if p.session is not None:
        sess = await store_call(d, d.store.ensure_session, p.session, model=p.model, system_prompt=p.system)
        if p.system is not None and sess.get("system_prompt") != p.system:
            await store_call(d, d.store.update_session, p.session, system_prompt=p.system)
            sess["system_prompt"] = p.system
        turn.p = dataclasses.replace(p, model=p.model or sess.get("model"), system=sess.get("system_prompt"))
        turn.session = p.session
        turn.messages = conversation.history_messages(await d.db(d.store.messages, p.session))
        turn.user_message = await store_call(d, d.store.add_message, p.session, "user", user_text)
    if user_text is not None:
        turn.messages.append({"role": "user", "content": user_text})
    system = turn.p.system if turn.p.system is not None else d.config.system_prompt
    turn.messages = conversation.with_system(turn.messages, system)
    turn.tools = conversation.tools_param(p.tools, d.plugins.skills)
    if turn.tools:
        turn.messages = conversation.with_tools(turn.messages, turn.tools, d.plugins.skills)
    elif offered:
        turn.messages = conversation.with_tools(turn.messages, set(offered), offered)
    turn.messages = conversation.alternate(turn.messages)
    return turn


async def _generate(d, caller: Caller, turn: Turn, worker: ModelWorker, ticket: Ticket,
                    spec: chat_settings.SpecSettings, draft: Backend | None,
                    started: float) -> tuple[list[GenerationResult], list[dict[str, Any]]]:
    """Generate, running the skills the model calls and letting it go on, up to MAX_TOOL_ROUNDS."""
    sampling, max_tokens = chat_settings.sampling(turn.p, d.config, worker.spec)
    deltas = caller.deltas

    def work(messages: list[dict[str, str]]) -> GenerationResult:
        if worker.remote:  # the server generates: the turn's messages and settings go there
            return remote_chat.generate(worker.backend, messages, sampling, max_tokens=max_tokens, stop=turn.p.stop,
                                        on_text=deltas.push, cancel=ticket.cancel, started=started,
                                        ignore_eos=turn.p.ignore_eos, label=worker.key, raw=turn.raw)
        backend = worker.backend_for(ticket)  # background work: a context of its own where memory allows
        engine = chat_settings.engine(spec, backend, draft, d.drafters, d.calibration, worker.costs)  # bad ones fail here
        text = turn.raw if turn.raw is not None else backend.apply_chat_template(messages)
        prompt = backend.tokenize(text, special=True)
        gate = worker.checkpoint(ticket, engine, backend)  # the cancel flag, and where background work gives way
        early = _prefill_in_steps(backend, prompt, gate) if ticket.priority == BACKGROUND else None
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
