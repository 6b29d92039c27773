"""The backend registry: names to Backend classes, imported on first use, filled from plugins."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from backends import BUILTIN_BACKENDS, BackendRegistry
from backends.base import Backend, BackendUnavailable

from assistant.machine.choice import backend_registry
from assistant.plugin_host import PluginHost

ROOT = Path(__file__).resolve().parents[1]

# A single-file plugin with the smallest Backend there is: enough to be
# registered, chosen and named in a config; it loads nothing.
PLUGIN = '''
from assistant.hookspecs import hookimpl
from backends.base import Backend, ModelLoadError


class Tiny(Backend):
    name = "tiny"

    @classmethod
    def availability(cls):
        return True, "tiny is always here"

    def load(self, path, options=None):
        raise ModelLoadError("tiny loads nothing")

    def unload(self):
        pass

    @property
    def info(self):
        raise ModelLoadError("nothing loaded")

    def tokenize(self, text, *, add_bos=True, special=True):
        return list(text.encode())

    def token_bytes(self, token):
        return bytes([token])

    def is_eog(self, token):
        return False

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    @property
    def cached_tokens(self):
        return []

    def forward(self, tokens, logits_at=None):
        raise NotImplementedError

    def truncate(self, n):
        pass


@hookimpl
def register_backends(register):
    register("tiny", Tiny)
'''


class Fake(Backend):
    """Only availability: the registry never instantiates a backend."""

    name = "fake"

    @classmethod
    def availability(cls):
        return True, "here"


class Raises(Fake):
    @classmethod
    def availability(cls):
        raise RuntimeError("boom")


def test_builtin_backends_are_imported_on_first_use():
    code = ("import sys, backends; r = backends.BackendRegistry.builtin(); print(r.names()); "
            "print('backends.llamacpp' in sys.modules); r.get('llama.cpp'); print('backends.llamacpp' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["['llama.cpp', 'mlx', 'remote']", "False", "True"]


def test_register_get_names_and_unknown_names():
    registry = BackendRegistry(BUILTIN_BACKENDS)
    registry.register("fake", Fake)
    assert registry.names() == ["llama.cpp", "mlx", "remote", "fake"] and "fake" in registry and "nope" not in registry
    assert registry.get("fake") is Fake
    with pytest.raises(BackendUnavailable, match=r"unknown backend 'cuda'; known backends: llama.cpp, mlx, remote, fake"):
        registry.get("cuda")
    with pytest.raises(TypeError, match="Backend subclass"):
        registry.register("bad", object)
    # registries are separate: nothing global is filled
    assert "fake" not in BackendRegistry.builtin() and BackendRegistry().names() == []


def test_availability_survives_broken_backends():
    registry = BackendRegistry({"fake": Fake, "raises": Raises, "broken": "no_such_module_for_tests:Backend",
                                "missing": "backends.base:NoSuchClass"})
    available = registry.availability()
    assert list(available) == ["fake", "raises", "broken", "missing"]
    assert available["fake"] == (True, "here")
    assert available["raises"] == (False, "RuntimeError: boom")
    ok, why = available["broken"]
    assert not ok and "backend 'broken' could not be imported from no_such_module_for_tests" in why
    assert "ModuleNotFoundError" in why
    assert available["missing"][0] is False and "AttributeError" in available["missing"][1]
    with pytest.raises(BackendUnavailable, match="could not be imported"):
        registry.get("broken")
    assert registry.availability(["fake", "nope"]) == {"fake": (True, "here")}


def test_one_registry_from_what_plugins_registered(tmp_path):
    (tmp_path / "tiny.py").write_text(PLUGIN)
    (tmp_path / "wrong.py").write_text("from assistant.hookspecs import hookimpl\n\n\n@hookimpl\n"
                                       "def register_backends(register):\n    register('not-a-backend', 42)\n")
    host = PluginHost(dirs=[tmp_path]).load()
    host.collect()
    registry = backend_registry(host)
    assert registry.names() == ["llama.cpp", "mlx", "remote", "tiny"]  # the core plugin's first; 42 is left out
    assert registry.get("tiny").__name__ == "Tiny"
    assert registry.availability(["tiny"]) == {"tiny": (True, "tiny is always here")}
    # with plugins off, the core plugin's built-ins stay
    host = PluginHost(dirs=[tmp_path], enabled=False).load()
    host.collect()
    assert backend_registry(host).names() == list(BUILTIN_BACKENDS)


def test_no_backend_module_imports_assistant():
    """backends/ sits below the application: it takes machine figures as plain values."""
    offenders = []
    for file in sorted((ROOT / "backends").glob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{file.name}: {n}" for n in names if n.split(".")[0] == "assistant"]
    assert offenders == []


# -- in the daemon: a plugin's backend as the configured one --------------------------------


@pytest.fixture
def scripted(tmp_path):
    """The scripted backend plugin of test_tools (it generates), and a file for it to "load"."""
    from test_tools import PLUGIN as SCRIPTED

    plugin = tmp_path / "scripted.py"
    plugin.write_text(SCRIPTED)
    model = tmp_path / "model.bin"
    model.write_bytes(b"scripted")
    return plugin, {"model": "script", "models": {"script": {"path": str(model)}}}


@pytest.mark.slow
async def test_the_configured_backend_can_be_a_plugin_backend(assistant_daemon_factory, scripted):
    plugin, config = scripted
    d = assistant_daemon_factory(plugin_files=[plugin], config={**config, "backend": "scripted"})
    async with await d.client() as c:
        loaded = await c.call("models.load", {"model": "script"})
        assert loaded["backend"] == "scripted"
        result = await (await c.chat(prompt="What is 2 + 3?", temperature=0)).result()
    assert result["stats"]["backend"] == "scripted" and result["text"].startswith("<tool_call>")


@pytest.mark.slow
async def test_a_profile_can_pin_a_plugin_backend(assistant_daemon_factory, scripted):
    plugin, config = scripted
    d = assistant_daemon_factory(plugin_files=[plugin], config={
        **config, "profiles": {"everywhere": {"platform": "*", "backend": "scripted"}}})
    async with await d.client() as c:
        assert (await c.call("models.load", {"model": "script"}))["backend"] == "scripted"


@pytest.mark.slow
def test_an_unregistered_configured_backend_stops_the_daemon(assistant_daemon_factory, scripted):
    plugin, config = scripted
    d = assistant_daemon_factory(plugin_files=[plugin], wait=False, config={
        **config, "models": {"script": {**config["models"]["script"], "backend": "scriptd"}}})
    assert d.wait(60) != 0
    err = d.stderr()
    assert str(d.config) in err and "models.script.backend" in err
    assert "expected one of auto, llama.cpp, mlx, remote, scripted or null, got 'scriptd'; did you mean 'scripted'?" in err
