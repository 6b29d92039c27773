"""Keep-alive: idle models unload after ``keep_alive`` (the config's, or a chat
request's own, as Ollama takes it), and ``status`` / ``models.list`` say when.

The real daemon and SmolLM2 where a model is needed; waits are bounded polls,
never timing assertions.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from assistant.client import Client
from assistant.config import ConfigError, parse_config, parse_duration
from assistant.protocol import ErrorCode, RPCError

GREEDY = {"temperature": 0.0, "seed": 1}
CONFIG = "threads: 2\ncontext: 2048\npreload: true\n"


@pytest.mark.parametrize("value, seconds", [
    (300, 300.0), (2.5, 2.5), ("300", 300.0), ("10m", 600.0), ("1h30m", 5400.0), ("500ms", 0.5),
    ("0", 0.0), (0, 0.0), (-1, None), ("-1", None), ("-5m", None), (" 2s ", 2.0),
])
def test_durations_read_as_ollama_takes_them(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", ["soon", "", "5 m", "1d", "m", True, None, [], float("nan")])
def test_bad_durations_are_refused(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_config_keep_alive_is_checked_and_kept_as_written(tmp_path):
    assert parse_config("").keep_alive == "5m"
    assert parse_config("keep_alive: 10m\n").keep_alive == "10m"
    assert parse_config("keep_alive: -1\n").keep_alive == -1
    with pytest.raises(ConfigError) as err:
        parse_config("threads: 2\nkeep_alive: soon\n", tmp_path / "c.yaml")
    assert str(err.value).startswith(f"{tmp_path / 'c.yaml'}:2: keep_alive: expected a duration")
    with pytest.raises(ConfigError):
        parse_config("max_queued_requests: 0\n")


async def model_state(c: Client) -> dict | None:
    models = (await c.call("status"))["models"]
    return models[0] if models else None


async def until_unloaded(c: Client, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if await model_state(c) is None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError("the model was never unloaded")


@pytest.mark.slow
async def test_status_and_models_list_say_when_a_model_unloads(daemon_factory):
    d = daemon_factory(config_text=CONFIG).start()
    async with await Client.connect(d.socket, client_name="test") as c:
        await (await c.chat(prompt="Say hi.", max_tokens=2, **GREEDY)).result()
        m = await model_state(c)
        assert m["keep_alive_s"] == 300  # the config's default: 5 minutes
        assert 0 < m["unload_in_s"] <= 300 and abs(m["unload_at"] - (time.time() + m["unload_in_s"])) < 30

        await (await c.chat(prompt="Say hi.", max_tokens=2, keep_alive="10m", **GREEDY)).result()
        listed = (await c.call("models.list"))["loaded"][0]
        assert listed["keep_alive_s"] == 600 and 300 < listed["unload_in_s"] <= 600
        assert abs(listed["unload_at"] - (time.time() + listed["unload_in_s"])) < 30

        # While a request holds it, it is not going anywhere.
        stream = await c.chat(prompt="Tell me a long story.", max_tokens=400, ignore_eos=True, **GREEDY)
        async for _ in stream:
            break
        busy = await model_state(c)
        assert busy["requests_held"] == 1 and busy["unload_at"] is None and busy["unload_in_s"] is None
        await stream.cancel()
        await stream.result()

        await (await c.chat(prompt="Say hi.", max_tokens=2, keep_alive=-1, **GREEDY)).result()
        kept = await model_state(c)
        assert kept["keep_alive_s"] == -1 and kept["unload_at"] is None and kept["unload_in_s"] is None

        with pytest.raises(RPCError) as err:
            await (await c.chat(prompt="Say hi.", keep_alive="whenever")).result()
        assert err.value.code == ErrorCode.INVALID_PARAMS and "keep_alive" in err.value.message


@pytest.mark.slow
async def test_keep_alive_zero_unloads_right_after_the_request_and_the_next_one_reloads(daemon_factory):
    d = daemon_factory(config_text=CONFIG).start()
    async with await Client.connect(d.socket, client_name="test") as c:
        await c.call("events.subscribe", {"types": ["model.*"], "backlog": 0})
        events = []
        c.on_notification = lambda method, params: events.append(params) if method == "event" else None
        first = await (await c.chat(prompt="Say hi.", max_tokens=4, keep_alive=0, **GREEDY)).result()
        await until_unloaded(c)
        for _ in range(100):
            if any(e["type"] == "model.unloaded" for e in events):
                break
            await asyncio.sleep(0.05)
        assert [e["data"] for e in events if e["type"] == "model.unloaded"] == \
            [{"model": "smollm2-135m", "reason": "keep_alive"}]
        again = await (await c.chat(prompt="Say hi.", max_tokens=4, **GREEDY)).result()
        assert again["text"] == first["text"]
        assert (await model_state(c))["state"] == "ready"


@pytest.mark.slow
async def test_the_config_keep_alive_gives_the_memory_back(daemon_factory):
    d = daemon_factory(config_text=CONFIG + "keep_alive: 1s\n").start()
    async with await Client.connect(d.socket, client_name="test") as c:
        await (await c.chat(prompt="Say hi.", max_tokens=2, **GREEDY)).result()
        await until_unloaded(c)
    assert "(keep_alive)" in d.stderr()
