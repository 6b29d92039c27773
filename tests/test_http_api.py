"""The daemon's OpenAI- and Ollama-compatible HTTP API, through the official clients.

Real parts: a real daemon (``assistant serve`` with ``http.listen``) on
loopback TCP with an API key and on a Unix socket without one, the real
SmolLM2 weights, the official ``openai`` and ``ollama`` Python packages and
httpx. Where a test needs the model to behave in a way a 135M model cannot
be made to (call a tool, write fast, write slowly), the model is a scripted
backend registered by a test plugin (as tests/test_tools.py does): the
daemon, its scheduler, the HTTP server and the clients stay real.

Kept fast: three daemons for the whole module (loopback with a key, a Unix
socket, and one with short timeouts), small ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import sqlite3
import stat
import textwrap
import time

import httpx
import ollama
import openai
import pytest
import yaml

from assistant.daemon.http import auth, listen, toolcalls
from assistant.daemon.http.app import host_name, is_loopback_name
from assistant.daemon.process import DaemonError
from assistant.testing import DaemonProcess, isolated_env

KEY = "test-key-0123456789"
ALLOWED_ORIGIN = "http://allowed.localhost:3000"
MAX_BODY = 65536

PLUGIN = '''
import re
import time
import numpy as np
from assistant import hookimpl
from backends.base import Backend, ModelInfo

EOS, FLOOD, V = 256, 300, 512


class Scripted(Backend):
    """Answers by script: a tool call when get_weather is offered (the result once it came back),
    4 KiB tokens forever for FLOOD, a token every 50 ms forever for SLOW, else a greeting."""

    name = "scripted"

    @classmethod
    def availability(cls):
        return True, "test backend"

    def load(self, path, options=None):
        self._cache = []
        self._info = ModelInfo(name="scripted", path=path, backend="scripted", architecture="script",
                               context_length=8192, train_context_length=8192, vocab_size=V,
                               chat_template=None, template_source="fallback", bos_token_id=None,
                               eos_token_ids=[EOS])
        return self._info

    def unload(self):
        pass

    def tokenize(self, text, *, add_bos=True, special=True):
        return list(text.encode())

    def token_bytes(self, token):
        return b"y" * 4096 if token == FLOOD else bytes([token]) if token < 256 else b""

    def is_eog(self, token):
        return token == EOS

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(f"{m['role'].upper()}: {m['content']}\\n" for m in messages) + "ASSISTANT:"

    @property
    def cached_tokens(self):
        return list(self._cache)

    def _next(self):
        text = bytes(t for t in self._cache if t < 256).decode(errors="replace")
        convo, _, said = text.rpartition("ASSISTANT:")
        if "FLOOD" in convo:
            return FLOOD
        if "SLOW" in convo:
            time.sleep(0.05)
            return ord("z")
        found = re.findall(r"<tool_response>(.*?)</tool_response>", convo)
        if found:
            script = "It is " + found[-1]
        elif "get_weather" in convo:
            script = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        else:
            script = "Hello from the script."
        return ord(script[len(said)]) if len(said) < len(script) else EOS

    def forward(self, tokens, logits_at=None):
        self._cache.extend(tokens)
        out = np.zeros((1 if logits_at is None else len(logits_at), V), dtype=np.float32)
        out[:, self._next()] = 10.0
        return out

    def truncate(self, n):
        del self._cache[n:]


class SlowLoad(Scripted):
    """The script, after a load of 3 s."""

    name = "slowload"

    def load(self, path, options=None):
        time.sleep(3)
        return super().load(path, options)


class NoEos(Scripted):
    """The script on a model without an end-of-generation token (no grammar can end its reply)."""

    name = "noeos"

    def load(self, path, options=None):
        info = super().load(path, options)
        info.eos_token_ids = []
        return info


@hookimpl
def register_backends(register):
    register("scripted", Scripted)
    register("slowload", SlowLoad)
    register("noeos", NoEos)
'''

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(home, http: dict, **more) -> DaemonProcess:
    home.mkdir(parents=True, exist_ok=True)
    plugin_dir = home / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "scripted.py").write_text(textwrap.dedent(PLUGIN))
    fake = home / "script.bin"
    fake.write_bytes(b"scripted")
    config = {"threads": 2, "context": 2048, "preload": True, "max_loaded_models": 2, "send_stall_timeout": 1.0,
              "http": http, "models": {"script": {"path": str(fake), "backend": "scripted",
                                                  "speculative": {"drafter": "off"}}}, **more}
    env = {**isolated_env(home), "ASSISTANT_PLUGIN_DIR": str(plugin_dir)}
    return DaemonProcess(home, config_text=yaml.safe_dump(config), env=env)


@pytest.fixture(scope="module")
def tcp(tmp_path_factory):
    """A daemon serving HTTP on 127.0.0.1 with an API key; yields (daemon, base URL)."""
    port = free_port()
    d = _daemon(tmp_path_factory.mktemp("tcp"), {"listen": f"127.0.0.1:{port}", "api_keys": [KEY],
                                                 "max_body_bytes": MAX_BODY, "cors_origins": [ALLOWED_ORIGIN]})
    d.start()
    yield d, f"http://127.0.0.1:{port}"
    d.stop()


@pytest.fixture(scope="module")
def uds(tmp_path_factory):
    """A daemon serving HTTP on a Unix socket without a key; yields (daemon, socket path)."""
    home = tmp_path_factory.mktemp("uds")
    path = str(home / "http" / "api.sock")  # a directory the daemon makes (0700)
    d = _daemon(home, {"listen": f"unix:{path}"})
    d.start()
    yield d, path
    d.stop()


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    """A daemon with short HTTP timeouts (a load waited for 0.5 s, 1 s to send a request)
    and scripted models that load slowly or have no end-of-generation token; yields (daemon, URL)."""
    port = free_port()
    home = tmp_path_factory.mktemp("limits")
    models = {alias: {"path": str(home / "script.bin"), "backend": backend, "speculative": {"drafter": "off"}}
              for alias, backend in (("script", "scripted"), ("slowload", "slowload"), ("noeos", "noeos"))}
    d = _daemon(home, {"listen": f"127.0.0.1:{port}", "load_timeout": 0.5, "read_timeout": 1.0}, preload=False,
                max_loaded_models=3, models=models)
    d.start()
    yield d, f"http://127.0.0.1:{port}"
    d.stop()


def oai(base: str, key: str | None = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key or "none", max_retries=0, timeout=120)


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


# -- logic around the real parts ------------------------------------------------------


def test_listen_parsing_and_exposure_rule():
    assert listen.parse("127.0.0.1:8080").port == 8080
    assert listen.parse("[::1]:9").host == "::1"
    assert listen.parse("unix:/tmp/x.sock").is_unix
    for bad in ("8080", "127.0.0.1", "127.0.0.1:99999", "unix:", "[::1]8080", "host:port"):
        with pytest.raises(DaemonError, match="http.listen"):
            listen.parse(bad)
    listen.check_exposure(listen.parse("127.0.0.1:1"), have_keys=False)
    listen.check_exposure(listen.parse("unix:/tmp/x.sock"), have_keys=False)
    listen.check_exposure(listen.parse("0.0.0.0:1"), have_keys=True)
    with pytest.raises(DaemonError, match="no API key is set"):
        listen.check_exposure(listen.parse("0.0.0.0:1"), have_keys=False)


def test_host_names_and_keys():
    assert host_name("LOCALHOST:8080") == "localhost" and host_name("[::1]:80") == "::1"
    assert all(is_loopback_name(n) for n in ("localhost", "a.localhost", "127.0.0.1", "127.9.9.9", "::1"))
    assert not any(is_loopback_name(n) for n in ("evil.example", "10.0.0.1", "localhost.evil.example"))
    ring = auth.KeyRing(["first", "second"])
    assert ring.match("second") == 1 and ring.match("secon") is None and ring.match("") is None
    assert auth.bearer("Bearer abc") == "abc" and auth.bearer("Basic abc") is None and auth.bearer("Bearer ") is None


def test_tool_call_filter_hides_markup_split_anywhere():
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> done'
    for size in (1, 3, 7, len(text)):
        f = toolcalls.CallFilter()
        out = "".join(f.feed(text[i:i + size]) for i in range(0, len(text), size)) + f.finish()
        assert out == "Sure.  done"
    content, calls = toolcalls.split(text + " <tool_call>{oops}</tool_call>")
    assert calls == [{"name": "f", "arguments": {"a": 1}}] and "<tool_call>{oops}</tool_call>" in content


# -- the daemon refuses what it must at start ------------------------------------------


@pytest.mark.parametrize("how", ["config", "flag"])
def test_network_bind_without_key_is_refused_at_start(tmp_path, how):
    port = free_port()
    http = {"listen": f"0.0.0.0:{port}"} if how == "config" else {}
    d = _daemon(tmp_path / how, http, preload=False)
    if how == "flag":
        d.extra_args = ["--http", f"0.0.0.0:{port}"]
    with pytest.raises(RuntimeError) as err:
        d.start(timeout=30)
    assert "refusing to serve the HTTP API on 0.0.0.0" in str(err.value) and "http.api_keys" in str(err.value)
    assert d.proc.returncode == 1 and not d.socket.exists()


def test_key_file_and_unsafe_socket_dir_are_checked(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, no sticky bit: another user could swap the socket
    d = _daemon(tmp_path / "a", {"listen": f"unix:{shared}/api.sock"}, preload=False)
    with pytest.raises(RuntimeError, match="can be written by .*every user"):
        d.start(timeout=30)
    d = _daemon(tmp_path / "b", {"listen": "127.0.0.1:0", "api_key_file": str(tmp_path / "missing")}, preload=False)
    with pytest.raises(RuntimeError, match="http.api_key_file: cannot read"):
        d.start(timeout=30)


# -- OpenAI over loopback ----------------------------------------------------------------


def test_chat_completion_streamed_and_not_give_the_same_greedy_text(tcp):
    _, base = tcp
    client = oai(base)
    ask = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
               temperature=0)
    reply = client.chat.completions.create(**ask)
    text = reply.choices[0].message.content
    assert text and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0
    stats = reply.model_extra["x_assistant"]["stats"]
    assert stats["model"] == "smollm2-135m" and "drafter" in stats and "tokens_per_second" in stats
    assert reply.model_extra["timings"]["predicted_n"] == reply.usage.completion_tokens

    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [reply.choices[0].finish_reason]


def test_stop_seed_and_token_limits(tcp):
    _, base = tcp
    client = oai(base)
    msgs = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    capped = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_completion_tokens=3,
                                            temperature=0)
    assert capped.usage.completion_tokens == 3 and capped.choices[0].finish_reason == "length"
    full = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0)
    assert "3" in full.choices[0].message.content
    stopped = client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0,
                                             stop="3")
    assert stopped.choices[0].finish_reason == "stop" and "3" not in stopped.choices[0].message.content
    assert full.choices[0].message.content.startswith(stopped.choices[0].message.content)
    sampled = [client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=8, temperature=1.0,
                                              top_p=0.95, seed=1234).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_completions_take_the_prompt_as_it_is(tcp):
    _, base = tcp
    client = oai(base)
    plain = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
    assert plain.object == "text_completion" and plain.usage.completion_tokens <= 4
    # no chat template: the prompt is a handful of tokens, not a ChatML conversation with a system prompt
    assert plain.usage.prompt_tokens < 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0, stream=True)
        if c.choices)
    assert streamed == plain.choices[0].text


def test_a_session_named_in_a_header_keeps_the_history(tcp):
    d, base = tcp
    client = oai(base)
    sid = f"http-{time.monotonic_ns()}"
    for text in ("My name is Ada.", "What is my name?"):
        client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": text}],
                                       max_tokens=6, temperature=0, extra_headers={"X-Session-Id": sid})
    second = client.chat.completions.create(model="smollm2-135m", max_tokens=4, temperature=0,
                                            messages=[{"role": "user", "content": "And again?"}],
                                            extra_body={"session": sid})
    assert second.model_extra["x_assistant"]["session"] == sid
    # the history came from the session: far more prompt than the one short message sent
    assert second.usage.prompt_tokens > 40 and second.usage.prompt_tokens_details.cached_tokens > 30

    async def stored():
        async with await d.client() as c:
            return await c.call("sessions.get", {"id": sid})
    messages = asyncio.run(stored())["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["content"] == "My name is Ada." and messages[4]["content"] == "And again?"


def test_models_are_listed_and_named_by_alias_only(tcp):
    _, base = tcp
    client = oai(base)
    ids = [m.id for m in client.models.list()]
    assert "smollm2-135m" in ids and "script" in ids
    assert client.models.retrieve("smollm2-135m").id == "smollm2-135m"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found" and "smollm2-135m" in err.value.message
    # a path is never a model name over HTTP, even one of a real model file
    from assistant.config.models import resolve_model
    path = str(resolve_model("smollm2-135m").path)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=path, messages=[{"role": "user", "content": "hi"}])


def test_embeddings_are_unit_vectors_and_501_where_the_backend_has_none(tcp):
    _, base = tcp
    client = oai(base)
    out = client.embeddings.create(model="smollm2-135m", input=["a red apple", "a red apple", "tax law"])
    vecs = [e.embedding for e in out.data]  # the client asks for base64 and decodes it
    assert len(vecs) == 3 and len(vecs[0]) == 576 and out.usage.prompt_tokens > 3
    assert all(math.isclose(math.fsum(v * v for v in vec), 1.0, rel_tol=1e-4) for vec in vecs)
    assert vecs[0] == pytest.approx(vecs[1], abs=1e-6) and vecs[0] != pytest.approx(vecs[2], abs=1e-3)
    floats = httpx.post(f"{base}/v1/embeddings", headers=auth_headers(), timeout=60,
                        json={"model": "smollm2-135m", "input": "a red apple", "encoding_format": "float"}).json()
    assert floats["data"][0]["embedding"] == pytest.approx(vecs[0], abs=1e-5)
    r = httpx.post(f"{base}/v1/embeddings", headers=auth_headers(), json={"model": "script", "input": "x"}, timeout=60)
    assert r.status_code == 501 and "cannot compute embeddings" in r.json()["error"]["message"]


def test_client_tools_come_back_as_tool_calls(tcp):
    _, base = tcp
    client = oai(base)
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    first = client.chat.completions.create(model="script", messages=msgs, tools=WEATHER, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    msgs += [choice.message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    second = client.chat.completions.create(model="script", messages=msgs, tools=WEATHER, temperature=0)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == 'It is {"name": "get_weather", "result": "sunny"}'
    chunks = list(client.chat.completions.create(model="script", messages=msgs[:1], tools=WEATHER, stream=True))
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    plain = client.chat.completions.create(model="script", messages=msgs[:1], tools=WEATHER, tool_choice="none")
    assert plain.choices[0].message.content == "Hello from the script." and not plain.choices[0].message.tool_calls


def test_response_format_constrains_the_reply_over_both_apis(tcp):
    _, base = tcp
    schema = {"type": "object", "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    msgs = [{"role": "user", "content": "Pick a colour."}]
    reply = oai(base).chat.completions.create(
        model="smollm2-135m", messages=msgs, max_tokens=24, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert json.loads(reply.choices[0].message.content)["colour"] in ("red", "green", "blue")
    answer = ollama.Client(host=base, headers=auth_headers()).chat(
        model="smollm2-135m", messages=msgs, format=schema, options={"temperature": 0, "num_predict": 24})
    assert json.loads(answer.message.content)["colour"] in ("red", "green", "blue")
    r = httpx.post(f"{base}/v1/chat/completions", headers=auth_headers(), timeout=60,
                   json={"messages": msgs, "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and "response_format" in r.json()["error"]["message"]


# -- Ollama over loopback ----------------------------------------------------------------


def test_ollama_client_chat_generate_tags_show_version(tcp):
    _, base = tcp
    client = ollama.Client(host=base, headers=auth_headers())
    msgs = [{"role": "user", "content": "Name a colour."}]
    reply = client.chat(model="smollm2-135m", messages=msgs, options={"temperature": 0, "num_predict": 8})
    assert reply.done and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count <= 8 and reply.prompt_eval_count > 0 and reply.total_duration > 0
    streamed = list(client.chat(model="smollm2-135m:latest", messages=msgs, stream=True,
                                options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.message.content for p in streamed) == reply.message.content and streamed[-1].done
    gen = list(client.generate(model="smollm2-135m", prompt="Say hi.", stream=True,
                               options={"temperature": 0, "num_predict": 4}))
    assert gen[-1].done and gen[-1].done_reason in ("stop", "length") and "".join(g.response for g in gen)
    assert client.generate(model="smollm2-135m", prompt="").done_reason == "load"
    assert "smollm2-135m" in [m.model for m in client.list().models]
    shown = client.show("smollm2-135m")
    assert shown.modelinfo["general.architecture"] == "llama" and "im_start" in shown.template
    assert "smollm2-135m" in [m.model for m in client.ps().models]
    version = httpx.get(f"{base}/api/version", headers=auth_headers()).json()["version"]
    assert version.count(".") == 2
    assert len(client.embed(model="smollm2-135m", input=["a", "b"]).embeddings) == 2
    tool_reply = client.chat(model="script", messages=[{"role": "user", "content": "Weather?"}], tools=WEATHER)
    assert tool_reply.message.tool_calls[0].function.arguments == {"city": "Paris"}
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=msgs)
    assert err.value.status_code == 404


# -- what a client must not get past ----------------------------------------------------


def test_api_key_required_and_refused(tcp):
    _, base = tcp
    with pytest.raises(openai.AuthenticationError):
        oai(base, key="wrong-key").models.list()
    r = httpx.get(f"{base}/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(ollama.ResponseError) as err:
        ollama.Client(host=base).list()
    assert err.value.status_code == 401
    assert httpx.get(f"{base}/api/tags", headers=auth_headers()).status_code == 200


def test_host_and_origin_guards(tcp):
    _, base = tcp
    r = httpx.get(f"{base}/v1/models", headers={**auth_headers(), "Host": "evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{base}/v1/models", headers={**auth_headers(), "Host": "localhost:1"}).status_code == 200
    # a web page's "simple" cross-origin POST, which needs no preflight, is refused too
    r = httpx.post(f"{base}/api/generate", headers={**auth_headers(), "Origin": "http://evil.example",
                                                    "Content-Type": "text/plain"},
                   content=json.dumps({"model": "smollm2-135m", "prompt": "hi"}))
    assert r.status_code == 403 and "cors_origins" in r.json()["error"]
    assert "Access-Control-Allow-Origin" not in r.headers
    pre = httpx.options(f"{base}/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 403 and "Access-Control-Allow-Origin" not in pre.headers
    # an origin in http.cors_origins: its preflight is answered, its requests get the CORS header
    pre = httpx.options(f"{base}/v1/chat/completions", headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204 and pre.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    assert "authorization" in pre.headers["Access-Control-Allow-Headers"]
    r = httpx.get(f"{base}/v1/models", headers={**auth_headers(), "Origin": ALLOWED_ORIGIN})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN
    r = httpx.get(f"{base}/v1/models", headers={"Origin": ALLOWED_ORIGIN})  # still needs its key
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == ALLOWED_ORIGIN


def test_bad_requests_get_their_status_and_the_daemon_goes_on(tcp):
    _, base = tcp
    h = {**auth_headers(), "Content-Type": "application/json"}
    url = f"{base}/v1/chat/completions"
    cases = [
        (b"{not json", 400, "invalid JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        (b"", 400, "empty"),
        (b"\xff\xfe", 400, "not UTF-8"),
        (b"[" * 5000 + b"]" * 5000, 400, "nested"),
        (json.dumps({"messages": "hi"}).encode(), 400, "'messages'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400,
         "parameter 'temperature'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}).encode(), 400,
         "parameter 'max_tokens'"),
        (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400, "role"),
        (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(), 400,
         "an image_url part needs image_url.url"),
        (json.dumps({"model": 7, "messages": [{"role": "user", "content": "hi"}]}).encode(), 400, "'model'"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}).encode(), 400, "'n'"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode(), 413, "max_body_bytes"),
    ]
    for body, status, words in cases:
        r = httpx.post(url, headers=h, content=body, timeout=60)
        assert r.status_code == status, (body[:60], r.text)
        assert words in r.json()["error"]["message"], (body[:60], r.text)
    r = httpx.post(f"{base}/api/chat", headers=h, content=b"{bad", timeout=60)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)  # Ollama's shape
    r = httpx.get(f"{base}/v1/nothing-here", headers=h)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{base}/v1/chat/completions", headers=h)
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    long = "word " * 3000  # more tokens than the 2048-token context
    r = httpx.post(url, headers=h, json={"messages": [{"role": "user", "content": long}]}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    ok = httpx.post(url, headers=h, timeout=60, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


# -- clients that misbehave, and many at once ---------------------------------------------


async def _jsonrpc_chat(d, **params):
    async with await d.client() as c:
        return await (await c.chat(**params)).result()


async def _model_idle(d, name: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    async with await d.client() as c:
        while True:
            status = await c.call("status")
            model = next(m for m in status["models"] if m["name"] == name)
            if model["active_requests"] == 0 and model["requests_held"] == 0 or time.monotonic() > deadline:
                return model
            await asyncio.sleep(0.1)


async def test_a_client_that_goes_away_cancels_its_generation(tcp):
    d, base = tcp
    sid = f"gone-{time.monotonic_ns()}"
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("POST", f"{base}/v1/chat/completions", headers={**auth_headers(), "X-Session-Id": sid},
                               json={"model": "script", "messages": [{"role": "user", "content": "SLOW"}],
                                     "max_tokens": 1000, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if '"content":"z' in line:
                    break  # one token of a reply that would take 50 s; then hang up
    model = await _model_idle(d, "script")
    assert model["active_requests"] == 0
    async with await d.client() as c:
        reply = (await c.call("sessions.get", {"id": sid}))["messages"][-1]
    assert reply["role"] == "assistant" and reply["status"] == "cancelled"
    assert 0 < reply["stats"]["completion_tokens"] < 200


async def test_a_client_that_never_reads_is_dropped_and_others_are_served(tcp):
    d, base = tcp
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps({"model": "script", "messages": [{"role": "user", "content": "FLOOD"}], "max_tokens": 4000,
                       "stream": True}).encode()
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect(("127.0.0.1", port))
    sid = f"flood-{time.monotonic_ns()}"
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nX-Session-Id: {sid}\r\n".encode()
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    try:
        # 4000 tokens of 4 KiB: 16 MB the client never reads. Meanwhile others are served.
        rpc = await _jsonrpc_chat(d, prompt="Say hi.", max_tokens=3, temperature=0)
        assert rpc["text"]
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(f"{base}/v1/chat/completions", headers=auth_headers(),
                                json={"model": "script", "messages": [{"role": "user", "content": "hi"}]})
        assert r.json()["choices"][0]["message"]["content"] == "Hello from the script."
        assert (await _model_idle(d, "script"))["active_requests"] == 0
        # cancelled once 8 MiB waited for the client, and the client dropped (its write stalled 1 s);
        # read from the database itself: a reply of megabytes is over the JSON-RPC client's line limit
        db = sqlite3.connect(d.home / "data" / "assistant" / "assistant.db")
        status, stats = db.execute("SELECT status, stats FROM messages WHERE session_id = ? AND role = 'assistant'",
                                   (sid,)).fetchone()
        db.close()
        assert status == "cancelled" and json.loads(stats)["completion_tokens"] < 4000
        slow.settimeout(30)
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := slow.recv(1 << 20):
                received += len(chunk)
        assert received < 8 * 2**20
    finally:
        slow.close()


async def test_64_concurrent_streams_are_answered_or_refused_and_jsonrpc_is_served(tcp):
    d, base = tcp
    done: dict[str, float] = {}

    async def one(http: httpx.AsyncClient, i: int) -> tuple[int, str, dict]:
        async with http.stream("POST", f"{base}/v1/chat/completions", headers=auth_headers(),
                               json={"model": "script", "messages": [{"role": "user", "content": "SLOW"}],
                                     "max_tokens": 3, "stream": True}) as r:
            text = "".join([line async for line in r.aiter_lines()])
            done[f"http{i}"] = time.monotonic()
            return r.status_code, text, dict(r.headers)

    async def rpc() -> dict:
        await asyncio.sleep(0.5)  # once the HTTP requests are queued
        result = await _jsonrpc_chat(d, prompt="SLOW", model="script", max_tokens=3)
        done["rpc"] = time.monotonic()
        return result

    limits = httpx.Limits(max_connections=100, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        results = await asyncio.gather(*(one(http, i) for i in range(64)), rpc())
    answers, rpc_result = results[:-1], results[-1]
    statuses = [s for s, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1, statuses
    for status, text, headers in answers:
        if status == 200:
            assert text.endswith("data: [DONE]") and '"finish_reason":"length"' in text
        else:
            assert headers["retry-after"] == "1" and "try again" in text
    assert rpc_result["text"] == "zzz"
    # the JSON-RPC client took its turn among them (clients alternate), not after all of them
    assert done["rpc"] < max(t for k, t in done.items() if k != "rpc")


# -- a Unix socket ------------------------------------------------------------------------


def test_unix_socket_serves_both_apis(uds):
    _, path = uds
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    http_client = httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=120)
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="none", http_client=http_client, max_retries=0)
    reply = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=4, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert [m.id for m in client.models.list()][0]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "Hi"}])
    o = ollama.Client(host="http://localhost", transport=httpx.HTTPTransport(uds=path))
    assert o.chat(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                  options={"num_predict": 3}).message.content
    # no browser reaches a Unix socket: the Host check does not apply there
    assert http_client.get("http://anything.example/v1/models").status_code == 200


# -- tool_choice: a call forced by a grammar ------------------------------------------------

TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
                   "required": ["zone"], "additionalProperties": False}}}


def _byte_matcher(grammar: str):
    """An llguidance matcher over a vocabulary of the 256 bytes and an end token (256)."""
    import llguidance

    class Bytes:
        eos_token_id, bos_token_id, special_token_ids = 256, None, [256]
        tokens = [bytes([i]) for i in range(256)] + [b"\xff<[256]>"]

        def __call__(self, text):
            return list(text.encode() if isinstance(text, str) else text)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()), n_vocab=257, eos_token=[256])
    return llguidance.LLMatcher(tok, grammar, log_level=0)


def _whole(grammar: str, text: str) -> bool:
    """Whether ``text`` is a whole reply of ``grammar``."""
    m = _byte_matcher(grammar)
    data = list(text.encode())
    return m.validate_tokens(data) == len(data) and m.consume_tokens(data) and m.is_accepting()


def test_the_forced_call_grammar_takes_only_calls_of_the_tools_in_the_daemons_format():
    from assistant.daemon import tools
    from assistant.daemon.http.tool_choice import call_format

    unenforceable = {"type": "function", "function": {"name": "odd", "parameters": {
        "type": "object", "properties": {"a": False}, "required": ["a"]}}}
    bare = {"type": "function", "function": {"name": "ping"}}
    fmt = call_format(toolcalls.offered(WEATHER + [TIME_TOOL, unenforceable, bare], "required"))
    g = fmt.grammar
    good = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
            '<tool_call>{"name":"get_time","arguments":{"zone":"CET"}}</tool_call>',
            '<tool_call>{"name": "odd", "arguments": {"b": [1, 2]}}</tool_call>',  # fallback: any object
            '<tool_call>{"name": "ping", "arguments": {}}</tool_call>']
    for text in good:
        assert _whole(g, text), text
        assert tools.parse_calls(text)[0]["name"] in ("get_weather", "get_time", "odd", "ping")
    bad = ['Sure: <tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>',  # text first
           '<tool_call>{"name": "get_news", "arguments": {}}</tool_call>',  # not a tool
           '<tool_call>{"name": "get_time", "arguments": {"zone": "Mars"}}</tool_call>',  # not in the enum
           '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',  # a required key missing
           '<tool_call>{"name": "ping", "arguments": {"x": 1}}</tool_call>',  # no parameters: only {}
           '<tool_call>{"name": "get_time",\n\n\n "arguments": {"zone": "CET"}}</tool_call>',  # whitespace run
           '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call><tool_call>']
    assert not any(_whole(g, text) for text in bad)
    assert fmt.warnings == ("tool 'odd': arguments constrained to any JSON object",)
    assert fmt.to_openai() is None  # nothing to forward to a remote server
    pick = {"type": "function", "function": {"name": "get_time"}}
    named = call_format(toolcalls.offered(WEATHER + [TIME_TOOL], pick))
    assert _whole(named.grammar, good[1]) and not _whole(named.grammar, good[0])
    with pytest.raises(Exception, match="'tools' is empty"):
        toolcalls.offered([], "required")
    with pytest.raises(Exception, match="tool_choice"):
        toolcalls.offered(WEATHER, {"type": "function", "function": "get_time"})


def test_tool_choice_required_and_named_make_the_real_model_call(tcp):
    import jsonschema

    _, base = tcp
    client = oai(base)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in WEATHER + [TIME_TOOL]}
    msgs = [{"role": "user", "content": "Hello! How are you today?"}]  # nothing that asks for a tool
    ask = dict(model="smollm2-135m", messages=msgs, tools=WEATHER + [TIME_TOOL], max_tokens=64, temperature=0)
    for choice, name in (("required", None), ({"type": "function", "function": {"name": "get_time"}}, "get_time")):
        reply = client.chat.completions.create(**ask, tool_choice=choice)
        c = reply.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c.message
        call = c.message.tool_calls[0]
        assert call.function.name == (name or call.function.name) and call.function.name in schemas
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        assert reply.model_extra["x_assistant"]["complete"] is True
    chunks = list(client.chat.completions.create(**ask, tool_choice={"type": "function",
                                                                     "function": {"name": "get_weather"}},
                                                 stream=True))
    assert "<tool_call>" not in "".join(c.choices[0].delta.content or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [tc.function.name for tc in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].function.arguments)["city"], str)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # "none": the model is not told of the tools, so nothing constrains or parses a call
    plain = client.chat.completions.create(**ask, tool_choice="none")
    assert not plain.choices[0].message.tool_calls and "complete" not in plain.model_extra["x_assistant"]


async def test_complete_says_whether_a_constrained_reply_is_whole(tcp):
    d, base = tcp
    fmt = {"type": "json_object"}
    whole = await _jsonrpc_chat(d, prompt="Describe a cat as JSON.", response_format=fmt, max_tokens=200,
                                temperature=0)
    assert whole["complete"] is (whole["finish_reason"] == "stop")
    if whole["complete"]:
        assert isinstance(json.loads(whole["text"]), dict)
    cut = await _jsonrpc_chat(d, prompt="Describe a cat as JSON.", response_format=fmt, max_tokens=2, temperature=0)
    assert cut["finish_reason"] == "length" and cut["complete"] is False
    free = await _jsonrpc_chat(d, prompt="Hi", max_tokens=2, temperature=0)
    assert "complete" not in free
    r = httpx.post(f"{base}/v1/chat/completions", headers=auth_headers(), timeout=60,
                   json={"messages": [{"role": "user", "content": "Describe a cat as JSON."}], "max_tokens": 2,
                         "response_format": fmt})
    assert r.json()["x_assistant"]["complete"] is False


# -- timeouts and limits (a daemon with short ones) -------------------------------------------


async def test_a_model_loading_past_load_timeout_is_503_while_it_loads_then_served(limits):
    d, base = limits
    ask = {"model": "slowload", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/v1/chat/completions", json=ask)
        assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
        assert r.json()["error"]["code"] == "model_loading" and "still loading" in r.json()["error"]["message"]
        r = await http.post(f"{base}/api/chat", json={**ask, "stream": False})
        assert r.status_code == 503 and "still loading" in r.json()["error"]  # Ollama's shape
        async with await d.client() as c:
            assert "slowload" in (await c.call("status"))["loading"]
        deadline = time.monotonic() + 30
        while (r := await http.post(f"{base}/v1/chat/completions", json=ask)).status_code == 503:
            assert time.monotonic() < deadline, "the load never finished"
            await asyncio.sleep(0.5)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hello from the script."


async def test_status_shows_the_http_api_and_its_requests_in_flight(limits):
    d, base = limits
    async with await d.client() as c:
        assert (await c.call("status"))["http"] == {"url": base, "in_flight": 0}
        async with httpx.AsyncClient(timeout=30) as http:
            async with http.stream("POST", f"{base}/v1/chat/completions",
                                   json={"model": "script", "messages": [{"role": "user", "content": "SLOW"}],
                                         "max_tokens": 400, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if '"content":"z' in line:
                        break
                assert (await c.call("status"))["http"]["in_flight"] == 1
    async with await d.client() as c:
        deadline = time.monotonic() + 20
        while (await c.call("status"))["http"]["in_flight"] != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


async def test_a_grammar_the_model_cannot_end_is_a_bad_request_not_a_crash(limits):
    from assistant.protocol import ErrorCode, RPCError

    d, base = limits
    with pytest.raises(RPCError) as err:
        await _jsonrpc_chat(d, prompt="hi", model="noeos", response_format={"type": "json_object"}, max_tokens=4)
    assert err.value.code == ErrorCode.INVALID_PARAMS and "end-of-generation" in err.value.message
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/v1/chat/completions", json={
            "model": "noeos", "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}})
        assert r.status_code == 400 and "end-of-generation" in r.json()["error"]["message"]
    assert (await _jsonrpc_chat(d, prompt="hi", model="noeos", max_tokens=4))["text"] == "Hell"


def test_slow_and_oversized_request_heads_are_cut_off_and_others_served(limits):
    _, base = limits
    port = int(base.rsplit(":", 1)[1])
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    partial = []
    try:
        for _ in range(40):  # slowloris: heads that never end
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(head + b"X-Slow: a")
            partial.append(s)
        slow_body = socket.create_connection(("127.0.0.1", port))
        partial.append(slow_body)
        slow_body.sendall(head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"messages\"")
        ok = httpx.get(f"{base}/v1/models", timeout=10)  # served meanwhile
        assert ok.status_code == 200 and ok.json()["data"]
        for s in partial[:-1]:  # each closed by the daemon (http.read_timeout: 1 s) without an answer
            s.settimeout(15)
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(4096) == b""
        slow_body.settimeout(15)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := slow_body.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"http.read_timeout" in answer
    finally:
        for s in partial:
            s.close()
    many = {f"X-H{i}": "v" for i in range(100)}  # over the bound on a head's headers
    assert httpx.get(f"{base}/v1/models", headers=many, timeout=10).status_code == 400
    assert httpx.get(f"{base}/v1/models", headers={"X-Big": "v" * 9000}, timeout=10).status_code == 400
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 200
