"""The plugin system through real daemons: discovery, isolation, skills,
methods, events, the author scaffold, and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from assistant.plugin_host import PluginHost
from assistant.protocol import ErrorCode, RPCError
from assistant.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]

GREETER = '''
from assistant import hookimpl

def greet(name: str, times: int = 1):
    return " ".join([f"hi {name}"] * times)

@hookimpl
def register_skills(register, settings):
    register("greet", greet, description="Greet someone.", parameters={
        "type": "object",
        "properties": {"name": {"type": "string"}, "times": {"type": "integer", "minimum": 1}},
        "required": ["name"], "additionalProperties": False})

async def echo(params):
    return {"echo": params, "suffix": SETTINGS.get("suffix")}

SETTINGS = {}

@hookimpl
def register_methods(register, settings):
    SETTINGS.update(settings)
    register("greeter.echo", echo)
'''

BROKEN_IMPORT = '''
raise RuntimeError("this plugin cannot even import")
'''

BROKEN_HOOK = '''
from assistant import hookimpl

@hookimpl
def register_skills(register):
    raise ValueError("boom in register_skills")
'''

MISSPELLED = '''
from assistant import hookimpl

@hookimpl
def register_skill(register):
    pass
'''

SQUATTER = '''
from assistant import hookimpl

@hookimpl
def register_skills(register):
    register("greet", lambda name: name)
    register("bad_schema", lambda: 1, parameters={"type": "no-such-type"})
    register("fine", lambda: "fine")

@hookimpl
def register_methods(register):
    register("status", lambda params: "mine")
'''

SLOW_AND_EVENTS = '''
import time
from assistant import hookimpl

SEEN = []

@hookimpl
def startup(context):
    context.emit("slow.started", {"n": 1})  # source: the plugin's name, "slow"
    time.sleep(30)  # a sync hook that blocks: runs in a thread, the loop goes on

@hookimpl
async def on_event(event, context):
    if event["type"] == "ping.request":
        context.emit("ping.reply", {"got": event["data"]})

@hookimpl
def register_methods(register):
    pass
'''

EMITTER = '''
from assistant import hookimpl

@hookimpl
def register_methods(register, context):
    async def ping(params):
        context.emit("ping.request", params)
        return {"ok": True}
    register("emitter.ping", ping)
'''

COMMAND = '''
from assistant import hookimpl

def run(args):
    print(f"shouted {args.word.upper()}")
    return 0

@hookimpl
def register_commands(cli):
    p = cli.add_parser("shout", help="shout a word")
    p.add_argument("word")
    p.set_defaults(func=run)
'''


def write_plugin(folder: Path, name: str, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


def by_name(plugins: list[dict]) -> dict[str, dict]:
    return {p["name"]: p for p in plugins}


async def test_single_file_plugin_adds_a_skill_and_a_method(assistant_daemon_factory, tmp_path):
    f = write_plugin(tmp_path / "src", "greeter", GREETER)
    # Only this plugin: the built-in ones (vision, audio) add skills of their own.
    d = assistant_daemon_factory(plugin_files=[f], config={"plugins": {"greeter": {"suffix": "!"}}},
                                 plugins=["greeter"])
    async with await d.client() as c:
        skills = (await c.call("skills.list"))["skills"]
        assert [s["name"] for s in skills] == ["greet"] and skills[0]["plugin"] == "greeter"
        assert (await c.call("skills.call", {"name": "greet", "arguments": {"name": "Ada", "times": 2}})) == \
            {"result": "hi Ada hi Ada"}
        reply = await c.call("greeter.echo", {"x": 1})
        assert reply == {"echo": {"x": 1}, "suffix": "!"}  # the plugin got its settings
        init = c.server_info
    assert "greeter" in init["plugins"]


async def test_skill_arguments_are_validated_naming_the_field(assistant_daemon_factory, tmp_path):
    f = write_plugin(tmp_path / "src", "greeter", GREETER)
    d = assistant_daemon_factory(plugin_files=[f])
    async with await d.client() as c:
        with pytest.raises(RPCError) as wrong_type:
            await c.call("skills.call", {"name": "greet", "arguments": {"name": "Ada", "times": "two"}})
        assert wrong_type.value.code == ErrorCode.INVALID_PARAMS and "'times'" in wrong_type.value.message
        with pytest.raises(RPCError) as missing:
            await c.call("skills.call", {"name": "greet", "arguments": {}})
        assert missing.value.code == ErrorCode.INVALID_PARAMS and "'name'" in missing.value.message
        with pytest.raises(RPCError) as extra:
            await c.call("skills.call", {"name": "greet", "arguments": {"name": "A", "colour": "red"}})
        assert "colour" in extra.value.message
        with pytest.raises(RPCError) as unknown:
            await c.call("skills.call", {"name": "nope", "arguments": {}})
        assert unknown.value.code == ErrorCode.SKILL_NOT_FOUND and "greet" in unknown.value.message


async def test_failing_plugins_are_isolated_and_listed(assistant_daemon_factory, tmp_path):
    src = tmp_path / "src"
    files = [write_plugin(src, "greeter", GREETER), write_plugin(src, "broken_import", BROKEN_IMPORT),
             write_plugin(src, "broken_hook", BROKEN_HOOK), write_plugin(src, "misspelled", MISSPELLED)]
    d = assistant_daemon_factory(plugin_files=files)
    async with await d.client() as c:
        plugins = by_name((await c.call("plugins.list"))["plugins"])
        # The good plugin still works.
        assert (await c.call("skills.call", {"name": "greet", "arguments": {"name": "x"}}))["result"] == "hi x"
    assert plugins["greeter"]["status"] == "loaded"
    assert plugins["broken_import"]["status"] == "failed"
    assert "cannot even import" in plugins["broken_import"]["error"]
    assert plugins["broken_hook"]["status"] == "failed"
    assert "register_skills" in plugins["broken_hook"]["error"] and "boom" in plugins["broken_hook"]["error"]
    assert plugins["misspelled"]["status"] == "failed" and "register_skill" in plugins["misspelled"]["error"]
    assert "Traceback" in d.stderr() and "boom in register_skills" in d.stderr()
    assert d.proc.poll() is None


async def test_taken_names_and_bad_schemas_are_refused_naming_the_plugin(assistant_daemon_factory, tmp_path):
    src = tmp_path / "src"
    files = [write_plugin(src, "greeter", GREETER), write_plugin(src, "squatter", SQUATTER)]
    d = assistant_daemon_factory(plugin_files=files, plugins=["greeter", "squatter"])
    async with await d.client() as c:
        plugins = by_name((await c.call("plugins.list"))["plugins"])
        skills = {s["name"]: s["plugin"] for s in (await c.call("skills.list"))["skills"]}
        status = await c.call("status")
    problems = " | ".join(plugins["squatter"]["problems"])
    assert "skill 'greet' is already registered by plugin 'greeter'" in problems
    assert "bad_schema" not in skills and "not a valid JSON schema" in problems
    assert "core method" in problems and "pid" in status  # `status` is still the daemon's
    assert skills == {"greet": "greeter", "fine": "squatter"}


async def test_allow_list_and_no_plugins(assistant_daemon_factory, tmp_path):
    src = tmp_path / "src"
    files = [write_plugin(src, "greeter", GREETER), write_plugin(src, "other", COMMAND)]
    d = assistant_daemon_factory(plugin_files=files, plugins=["other"])
    async with await d.client() as c:
        plugins = by_name((await c.call("plugins.list"))["plugins"])
        assert (await c.call("skills.list"))["skills"] == []
    assert plugins["greeter"]["status"] == "disabled" and plugins["other"]["status"] == "loaded"

    d2 = assistant_daemon_factory(plugin_files=files, no_plugins=True)
    async with await d2.client() as c:
        plugins = by_name((await c.call("plugins.list"))["plugins"])
        with pytest.raises(RPCError):
            await c.call("greeter.echo", {})
    assert plugins["greeter"]["status"] == "disabled" and plugins["other"]["status"] == "disabled"
    assert plugins["core"]["status"] == "loaded"  # backends stay

    d3 = assistant_daemon_factory(plugin_files=files, plugins=[])
    async with await d3.client() as c:
        plugins = by_name((await c.call("plugins.list"))["plugins"])
    assert {p["status"] for n, p in plugins.items() if n != "core"} == {"disabled"}


async def test_blocking_sync_hook_does_not_block_and_events_flow(assistant_daemon_factory, tmp_path):
    src = tmp_path / "src"
    files = [write_plugin(src, "slow", SLOW_AND_EVENTS), write_plugin(src, "emitter", EMITTER)]
    d = assistant_daemon_factory(plugin_files=files)
    async with await d.client() as c:
        got: asyncio.Queue = asyncio.Queue()
        c.on_notification = lambda method, params: got.put_nowait((method, params))
        sub = await c.call("events.subscribe", {"types": ["slow.*", "ping.*"]})
        # The slow startup hook is still sleeping, yet the daemon answers.
        status = await asyncio.wait_for(c.call("status"), 5)
        assert status["pid"] == d.proc.pid
        assert [e["type"] for e in sub["recent"]] == ["slow.started"]
        await c.call("emitter.ping", {"n": 7})
        seen = []
        while len(seen) < 2:
            method, params = await asyncio.wait_for(got.get(), 10)
            assert method == "event"
            seen.append(params)
    assert [e["type"] for e in seen] == ["ping.request", "ping.reply"]
    assert seen[1]["data"] == {"got": {"n": 7}} and seen[1]["source"] == "slow"


def test_trace_plugins_logs_every_hook_call(assistant_daemon_factory, tmp_path):
    f = write_plugin(tmp_path / "src", "greeter", GREETER)
    os.environ["ASSISTANT_TRACE_PLUGINS"] = "1"
    try:
        d = assistant_daemon_factory(plugin_files=[f])
    finally:
        del os.environ["ASSISTANT_TRACE_PLUGINS"]
    assert "hook register_skills -> greeter:" in d.stderr()
    assert "hook register_methods -> greeter:" in d.stderr()


def test_cli_plugins_list_and_plugin_commands(tmp_path, isolated_home):
    src = tmp_path / "plugdir"
    write_plugin(src, "shouter", COMMAND)
    write_plugin(src, "broken_import", BROKEN_IMPORT)
    env = {"ASSISTANT_PLUGIN_DIR": str(src)}
    out = run_cli("plugins", "list", "--json", env=env)
    assert out.returncode == 0, out.stderr
    plugins = by_name(json.loads(out.stdout)["plugins"])
    assert plugins["shouter"]["status"] == "loaded" and plugins["shouter"]["hooks"] == ["register_commands"]
    assert plugins["broken_import"]["status"] == "failed"
    shout = run_cli("shout", "hey", env=env)
    assert shout.returncode == 0 and shout.stdout.strip() == "shouted HEY"
    assert run_cli("--no-plugins", "shout", "hey", env=env).returncode != 0


def test_plugins_new_scaffold_installs_and_its_test_passes(tmp_path, isolated_home):
    out = run_cli("plugins", "new", "hello-world", "--dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    pkg = tmp_path / "assistant-hello-world"
    assert (pkg / "pyproject.toml").exists() and (pkg / "assistant_hello_world.py").exists()
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(pkg)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    env = {"PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    listed = run_cli("plugins", "list", "--json", env=env)
    plugins = by_name(json.loads(listed.stdout)["plugins"])
    assert plugins["hello_world"]["status"] == "loaded"
    assert plugins["hello_world"]["source"].startswith("entry point (assistant-hello-world 0.1.0")
    # The scaffold's own test, run as its author would (against the installed copy).
    test = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
                          capture_output=True, text=True, env={**os.environ, **env}, cwd=str(tmp_path), timeout=300)
    assert test.returncode == 0, test.stdout + test.stderr
    assert "2 passed" in test.stdout


def test_plugin_host_without_daemon_reports_errors(tmp_path):
    src = tmp_path / "p"
    write_plugin(src, "greeter", GREETER)
    write_plugin(src, "broken_hook", BROKEN_HOOK)
    host = PluginHost(dirs=[src]).load()
    host.collect()
    assert "greet" in host.skills
    assert host.records["broken_hook"].status == "failed"
    assert host.records["core"].status == "loaded" and "llama.cpp" in host.backends
