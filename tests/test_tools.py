"""Skills as tools the model calls, through the real daemon.

The model here is a scripted backend registered by a test plugin (through
register_backends, like any plugin backend): it answers with a tool call
until it sees a tool response, then with the result. That makes the loop
deterministic; the daemon, the plugin system and the skill are real.
"""

from __future__ import annotations

import textwrap

import pytest

from assistant.daemon import tools
from assistant.protocol import ErrorCode, RPCError

PLUGIN = '''
import re
import numpy as np
from assistant import hookimpl
from backends.base import Backend, ModelInfo

EOS = 256


class Scripted(Backend):
    name = "scripted"

    @classmethod
    def availability(cls):
        return True, "test backend"

    def load(self, path, options=None):
        self._cache = []
        self._info = ModelInfo(name="scripted", path=path, backend="scripted", architecture="script",
                               context_length=8192, train_context_length=8192, vocab_size=257,
                               chat_template=None, template_source="fallback", bos_token_id=None,
                               eos_token_ids=[EOS])
        return self._info

    def unload(self):
        pass

    @property
    def info(self):
        return self._info

    def tokenize(self, text, *, add_bos=True, special=True):
        return list(text.encode())

    def token_bytes(self, token):
        return b"" if token == EOS else bytes([token])

    def is_eog(self, token):
        return token == EOS

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(f"{m['role'].upper()}: {m['content']}\\n" for m in messages) + "ASSISTANT:"

    @property
    def cached_tokens(self):
        return list(self._cache)

    def _next(self):
        text = bytes(self._cache).decode(errors="replace")
        convo, _, said = text.rpartition("ASSISTANT:")
        found = re.findall(r'<tool_response>(.*?)</tool_response>', convo)
        if not found:
            script = '<tool_call>{"name": "calc.add", "arguments": {"a": 2, "b": 3}}</tool_call>'
        else:
            script = "The answer is " + found[-1]
        return ord(script[len(said)]) if len(said) < len(script) else EOS

    def forward(self, tokens, logits_at=None):
        self._cache.extend(tokens)
        out = np.zeros((1, 257), dtype=np.float32)
        out[0, self._next()] = 10.0
        return out

    def truncate(self, n):
        del self._cache[n:]


@hookimpl
def register_backends(register):
    register("scripted", Scripted)


@hookimpl
def register_skills(register):
    register("calc.add", lambda a, b: a + b, description="Add two integers.", parameters={
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"]})
'''


@pytest.fixture
def scripted_daemon(assistant_daemon_factory, tmp_path):
    plugin = tmp_path / "scripted.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    fake_model = tmp_path / "model.bin"
    fake_model.write_bytes(b"scripted")
    # A plugin backend is chosen per request (config pins only the built-in ones).
    return assistant_daemon_factory(plugin_files=[plugin], config={
        "model": "script", "models": {"script": {"path": str(fake_model)}}})


async def test_model_calls_a_skill_and_answers_with_its_result(scripted_daemon):
    async with await scripted_daemon.client() as c:
        seen = []
        c.on_notification = lambda m, p: seen.append((m, p))
        stream = await c.chat(prompt="What is 2 + 3?", tools=True, temperature=0, backend="scripted")
        deltas = [t async for t in stream]
        result = await stream.result()
    assert result["tool_calls"] == [{"name": "calc.add", "result": 5}]
    assert result["text"].endswith('The answer is {"name": "calc.add", "result": 5}')
    assert "".join(deltas) == result["text"]
    assert result["stats"]["tool_calls"] == 1
    assert [m for m, _ in seen] == ["chat.tool"] and seen[0][1]["arguments"] == {"a": 2, "b": 3}


async def test_without_tools_the_call_is_just_text(scripted_daemon):
    async with await scripted_daemon.client() as c:
        result = await (await c.chat(prompt="What is 2 + 3?", temperature=0, backend="scripted")).result()
    assert "tool_calls" not in result and result["text"].startswith("<tool_call>")


async def test_unknown_tool_names_are_refused_before_generation(scripted_daemon):
    async with await scripted_daemon.client() as c:
        with pytest.raises(RPCError) as exc:
            await (await c.chat(prompt="hi", tools=["calc.mul"], backend="scripted")).result()
    assert exc.value.code == ErrorCode.INVALID_PARAMS and "calc.mul" in exc.value.message


def test_parse_calls():
    text = 'x <tool_call>{"name": "a", "arguments": "{\\"k\\": 1}"}</tool_call> <tool_call>{oops}</tool_call>'
    calls = tools.parse_calls(text)
    assert calls[0] == {"name": "a", "arguments": {"k": 1}}
    assert "not valid JSON" in calls[1]["error"]
    assert tools.parse_calls("no calls here") == []
