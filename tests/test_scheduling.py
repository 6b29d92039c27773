"""Who the model serves next: priorities, yielding, fairness, the queue's bound,
and cancelling a queued request (issue 14: defect 11 and "Under real use").

The real daemon, the real socket, the real SmolLM2 weights. Orders are
asserted, never durations: each test first waits (bounded) until the daemon's
``status`` shows the queue it needs, then lets the model go.
"""

from __future__ import annotations

import asyncio

import pytest

from assistant.client import ChatStream, Client
from assistant.protocol import ErrorCode, RPCError

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "seed": 1}
LONG = {"prompt": "Tell me a very long story.", "ignore_eos": True, **GREEDY}
CONFIG = "threads: 2\ncontext: 2048\npreload: true\n"


async def status_until(c: Client, check, timeout: float = 60) -> dict:
    """Poll ``status`` until ``check(model)`` holds for the loaded model."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        st = await c.call("status")
        if st["models"] and check(st["models"][0]):
            return st["models"][0]
        await asyncio.sleep(0.02)
    raise AssertionError(f"status never showed the expected queue: {st['models']}")


async def first_delta(stream: ChatStream) -> None:
    async for _ in stream:
        return


def finishing_order(streams: dict[str, ChatStream]) -> tuple[list[str], list[asyncio.Task]]:
    """Names in the order their results arrive (the list fills as they do)."""
    order: list[str] = []
    tasks = []
    for name, stream in streams.items():
        task = asyncio.ensure_future(stream.result())
        task.add_done_callback(lambda t, n=name: order.append(n))
        tasks.append(task)
    return order, tasks


async def test_cancelling_a_queued_chat_answers_before_the_running_one_ends(daemon_factory):
    d = daemon_factory(config_text=CONFIG).start()
    async with await d.client("a") as c:
        running = await c.chat(max_tokens=1500, **LONG)
        await first_delta(running)
        queued = await c.chat(prompt="Say hi.", session="s1", max_tokens=8, **GREEDY)
        await status_until(c, lambda m: m["active_requests"] == 2)
        still_running = asyncio.ensure_future(running.result())
        assert await queued.cancel()
        answer = await queued.result()
        assert not still_running.done(), "the cancelled queued chat waited for the running one"
        assert answer["finish_reason"] == "cancelled" and answer["text"] == ""
        assert answer["stats"]["completion_tokens"] == 0
        stored = await c.call("sessions.get", {"id": "s1"})
        assert [(m["role"], m["status"]) for m in stored["messages"]][-1] == ("assistant", "cancelled")
        model = (await c.call("status"))["models"][0]
        assert model["active_requests"] == 1  # dropped from the queue
        await running.cancel()
        assert (await still_running)["finish_reason"] == "cancelled"


async def test_a_person_goes_ahead_of_background_work_which_yields_and_resumes(daemon_factory):
    d = daemon_factory(config_text=CONFIG).start()
    async with await d.client("automation") as bg, await d.client("person") as person:
        background = await bg.chat(max_tokens=200, priority="background", **LONG)
        pieces = []
        async for text in background:
            pieces.append(text)
            if len(pieces) == 3:
                break
        waiting = await bg.chat(prompt="Name a fruit.", max_tokens=8, priority="background", **GREEDY)
        await status_until(person, lambda m: m["queued"]["background"] == 1)
        asked = await person.chat(prompt="Name a color.", max_tokens=16, **GREEDY)
        order, tasks = finishing_order({"background": background, "waiting": waiting, "person": asked})
        pieces += [t async for t in background]
        bg_result, waiting_result, person_result = await asyncio.gather(*tasks)
    # The person's chat did not wait for the long background reply, nor for the queued one.
    assert order[0] == "person", order
    assert person_result["text"]
    # The background reply paused at a step boundary and went on: its stream is whole.
    assert bg_result["stats"]["completion_tokens"] == 200 and bg_result["finish_reason"] == "length"
    assert bg_result["stats"]["yielded"] >= 1 and bg_result["stats"]["yielded_ms"] > 0
    assert "".join(pieces) == bg_result["text"]
    assert waiting_result["text"]


async def test_clients_of_one_priority_take_turns(daemon_factory):
    d = daemon_factory(config_text=CONFIG).start()
    async with await d.client("blocker") as blocker, await d.client("a") as a, await d.client("b") as b:
        hold = await blocker.chat(max_tokens=1500, **LONG)
        await first_delta(hold)
        streams = {}
        for i in (1, 2, 3):  # one client sends three
            streams[f"a{i}"] = await a.chat(prompt=f"Say the number {i}.", max_tokens=4, **GREEDY)
            await status_until(blocker, lambda m, n=i: m["queued"]["interactive"] == n)
        streams["b1"] = await b.chat(prompt="Say hello.", max_tokens=4, **GREEDY)  # another sends one, last
        await status_until(blocker, lambda m: m["queued"]["interactive"] == 4)
        order, tasks = finishing_order(streams)
        await hold.cancel()
        await hold.result()
        await asyncio.gather(*tasks)
    assert order == ["a1", "b1", "a2", "a3"], order


async def test_past_its_bound_the_queue_answers_busy_and_background_never_locks_a_person_out(daemon_factory):
    d = daemon_factory(config_text=CONFIG + "max_queued_requests: 2\n").start()
    async with await d.client("blocker") as blocker, await d.client("auto") as auto, \
            await d.client("person") as person:
        hold = await blocker.chat(max_tokens=1500, **LONG)
        await first_delta(hold)
        queued = []
        for n in (1, 2):
            queued.append(await auto.chat(prompt="Summarise nothing.", max_tokens=4, priority="background", **GREEDY))
            await status_until(blocker, lambda m, n=n: m["queued"]["background"] == n)
        with pytest.raises(RPCError) as busy:
            await (await auto.chat(prompt="One more.", max_tokens=4, priority="background", **GREEDY)).result()
        assert busy.value.code == ErrorCode.BUSY
        assert "busy" in busy.value.message and busy.value.data["limit"] == 2
        # A person is not refused for background work waiting...
        for n in (1, 2):
            queued.append(await person.chat(prompt="Hi.", max_tokens=4, **GREEDY))
            await status_until(blocker, lambda m, n=n: m["queued"]["interactive"] == n)
        # ...only past the bound of people waiting; a session forgets the refused message.
        with pytest.raises(RPCError) as busy:
            await (await person.chat(prompt="And me?", session="busy", max_tokens=4, **GREEDY)).result()
        assert busy.value.code == ErrorCode.BUSY
        assert (await person.call("sessions.get", {"id": "busy"}))["messages"] == []
        await hold.cancel()
        results = await asyncio.gather(hold.result(), *(s.result() for s in queued))
    assert all(r["finish_reason"] in ("stop", "length", "cancelled") for r in results)
    assert all(r["text"] for r in results[1:])


async def test_bad_priority_is_invalid_params(daemon_factory):
    d = daemon_factory(config_text=CONFIG.replace("preload: true", "preload: false")).start()
    async with await d.client() as c:
        with pytest.raises(RPCError) as err:
            await (await c.chat(prompt="hi", priority="urgent")).result()
    assert err.value.code == ErrorCode.INVALID_PARAMS and "priority" in err.value.message


@pytest.mark.parametrize("own_context", [True, False], ids=["own-context", "shared-cache"])
async def test_a_background_reply_that_yields_is_the_reply_it_would_have_been(monkeypatch, own_context):
    """In process (the real registry, llama.cpp, SmolLM2): a background generation that
    gives way to interactive ones mid-reply ends with the text of an uninterrupted run,
    whether it has a context of its own or shares (and rebuilds) the one cache."""
    from backends import BackendRegistry

    from assistant.config import parse_config
    from assistant.daemon.registry import ModelRegistry
    from assistant.daemon.worker import BACKGROUND, INTERACTIVE, CancelFlag, Ticket
    from assistant.inference.generation import generate
    from assistant.inference.sampling import SamplingParams
    from assistant.machine import hardware

    monkeypatch.setattr(ModelRegistry, "_second_context", staticmethod(lambda worker: own_context))
    # drafting on: a K cache whose batches equal one-token steps, so a rebuilt cache decodes the same
    registry = ModelRegistry(parse_config(CONFIG), hardware.probe(), BackendRegistry.builtin(),
                             lambda *a, **k: None, drafting_on=lambda name: True)
    worker = await registry.get("smollm2-135m", hold=True)

    def job(prompt: str, ticket: Ticket, n: int, started: asyncio.Event | None, loop):
        backend = worker.backend_for(ticket)
        tokens = backend.tokenize(backend.apply_chat_template([{"role": "user", "content": prompt}]))
        on_text = (lambda text: loop.call_soon_threadsafe(started.set)) if started else None
        return generate(backend, tokens, SamplingParams(temperature=0.0), max_tokens=n, ignore_eos=True,
                        on_text=on_text, cancel=worker.checkpoint(ticket, None, backend))

    loop = asyncio.get_running_loop()
    story = "Tell me a long story about a lighthouse."
    try:
        alone = await worker.run(job, story, Ticket(BACKGROUND, "a", CancelFlag()), 120, None, loop,
                                 ticket=Ticket(BACKGROUND, "a", CancelFlag()))
        ticket, started = Ticket(BACKGROUND, "bg", CancelFlag()), asyncio.Event()
        background = asyncio.ensure_future(worker.run(job, story, ticket, 120, started, loop, ticket=ticket))
        await started.wait()
        person = Ticket(INTERACTIVE, "person", CancelFlag())
        answers = [await worker.run(job, q, person, 4, None, loop, ticket=person)
                   for q in ("Name a color.", "Name a fruit.")]
        result = await background
        assert not background.cancelled() and result.text == alone.text
        assert ticket.yields >= 1 and ticket.yielded_s > 0
        assert all(a.text for a in answers)
        assert (worker.background_backend is not None) == own_context
        if own_context:  # the person's cache was never touched by the background reply
            cached = worker.backend.detokenize(worker.backend.cached_tokens)
            assert "Name a fruit." in cached and "lighthouse" not in cached
    finally:
        registry.release(worker)
        await registry.unload_all()
