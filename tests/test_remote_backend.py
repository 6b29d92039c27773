"""The remote backend (``backend: remote``) against real OpenAI-compatible servers on loopback.

Two real peers, each started once for the module:

- llama-cpp-python's own server (``python -m llama_cpp.server``) on the
  embedded SmolLM2 file, behind an API key. It runs with ``--flash_attn
  true``: its default is off, while our llama.cpp backend keeps llama.cpp's
  "auto" (on for CPU); the two attention kernels sum in different orders,
  and without it the greedy text parts after a few tokens. With it, its
  greedy text is our local backend's, word for word;
- a second daemon of ours with its HTTP API on (``http.listen``), serving
  SmolLM2 and the scripted tool-calling backend of ``test_tools``.

The first daemon (ours, real, over its socket) has remote aliases pointing
at them, at a port where nothing listens, at one where a server comes up
late (a relay that starts listening after a second), and at one whose
server a test kills mid-reply. The wire pieces (SSE decoding, delta
merging, error shapes of llama-server, vLLM and OpenAI that no server here
speaks) have unit tests of their own at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from remote_servers import cancel_after, chat, error_of, free_port, wait_http
from test_tools import PLUGIN as SCRIPTED_PLUGIN

from assistant.config.models import resolve_model
from assistant.daemon import remote_chat, tools
from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, isolated_env, run_cli
from backends.base import ContextOverflowError, LoadOptions
from backends.remote import RemoteBackend, display_url
from backends.remote_stream import ChatReply, ChatRequest, RemoteError, ReplyBuilder, SSEDecoder, classify_error

pytestmark = pytest.mark.slow

KEY_VAR = "ASSISTANT_TEST_REMOTE_KEY"
KEY = "sk-test-7c1d0e9a-never-in-a-log"
GREEDY = {"temperature": 0, "max_tokens": 12}
QUESTION = "What is the capital of France?"
STORY = "Write a very long story about a cat who travels the world."


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server on the SmolLM2 file, on loopback."""

    def __init__(self, port: int, log: Path, *extra: str):
        self.port, self.log = port, log
        smol = resolve_model("smollm2-135m").path
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smol), "--model_alias", "smol",
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2",
               "--flash_attn", "true", *extra]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def ready(self) -> "LlamaServer":
        wait_http(self.port, self.proc)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._out.close()


class LateRelay:
    """Starts listening on ``port`` only after ``delay`` seconds (until then a connection
    is refused), then relays every connection to ``target``: a server coming up late."""

    def __init__(self, port: int, target: int, delay: float):
        self.port, self.target, self.delay = port, target, delay
        self._server: socket.socket | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        time.sleep(self.delay)
        self._server = socket.create_server(("127.0.0.1", self.port))
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


# -- the servers, once per module -------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    server = LlamaServer(free_port(), log, "--api_key", KEY).ready()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def ports():
    return {"killable": free_port(), "late": free_port(), "nowhere": free_port(), "ours": free_port()}


@pytest.fixture(scope="module")
def killable(tmp_path_factory, ports):
    """A second llama-cpp-python server for the test that kills it; started with the module
    (it comes up while other tests run), waited for by that test."""
    server = LlamaServer(ports["killable"], tmp_path_factory.mktemp("killable") / "server.log")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def our_server(tmp_path_factory, ports):
    """A second daemon of ours, serving SmolLM2 and the scripted tool caller over HTTP."""
    home = tmp_path_factory.mktemp("our-server")
    (home / "plugins").mkdir()
    (home / "plugins" / "scripted.py").write_text(SCRIPTED_PLUGIN)
    (home / "model.bin").write_bytes(b"scripted")
    config = {"threads": 2, "context": 2048, "speculative": {"drafter": "off"}, "max_loaded_models": 2,
              "plugin_dirs": [str(home / "plugins")], "http": {"listen": f"127.0.0.1:{ports['ours']}"},
              "models": {"script": {"path": str(home / "model.bin"), "backend": "scripted"}}}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env=isolated_env(home)).start()
    wait_http(ports["ours"], d.proc, timeout=60)
    yield d
    d.stop()


@pytest.fixture(scope="module")
def remote_daemon(tmp_path_factory, llama_server, ports, killable):
    """Our daemon with remote aliases (and the local SmolLM2 to compare with)."""
    home = tmp_path_factory.mktemp("remote-daemon")
    (home / "plugins").mkdir()
    (home / "plugins" / "calc.py").write_text(SCRIPTED_PLUGIN)  # its calc.add skill; its backend is unused here
    url = f"http://127.0.0.1:{llama_server.port}/v1"
    keyed = {"backend": "remote", "url": url, "model": "smol", "api_key_env": KEY_VAR}
    models = {
        "far": keyed,
        "nokey": {"backend": "remote", "url": url, "model": "smol"},
        "badname": {**keyed, "model": "nope"},
        "nowhere": {"backend": "remote", "url": f"http://127.0.0.1:{ports['nowhere']}/v1"},
        "killable": {"backend": "remote", "url": f"http://127.0.0.1:{ports['killable']}/v1"},
        "late": {**keyed, "url": f"http://127.0.0.1:{ports['late']}/v1"},
        "ours": {"backend": "remote", "url": f"http://127.0.0.1:{ports['ours']}/v1", "model": "smollm2-135m"},
        "ours-script": {"backend": "remote", "url": f"http://127.0.0.1:{ports['ours']}/v1", "model": "script"},
    }
    config = {"threads": 2, "context": 2048, "speculative": {"drafter": "off"},
              "plugin_dirs": [str(home / "plugins")], "models": models}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env={**isolated_env(home), KEY_VAR: KEY}).start()
    yield d
    d.stop()


_TEXT: dict[str, str] = {}


async def far_text(d: DaemonProcess) -> str:
    """The greedy reply to QUESTION on ``far``, asked once for the module."""
    if "far" not in _TEXT:
        _TEXT["far"] = (await chat(d, prompt=QUESTION, model="far", **GREEDY))[1]["text"]
    return _TEXT["far"]


# -- through the daemon, on llama-cpp-python's server --------------------------------------------


async def test_same_greedy_text_as_the_local_backend_streamed_with_stats(remote_daemon):
    deltas, far = await chat(remote_daemon, prompt=QUESTION, model="far", **GREEDY)
    _, local = await chat(remote_daemon, prompt=QUESTION, model="smollm2-135m", **GREEDY)
    _TEXT["far"], _TEXT["local"] = far["text"], local["text"]
    assert far["text"] == local["text"] and far["text"].strip()
    assert "".join(deltas) == far["text"] and len(deltas) > 3  # streamed piece by piece
    s = far["stats"]
    assert s["backend"] == "remote" and s["model"] == "far" and far["model"] == "far"
    assert s["finish_reason"] == local["finish_reason"] == "length"
    # llama-cpp-python's server sends no usage in a stream: its pieces are counted (one per
    # token, a UTF-8 character split over tokens comes as one piece)
    assert s["remote"]["counts"] == "counted"
    assert 0 < s["completion_tokens"] <= local["stats"]["completion_tokens"] == GREEDY["max_tokens"]
    assert s["ttft_ms"] > 0 and s["tokens_per_second"] > 0 and s["total_ms"] >= s["ttft_ms"]
    assert s["remote"]["url"].startswith("http://127.0.0.1:") and s["remote"]["model"] == "smol"
    async with await remote_daemon.client() as c:
        loaded = {m["name"]: m for m in (await c.call("status"))["models"]}
    # a remote model holds no memory here: it stays loaded beside the local one (max_loaded_models: 1)
    assert loaded["far"]["backend"] == "remote" and loaded["smollm2-135m"]["backend"] == "llama.cpp"


async def test_a_session_keeps_its_history_on_a_remote_model(remote_daemon):
    _, first = await chat(remote_daemon, session="far-s", prompt="My name is Ada.", model="far", temperature=0,
                          max_tokens=6)
    _, second = await chat(remote_daemon, session="far-s", prompt="What is my name?", temperature=0, max_tokens=6)
    assert second["model"] == "far"  # the session remembers its model
    async with await remote_daemon.client() as c:
        sess = await c.call("sessions.get", {"id": "far-s"})
    assert [(m["role"], m["content"]) for m in sess["messages"]] == [
        ("user", "My name is Ada."), ("assistant", first["text"]),
        ("user", "What is my name?"), ("assistant", second["text"])]
    assert sess["messages"][-1]["stats"]["backend"] == "remote"


async def test_background_priority_runs_the_same_on_a_remote_model(remote_daemon):
    """What automations and plugins send (priority background) takes the same path."""
    _, bg = await chat(remote_daemon, prompt=QUESTION, model="far", priority="background", **GREEDY)
    assert bg["text"] == await far_text(remote_daemon) and bg["finish_reason"] == "length"


async def test_cancel_mid_stream_closes_the_connection_and_the_server_stops(remote_daemon, llama_server):
    got, result = await cancel_after(remote_daemon, 3, prompt=STORY, model="far", temperature=0, max_tokens=400)
    assert result["finish_reason"] == "cancelled"
    assert result["text"].startswith("".join(got)) and result["stats"]["completion_tokens"] < 400
    deadline = time.monotonic() + 30
    while "disconnected" not in llama_server.output() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert "disconnected" in llama_server.output()  # the server noticed and stopped generating
    _, again = await chat(remote_daemon, prompt="Hi", model="far", temperature=0, max_tokens=2)  # and serves on
    assert again["finish_reason"] == "length"


async def test_context_overflow_is_CONTEXT_OVERFLOW_and_the_daemon_goes_on(remote_daemon):
    err = await error_of(remote_daemon, prompt="word " * 3000, model="far", **GREEDY)
    assert err.code == ErrorCode.CONTEXT_OVERFLOW
    assert "context" in err.message and "127.0.0.1" in err.message
    assert err.data["available"] == 2048 and err.data["needed"] > 2048
    _, ok = await chat(remote_daemon, prompt="Hi", model="far", temperature=0, max_tokens=2)
    assert ok["text"]


async def test_structured_output_goes_to_the_server(remote_daemon):
    _, result = await chat(remote_daemon, prompt="Give me a JSON object with a name and an age.", model="far",
                           temperature=0, max_tokens=60, response_format={"type": "json_object"})
    if result["finish_reason"] == "stop":
        assert isinstance(json.loads(result["text"]), dict)
    else:  # cut by max_tokens: still the start of a JSON object (the server's grammar held)
        assert result["text"].lstrip().startswith("{")


async def test_speculative_settings_do_not_apply_and_say_so(remote_daemon):
    _, result = await chat(remote_daemon, prompt=QUESTION, model="far", draft="ngram", **GREEDY)
    s = result["stats"]
    assert s["drafter"] == "off" and s["drafted"] == 0 and "does not apply" in s["remote"]["speculative"]
    async with await remote_daemon.client() as c:
        status = await c.call("status")
    far = next(m for m in status["models"] if m["name"] == "far")
    assert far["backend"] == "remote" and "does not apply" in far["info"]["choices"]["speculative"]


async def test_a_wrong_model_name_or_key_is_a_clear_load_error(remote_daemon):
    err = await error_of(remote_daemon, prompt="hi", model="badname")
    assert err.code == ErrorCode.MODEL_LOAD_FAILED
    assert "does not serve 'nope'; it serves 'smol'" in err.message
    err = await error_of(remote_daemon, prompt="hi", model="nokey")
    assert err.code == ErrorCode.MODEL_LOAD_FAILED and "401" in err.message and "API key" in err.message
    err = await error_of(remote_daemon, prompt="hi", model="far", backend="llama.cpp")
    assert "runs on the server at" in err.message and "cannot run on llama.cpp" in err.message


async def test_a_server_not_started_is_tried_again_then_a_clear_error(remote_daemon):
    err = await error_of(remote_daemon, prompt="hi", model="nowhere")
    assert err.code == ErrorCode.MODEL_LOAD_FAILED
    assert "connection refused" in err.message and "5 tries" in err.message and "is it running" in err.message
    assert remote_daemon.stderr().count("trying again in") >= 4


async def test_a_server_coming_up_late_is_reached_by_the_retries(remote_daemon, llama_server, ports):
    relay = LateRelay(ports["late"], llama_server.port, delay=1.0)
    try:
        _, result = await chat(remote_daemon, prompt=QUESTION, model="late", **GREEDY)
    finally:
        relay.close()
    assert result["text"] == await far_text(remote_daemon)


async def test_a_server_killed_mid_stream(remote_daemon, killable):
    server = killable.ready()
    try:
        _, first = await chat(remote_daemon, session="k", prompt="Hello!", model="killable", temperature=0,
                              max_tokens=4)
        async with await remote_daemon.client() as c:
            stream = await c.chat(session="k", prompt=STORY, temperature=0, max_tokens=400)
            got = []
            with pytest.raises(RPCError) as info:
                async for piece in stream:
                    got.append(piece)
                    if len(got) == 3:
                        server.kill()
                await stream.result()
    finally:
        server.kill()
    err = info.value
    assert err.code == ErrorCode.BACKEND_UNAVAILABLE and err.data["model"] == "killable"
    assert "broke off the reply" in err.message or "ended the reply" in err.message
    async with await remote_daemon.client() as c:
        sess = await c.call("sessions.get", {"id": "k"})
        await c.call("status")  # the daemon serves on
    # what was acknowledged stays; the broken reply was never acknowledged and is not stored
    assert [(m["role"], m["content"]) for m in sess["messages"]] == [
        ("user", "Hello!"), ("assistant", first["text"]), ("user", STORY)]
    # with the server gone, the next request is tried again, then a clear error
    err = await error_of(remote_daemon, session="k", prompt="Are you there?", **GREEDY)
    assert err.code == ErrorCode.BACKEND_UNAVAILABLE and "connection refused" in err.message


# -- a second daemon of ours over HTTP ---------------------------------------------------------


async def test_a_second_daemon_over_http_same_text_and_usage(remote_daemon, our_server):
    deltas, far = await chat(remote_daemon, prompt=QUESTION, model="ours", **GREEDY)
    _, local = await chat(remote_daemon, prompt=QUESTION, model="smollm2-135m", **GREEDY)
    assert far["text"] == local["text"] and "".join(deltas) == far["text"]
    s = far["stats"]
    assert s["remote"]["counts"] == "server"  # stream_options.include_usage: its usage chunk
    assert s["prompt_tokens"] == local["stats"]["prompt_tokens"]
    assert s["completion_tokens"] == local["stats"]["completion_tokens"]
    assert s["remote"]["server"]["backend"] == "llama.cpp"  # its own stats ride along (x_assistant)


async def test_tools_run_here_on_a_remote_model(remote_daemon, our_server):
    """The remote model (the scripted caller, served over HTTP) asks for a skill of this
    daemon; this daemon runs it and the model goes on, as on a local model."""
    _, result = await chat(remote_daemon, prompt="What is 2 + 3?", model="ours-script", tools=True, temperature=0)
    assert result["tool_calls"] == [{"name": "calc.add", "result": 5}]
    assert "The answer is" in result["text"] and result["stats"]["tool_calls"] == 1


async def test_cancel_mid_stream_over_http_stops_the_other_daemon(remote_daemon, our_server):
    _, result = await cancel_after(remote_daemon, 3, prompt=STORY, model="ours", temperature=0, max_tokens=400)
    assert result["finish_reason"] == "cancelled"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with await our_server.client() as c:
            status = await c.call("status")
        theirs = next(m for m in status["models"] if m["name"] == "smollm2-135m")
        if theirs["last_request"]["finish_reason"] == "cancelled" and not theirs["active_requests"]:
            break
        await asyncio.sleep(0.2)
    assert theirs["last_request"]["finish_reason"] == "cancelled"  # it stopped generating
    assert theirs["last_request"]["completion_tokens"] < 400


def test_structured_tool_call_deltas_are_merged(our_server, ports):
    """Asked with ``tools``, our HTTP API streams the call as ``tool_calls`` deltas; the
    backend merges them, and the daemon's tool loop reads them back as text."""
    backend = RemoteBackend()
    backend.load(f"http://127.0.0.1:{ports['ours']}/v1", LoadOptions(extra={"alias": "t", "model": "script"}))
    try:
        spec = {"type": "function", "function": {"name": "calc.add", "parameters": {"type": "object"}}}
        reply = backend.chat(ChatRequest(messages=[{"role": "user", "content": "add"}], tools=[spec],
                                         temperature=0, max_tokens=80))
    finally:
        backend.unload()
    assert reply.finish_reason == "tool_calls" and reply.done
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [("calc.add", {"a": 2, "b": 3})]
    assert tools.parse_calls(remote_chat._as_text(reply.tool_calls[0])) == [
        {"name": "calc.add", "arguments": {"a": 2, "b": 3}}]


# -- doctor, and the key ------------------------------------------------------------------------


def test_doctor_checks_each_remote_alias(remote_daemon, llama_server):
    out = run_cli("doctor", "--json", config=remote_daemon.config, env={KEY_VAR: KEY})
    report = json.loads(out.stdout)
    by = {r["alias"]: r for r in report["remote"]}
    assert by["far"]["reachable"] and by["far"]["served"] == ["smol"] and by["far"]["serves_model"]
    assert by["far"]["api_key_set"] is True and KEY not in out.stdout
    assert "does not apply" in by["far"]["speculative"]
    assert "does not serve 'nope'" in by["badname"]["error"]
    assert "401" in by["nokey"]["error"]
    assert not by["nowhere"]["reachable"] and "connection refused" in by["nowhere"]["error"]
    assert any("remote model nowhere" in p for p in report["problems"])
    text = run_cli("doctor", config=remote_daemon.config, env={KEY_VAR: KEY}).stdout
    assert f"remote:   far -> 'smol' at http://127.0.0.1:{llama_server.port}/v1, key from ${KEY_VAR}" in text


async def test_the_api_key_is_never_logged_or_shown(remote_daemon):
    async with await remote_daemon.client() as c:
        shown = json.dumps([await c.call("status"), await c.call("models.list")])
    assert "far" in shown and KEY not in shown
    assert KEY not in remote_daemon.stderr()


# -- the wire, piece by piece (no server) -------------------------------------------------------


def test_sse_decoder_takes_any_chunking_comments_and_line_ends():
    stream = (b": ping - 2026-01-01 00:00:00\r\n\r\n"
              b"data: {\"a\": 1}\r\n\r\n"
              b"event: message\nid: 7\ndata: line one\ndata: line two\n\n"
              b"data:no-space\n\n"
              b"\n\n: keep-alive\n\n"
              b"data: [DONE]")  # the last event's blank line never came
    for size in (1, 2, 3, 7, len(stream)):
        decoder = SSEDecoder()
        events = []
        for i in range(0, len(stream), size):
            events += decoder.feed(stream[i:i + size])
        tail = decoder.close()
        events += [tail] if tail else []
        assert [e.data for e in events] == ['{"a": 1}', "line one\nline two", "no-space", "[DONE]"], size
    with pytest.raises(RemoteError, match="line of over"):
        SSEDecoder(max_line=64).feed(b"data: " + b"x" * 100)


def test_tool_call_deltas_merge_by_index():
    b = ReplyBuilder("http://h/v1", 0.0)
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "id": "c1", "type": "function", "function": {"name": "calc.", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "add",
                                                                                         "arguments": '{"a": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "c2", "function": {"name": "echo", "arguments": '{"t": "hi"}'}},
            {"index": 0, "function": {"arguments": "2, \"b\": 3}"}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}},
    ]
    for i, chunk in enumerate(chunks):
        assert b.add(chunk, float(i)) == ""
    r = b.finish(9.0)
    assert [(c.id, c.name, json.loads(c.arguments)) for c in r.tool_calls] == [
        ("c1", "calc.add", {"a": 2, "b": 3}), ("c2", "echo", {"t": "hi"})]
    assert r.finish_reason == "tool_calls" and r.usage["completion_tokens"] == 4 and r.t_first == 1.0
    assert tools.parse_calls("".join(remote_chat._as_text(c) for c in r.tool_calls)) == [
        {"name": "calc.add", "arguments": {"a": 2, "b": 3}}, {"name": "echo", "arguments": {"t": "hi"}}]


@pytest.mark.parametrize(("status", "body", "needed", "available"), [
    # llama-cpp-python / OpenAI
    (400, {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested "
                                "3039 tokens (3031 in the messages, 8 in the completion). Please reduce the length",
                     "type": "invalid_request_error", "code": "context_length_exceeded"}}, 3031, 2048),
    # llama-server
    (400, {"error": {"code": 400, "message": "the request exceeds the available context size, try increasing it",
                     "type": "exceed_context_size_error", "n_prompt_tokens": 4100, "n_ctx": 4096}}, 4100, 4096),
    # vLLM, older and newer wordings
    (400, {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you "
           "requested 2100 tokens (1588 in the messages, 512 in the completion).", "type": "BadRequestError",
           "code": 400}, 1588, 2048),
    (400, {"error": {"message": "'max_tokens' is too large: 512. This model's maximum context length is 2048 "
                                "tokens and your request has 1600 input tokens (512 > 2048 - 1600).",
                     "type": "BadRequestError", "code": 400}}, 1600, 2048),
    (400, {"error": {"message": "The decoder prompt (length 3000) is longer than the maximum model length of "
                                "2048. Make sure that `max_model_len` is no smaller", "code": 400}}, 3000, 2048),
    # our own daemon's HTTP API
    (400, {"error": {"message": "the prompt is 3031 tokens but the context window is 2048; shorten the "
                                "conversation", "type": "invalid_request_error", "code": "context_length_exceeded"}},
     3031, 2048),
    # an error inside the stream (no status)
    (None, {"error": {"message": "context size exceeded", "type": "exceed_context_size_error"}}, 0, 0),
])
def test_context_length_errors_of_each_server_are_overflow(status, body, needed, available):
    err = classify_error(status, body, "http://h/v1")
    assert isinstance(err, ContextOverflowError)
    assert (err.needed, err.available) == (needed, available) and "http://h/v1" in str(err)


def test_other_errors_quote_the_server_bounded():
    err = classify_error(401, {"error": {"message": "Invalid API key"}}, "http://h/v1")
    assert isinstance(err, RemoteError) and err.status == 401 and "API key" in str(err)
    err = classify_error(500, "<html>" + "x" * 5000, "http://h/v1")
    assert isinstance(err, RemoteError) and not isinstance(err, ContextOverflowError) and len(str(err)) < 400
    assert not isinstance(classify_error(500, {"error": {"message": "context length"}}, "u"), ContextOverflowError)


def test_urls_are_shown_without_credentials():
    assert display_url("http://user:pw@gpu-box:8000/v1") == "http://gpu-box:8000/v1"
    assert display_url("https://[::1]:8443/v1") == "https://[::1]:8443/v1"
    with pytest.raises(Exception, match="not an http"):
        RemoteBackend.check_model("/models/x.gguf")


def test_usage_then_timings_then_counted_pieces_make_the_counts():
    timed = ChatReply(pieces=5, timings={"prompt_n": 10, "cache_n": 30, "predicted_n": 6, "draft_n": 4,
                                         "draft_n_accepted": 3})
    assert remote_chat._counts(timed) == (40, 30, 6, "timings")
    used = ChatReply(pieces=5, usage={"prompt_tokens": 12, "completion_tokens": 7,
                                      "prompt_tokens_details": {"cached_tokens": 8}}, timings={"cache_n": 1})
    assert remote_chat._counts(used) == (12, 8, 7, "server")
    assert remote_chat._counts(ChatReply(pieces=5)) == (0, 0, 5, "counted")


def test_the_request_body_carries_every_setting():
    from assistant.inference.sampling import SamplingParams

    req = remote_chat.request_for([{"role": "user", "content": "hi"}],
                                  SamplingParams(temperature=0, top_k=0, repeat_penalty=1.1, seed=7),
                                  max_tokens=9, stop=["\n\n", ""], ignore_eos=True)
    body = req.body("m")
    assert body["model"] == "m" and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (9, 0, 7, ["\n\n"])
    assert "top_k" not in body  # 0 is "off" here, which vLLM spells -1
    assert body["repeat_penalty"] == body["repetition_penalty"] == 1.1 and body["ignore_eos"] is True
    assert ChatRequest(prompt="raw").body("m")["prompt"] == "raw" and ChatRequest(prompt="x").endpoint == "completions"
    # for a server that refuses llama.cpp's and vLLM's sampling keys (OpenAI's own API)
    strict = req.body("m", openai_only=True)
    assert not {"min_p", "repeat_penalty", "repetition_penalty", "top_k", "ignore_eos"} & set(strict)
    assert (strict["temperature"], strict["seed"], strict["stop"]) == (0, 7, ["\n\n"])


def test_a_raw_prompt_goes_to_completions(llama_server, monkeypatch):
    """HTTP's /v1/completions hands the chat path a raw prompt: it goes to the server's."""
    monkeypatch.setenv(KEY_VAR, KEY)
    backend = RemoteBackend()
    backend.load(f"http://127.0.0.1:{llama_server.port}/v1", LoadOptions(extra={"alias": "r", "model": "smol",
                                                                                "api_key_env": KEY_VAR}))
    try:
        pieces = []
        reply = backend.chat(ChatRequest(prompt="The capital of France is", temperature=0, max_tokens=4),
                             on_text=pieces.append)
    finally:
        backend.unload()
    assert reply.text and "".join(pieces) == reply.text and reply.finish_reason == "length"


def test_embeddings_through_a_server_that_has_them(our_server, ports):
    backend = RemoteBackend()
    backend.load(f"http://127.0.0.1:{ports['ours']}/v1", LoadOptions(extra={"alias": "e", "model": "smollm2-135m"}))
    try:
        vectors = backend.embed(["hello", "world"])
    finally:
        backend.unload()
    assert len(vectors) == 2 and all(abs(sum(v * v for v in vec) - 1) < 1e-4 for vec in vectors)
    assert vectors[0] != vectors[1] and backend.embedding_tokens >= 2  # the server's usage: no tokenizer here


def test_a_whole_json_answer_and_an_error_inside_the_stream():
    b = ReplyBuilder("http://h/v1", 0.0)  # a server that answers a streamed request in one piece
    assert b.whole({"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                 "finish_reason": "stop"}], "usage": {"completion_tokens": 1}}, 1.0) == "hi"
    r = b.finish(2.0)
    assert (r.text, r.finish_reason, r.done, r.usage["completion_tokens"]) == ("hi", "stop", True, 1)
    b = ReplyBuilder("http://h/v1", 0.0)
    assert b.add({"choices": [{"index": 0, "delta": {"content": "par"}}]}, 1.0) == "par"
    with pytest.raises(RemoteError, match="Loading model") as info:
        b.add({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}, 2.0)
    assert info.value.received == 1
    with pytest.raises(ContextOverflowError):
        ReplyBuilder("u", 0.0).add({"error": {"message": "x", "type": "exceed_context_size_error"}}, 0.0)
