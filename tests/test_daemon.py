"""The real daemon, over the real socket, with the real SmolLM2-135M weights."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import time

import pytest

from assistant.client import Client
from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, run_cli, short_socket_path, socket_answers
from conftest import TEST_CONFIG

pytestmark = pytest.mark.slow

GREEDY = {"temperature": 0.0, "seed": 1}


async def connect(d: DaemonProcess, name: str = "test") -> Client:
    return await Client.connect(d.socket, client_name=name)


async def wait_idle(client: Client, timeout: float = 60) -> dict:
    """Poll status until no request is in flight on any model."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        st = await client.call("status")
        if st["requests_in_flight"] == 0 and all(m["active_requests"] == 0 for m in st["models"]):
            return st
        await asyncio.sleep(0.1)
    raise AssertionError("daemon did not become idle")


class RawConn:
    """A bare socket speaking newline-delimited JSON, to send bad input."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(30)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, obj) -> None:
        self.send_raw(json.dumps(obj).encode() + b"\n")

    def recv(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        self.sock.close()


async def test_answer_streams_and_matches_final_text(daemon):
    async with await connect(daemon) as c:
        stream = await c.chat(prompt="Tell me the capital of France.", max_tokens=40, **GREEDY)
        deltas = [t async for t in stream]
        result = await stream.result()
    assert len(deltas) > 1, "the answer should arrive in several deltas"
    assert "".join(deltas) == result["text"]
    assert "Paris" in result["text"]
    stats = result["stats"]
    for key in ("prompt_tokens", "completion_tokens", "ttft_ms", "tokens_per_second", "backend", "model"):
        assert stats[key] is not None, key
    assert stats["backend"] == "llama.cpp"
    assert stats["model"] == "smollm2-135m"
    assert stats["completion_tokens"] <= 40


async def test_two_clients_at_once_get_their_own_answers(daemon):
    a, b = await connect(daemon, "a"), await connect(daemon, "b")
    try:
        sa = await a.chat(prompt="Name a color.", max_tokens=24, **GREEDY)
        sb = await b.chat(prompt="Name an animal.", max_tokens=24, **GREEDY)
        ra, rb = await asyncio.gather(sa.result(), sb.result())
        # Alone, each prompt gives the same greedy answer: nothing leaked between them.
        alone = await (await a.chat(prompt="Name an animal.", max_tokens=24, **GREEDY)).result()
    finally:
        await a.close()
        await b.close()
    assert ra["text"] and rb["text"]
    assert rb["text"] == alone["text"]
    assert sa.text == ra["text"] and sb.text == rb["text"]


async def test_cancel_mid_stream(daemon):
    async with await connect(daemon) as c:
        stream = await c.chat(prompt="Tell me a very long story.", max_tokens=1500, ignore_eos=True, **GREEDY)
        got = 0
        async for _ in stream:
            got += 1
            if got == 5:
                assert await stream.cancel()
        result = await stream.result()
        st = await c.call("status")
    assert result["finish_reason"] == "cancelled"
    assert 5 <= result["stats"]["completion_tokens"] < 1500
    assert st["requests_in_flight"] == 0


async def test_disconnect_mid_stream_stops_generation(daemon):
    c = await connect(daemon)
    stream = await c.chat(prompt="Tell me a very long story.", max_tokens=1500, ignore_eos=True, **GREEDY)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await c.close()
    async with await connect(daemon) as watcher:
        st = await wait_idle(watcher)
    last = st["models"][0]["last_request"]
    assert last["finish_reason"] == "cancelled"
    assert last["completion_tokens"] < 1500


async def test_bad_lines_get_errors_and_the_daemon_goes_on(daemon):
    raw = RawConn(daemon.socket)
    try:
        raw.send_raw(b"this is not json\n")
        err = raw.recv()
        assert err["error"]["code"] == ErrorCode.PARSE_ERROR and err["id"] is None

        raw.send({"jsonrpc": "2.0", "id": 1, "method": "status"})
        assert raw.recv()["error"]["code"] == ErrorCode.NOT_INITIALIZED

        raw.send({"jsonrpc": "2.0", "id": 2, "method": "initialize", "params": {"protocol_version": 1}})
        assert raw.recv()["result"]["protocol_version"] == 1

        raw.send({"jsonrpc": "2.0", "id": 3, "method": "no.such.method"})
        err = raw.recv()
        assert err["id"] == 3 and err["error"]["code"] == ErrorCode.METHOD_NOT_FOUND

        raw.send_raw(b'{"jsonrpc": "2.0", "id": 4, "method": "status", "params": "' + b"x" * (17 * 1024 * 1024) + b'"}\n')
        err = raw.recv()
        assert err["error"]["code"] == ErrorCode.LINE_TOO_LONG

        raw.send(["not", "an", "object"])  # a JSON-RPC batch of three non-requests: three errors
        assert [e["error"]["code"] for e in raw.recv()] == [ErrorCode.INVALID_REQUEST] * 3

        raw.send({"jsonrpc": "2.0", "id": 5, "method": "chat", "params": {"prompt": 42}})
        err = raw.recv()
        assert err["error"]["code"] == ErrorCode.INVALID_PARAMS and "prompt" in err["error"]["message"]

        # The same connection still works after all that.
        raw.send({"jsonrpc": "2.0", "id": 6, "method": "status"})
        ok = raw.recv()
        assert ok["id"] == 6 and ok["result"]["pid"] == daemon.proc.pid
    finally:
        raw.close()
    assert daemon.proc.poll() is None


async def test_incompatible_protocol_version_is_refused(daemon):
    raw = RawConn(daemon.socket)
    try:
        raw.send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocol_version": 99}})
        err = raw.recv()
    finally:
        raw.close()
    assert err["error"]["code"] == ErrorCode.INCOMPATIBLE_VERSION
    assert "99" in err["error"]["message"]


def test_socket_and_runtime_dir_are_private(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


def test_default_runtime_dir_is_0700(daemon_factory, isolated_home):
    from assistant import paths

    d = DaemonProcess(isolated_home, socket_path=paths.socket_path(), config_text=TEST_CONFIG)
    d.start()
    try:
        assert stat.S_IMODE(os.stat(paths.runtime_dir()).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(paths.socket_path()).st_mode) == 0o600
    finally:
        d.stop()


def test_second_daemon_is_refused_clearly(daemon, isolated_home):
    second = DaemonProcess(isolated_home, socket_path=daemon.socket, config_text=TEST_CONFIG)
    second.start(wait=False)
    code = second.wait(60)
    assert code == 1
    assert "already running" in second.stderr()
    assert str(daemon.proc.pid) in second.stderr()
    assert socket_answers(daemon.socket)


def test_stale_socket_is_replaced(daemon_factory):
    first = daemon_factory().start()
    first.kill9()
    assert first.socket.exists() and not socket_answers(first.socket)
    second = daemon_factory(socket_path=first.socket).start()
    assert socket_answers(second.socket)
    assert "stale socket" in second.stderr()


async def test_session_survives_kill9(daemon_factory):
    d = daemon_factory().start()
    async with await connect(d) as c:
        r1 = await (await c.chat(prompt="My name is Ada. Remember it.", session="s1", max_tokens=20, **GREEDY)).result()
    assert r1["session"] == "s1" and r1["message_id"]
    d.kill9()

    d2 = daemon_factory(socket_path=d.socket).start()
    async with await connect(d2) as c:
        sess = await c.call("sessions.get", {"id": "s1"})
        assert [m["role"] for m in sess["messages"]] == ["user", "assistant"]
        assert sess["messages"][0]["content"] == "My name is Ada. Remember it."
        assert sess["messages"][1]["content"] == r1["text"]
        r2 = await (await c.chat(prompt="What is my name?", session="s1", max_tokens=20, **GREEDY)).result()
        sess = await c.call("sessions.get", {"id": "s1"})
    assert len(sess["messages"]) == 4
    # The second turn's prompt holds the first turn: the history was read back from disk.
    assert r2["stats"]["prompt_tokens"] > r1["stats"]["prompt_tokens"] + r1["stats"]["completion_tokens"]


async def test_second_turn_reuses_the_kv_cache(daemon):
    async with await connect(daemon) as c:
        r1 = await (await c.chat(prompt="Write two sentences about the sea.", session="kv", max_tokens=30,
                                 **GREEDY)).result()
        r2 = await (await c.chat(prompt="Now one about the sky.", session="kv", max_tokens=10, **GREEDY)).result()
    s1, s2 = r1["stats"], r2["stats"]
    # Everything of turn one except at most the re-tokenised tail of the reply is reused.
    assert s2["cached_prompt_tokens"] >= s1["prompt_tokens"]
    assert s2["cached_prompt_tokens"] < s2["prompt_tokens"]


async def test_sigterm_answers_in_flight_request_and_exits_cleanly(daemon_factory):
    d = daemon_factory().start()
    c = await connect(d)
    stream = await c.chat(prompt="Tell me a very long story.", max_tokens=1500, ignore_eos=True, session="t",
                          **GREEDY)
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            d.signal(signal.SIGTERM)
            break
    result = await stream.result()
    await c.close()
    assert result["finish_reason"] == "cancelled"
    assert await asyncio.get_running_loop().run_in_executor(None, d.wait, 30) == 0
    assert not d.socket.exists()
    # The cancelled reply was stored before the answer was sent.
    d2 = daemon_factory(socket_path=d.socket).start()
    async with await connect(d2) as c:
        sess = await c.call("sessions.get", {"id": "t"})
    assert sess["messages"][-1]["status"] == "cancelled"
    assert sess["messages"][-1]["content"] == result["text"]


def test_bad_config_refuses_to_start(daemon_factory, isolated_home):
    d = daemon_factory(config_text="generation:\n  temperature: hot\n")
    d.start(wait=False)
    assert d.wait(60) == 2
    err = d.stderr()
    assert str(d.config) in err and "generation.temperature" in err and ":2" in err
    assert not socket_answers(d.socket)


async def test_missing_and_corrupt_models_are_reported_and_daemon_stays_up(daemon, isolated_home):
    bad = isolated_home / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(1000))
    async with await connect(daemon) as c:
        with pytest.raises(RPCError) as missing:
            await c.call("models.load", {"model": str(isolated_home / "nope.gguf")})
        assert missing.value.code == ErrorCode.MODEL_NOT_FOUND
        assert "nope.gguf" in missing.value.message

        with pytest.raises(RPCError) as corrupt:
            await (await c.chat(prompt="hi", model=str(bad), max_tokens=4)).result()
        assert corrupt.value.code == ErrorCode.MODEL_LOAD_FAILED
        assert "corrupt.gguf" in corrupt.value.message

        with pytest.raises(RPCError) as unknown:
            await c.call("models.load", {"model": "no-such-alias"})
        assert unknown.value.code == ErrorCode.MODEL_NOT_FOUND
        assert "smollm2-135m" in unknown.value.message  # lists what is known

        # Still serving the good model.
        r = await (await c.chat(prompt="Say hi.", max_tokens=8, **GREEDY)).result()
    assert r["text"]


async def test_prompt_longer_than_context_is_an_error_not_a_truncation(daemon_factory):
    d = daemon_factory(config_text="threads: 2\ncontext: 256\n").start()
    async with await connect(d) as c:
        with pytest.raises(RPCError) as exc:
            await (await c.chat(prompt="word " * 400, max_tokens=8)).result()
        assert exc.value.code == ErrorCode.CONTEXT_OVERFLOW
        assert "256" in exc.value.message
        # A reply that runs into the end of the window stops and says so.
        r = await (await c.chat(prompt="Count to a thousand.", max_tokens=500, ignore_eos=True, **GREEDY)).result()
    assert r["finish_reason"] == "length" and r["stats"]["context_full"] is True


async def test_models_load_unload_and_list(daemon):
    async with await connect(daemon) as c:
        await c.call("models.load", {"model": "smollm2-135m"})
        listed = await c.call("models.list")
        assert [m["name"] for m in listed["loaded"]] == ["smollm2-135m"]
        assert {"smollm2-135m", "gemma3-270m"} <= {m["name"] for m in listed["available"]}
        assert (await c.call("models.unload", {"model": "smollm2-135m"}))["unloaded"] == "smollm2-135m"
        assert (await c.call("status"))["models"] == []
        with pytest.raises(RPCError) as exc:
            await c.call("models.unload", {"model": "smollm2-135m"})
        assert exc.value.code == ErrorCode.MODEL_NOT_FOUND


def test_cli_ask_json(daemon):
    out = run_cli("ask", "Tell me the capital of France.", "--json", "--temperature", "0", "--max-tokens", "30",
                  socket_path=daemon.socket, config=daemon.config)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "Paris" in data["text"]
    for key in ("prompt_tokens", "completion_tokens", "ttft_ms", "tokens_per_second", "backend", "model"):
        assert key in data["stats"]


def test_cli_ask_streams_plain_text(daemon):
    out = run_cli("ask", "--temperature", "0", "--max-tokens", "30", "--system", "You are a helpful AI assistant.",
                  "Tell me the capital of France.", socket_path=daemon.socket, config=daemon.config)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_cli_ask_starts_a_daemon_when_none_runs(isolated_home):
    sock = short_socket_path()
    cfg = isolated_home / "config.yaml"
    cfg.write_text("threads: 2\ncontext: 1024\n")
    try:
        out = run_cli("ask", "Say hello.", "--max-tokens", "8", "--json", socket_path=sock, config=cfg)
        assert out.returncode == 0, out.stderr
        assert "starting the assistant daemon" in out.stderr
        assert json.loads(out.stdout)["stats"]["completion_tokens"] >= 1
        status = run_cli("daemon", "status", "--json", socket_path=sock)
        assert json.loads(status.stdout)["running"] is True
    finally:
        stop = run_cli("daemon", "stop", socket_path=sock)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not socket_answers(sock)


def test_cli_status_models_doctor_json(daemon):
    st = run_cli("status", "--json", socket_path=daemon.socket)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["pid"] == daemon.proc.pid
    models = run_cli("models", "list", "--json", socket_path=daemon.socket)
    assert "smollm2-135m" in {m["name"] for m in json.loads(models.stdout)["available"]}
    doc = run_cli("doctor", "--json", socket_path=daemon.socket, config=daemon.config)
    report = json.loads(doc.stdout)
    assert report["backend"]["chosen"] == "llama.cpp" and report["backend"]["reason"]
    assert report["model"]["threads"] == 2 and report["model"]["fits"] is True
    assert report["daemon"]["running"] is True


def test_cli_global_options_after_the_command(daemon, isolated_home):
    """--socket and --config after the command's name, as before it; given in both places, the later wins."""
    sock, wrong = str(daemon.socket), str(short_socket_path())
    st = run_cli("--socket", wrong, "status", "--json", "--socket", sock)
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["pid"] == daemon.proc.pid
    models = run_cli("models", "list", "--json", "--socket", sock)
    assert models.returncode == 0, models.stderr
    assert "smollm2-135m" in {m["name"] for m in json.loads(models.stdout)["loaded"]}  # the daemon's view
    ask = run_cli("ask", "Tell me the capital of France.", "--socket", sock, "--config", str(daemon.config),
                  "--json", "--temperature", "0", "--max-tokens", "12", "--no-start")
    assert ask.returncode == 0, ask.stderr
    assert "Paris" in json.loads(ask.stdout)["text"]


def test_serve_takes_config_and_socket_after_the_command(isolated_home):
    import subprocess
    import sys

    bad = isolated_home / "bad.yaml"
    bad.write_text("generation:\n  temperature: hot\n")
    sock = short_socket_path()
    cmd = [sys.executable, "-m", "assistant", "serve", "--socket", str(sock), "--quiet"]
    out = subprocess.run([*cmd, "--config", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and str(bad) in out.stderr and "generation.temperature" in out.stderr
    good = isolated_home / "good.yaml"
    good.write_text("preload: false\nthreads: 2\n")
    proc = subprocess.Popen([*cmd, "--config", str(good)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not socket_answers(sock):
            assert proc.poll() is None and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        status = json.loads(run_cli("status", "--json", "--socket", str(sock)).stdout)
        assert status["pid"] == proc.pid and status["config"] == str(good)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_cli_reports_no_daemon_clearly(isolated_home):
    out = run_cli("status", socket_path=short_socket_path())
    assert out.returncode == 1
    assert "no daemon is listening" in out.stderr and "Traceback" not in out.stderr


async def test_the_model_own_sampling_defaults_apply_unless_the_config_sets_them(daemon_factory):
    """SmolLM2 comes with its card's sampling (temperature 0.2, top_p 0.9):
    a request that names no sampling uses them, seeded, so it writes what a
    request naming them writes. A key the config file sets wins over the
    model's, and a request's own parameter over both."""
    prompt = "Write a short poem about the sea."

    async def text(c, **kw):
        return (await (await c.chat(prompt=prompt, max_tokens=40, seed=5, **kw)).result())["text"]

    d = daemon_factory().start()
    async with await connect(d) as c:
        plain = await text(c)
        card = await text(c, temperature=0.2, top_p=0.9)
        global_default = await text(c, temperature=0.7, top_p=0.95)
    d.stop()
    assert plain == card
    assert plain != global_default  # the test can tell the two apart

    d.config.write_text(TEST_CONFIG + "generation:\n  temperature: 0.7\n")  # the next daemon reads this
    d = daemon_factory().start()
    async with await connect(d) as c:
        configured = await text(c)
        assert configured == await text(c, temperature=0.7, top_p=0.9)  # top_p still the model's
        assert await text(c, temperature=0.2) == card  # the request wins
