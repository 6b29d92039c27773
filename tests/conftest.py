"""Shared test fixtures: an isolated home for every test, and real daemons.

Every test runs with its own XDG directories, so nothing touches the user's
config, data or sockets. ``DaemonProcess`` (from ``assistant.testing``, the
same helper plugin authors use) starts the real ``assistant serve`` as a
subprocess on a private socket with the real SmolLM2 weights.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

pytest.register_assert_rewrite("assistant.testing")
from assistant.testing import DaemonProcess, run_cli, short_socket_path, socket_answers  # noqa: E402,F401

pytest_plugins = ["assistant.testing"]

ROOT = Path(__file__).resolve().parents[1]

# Tests pin threads and context so results do not depend on the machine.
TEST_CONFIG = """\
threads: 2
context: 2048
preload: true
"""


@pytest.fixture(scope="session")
def shared_cache_dir():
    """One cache for the whole run: assembling Gemma's GGUF once is enough."""
    path = Path(tempfile.mkdtemp(prefix="assistant-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, shared_cache_dir):
    """Point every per-user directory into the test's temp dir."""
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state")):
        d = tmp_path / sub
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache_dir))
    # Unix socket paths are limited to ~104 bytes: keep the runtime dir short.
    runtime = Path(tempfile.mkdtemp(prefix="as-rt-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    for var in ("ASSISTANT_SOCKET", "ASSISTANT_CONFIG", "ASSISTANT_PLUGINS", "ASSISTANT_PLUGIN_DIR",
                "ASSISTANT_TRACE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def daemon_factory(isolated_home):
    started: list[DaemonProcess] = []

    def make(**kwargs) -> DaemonProcess:
        kwargs.setdefault("config_text", TEST_CONFIG)
        d = DaemonProcess(isolated_home, **kwargs)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    """A running daemon with the default model (SmolLM2-135M)."""
    return daemon_factory().start()
