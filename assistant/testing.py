"""Pytest fixtures to test against a real daemon: for plugin authors, and for
the assistant's own tests.

In a plugin project's ``conftest.py``::

    pytest_plugins = ["assistant.testing"]

then::

    async def test_my_skill(assistant_daemon_factory):
        daemon = assistant_daemon_factory(plugins=["my_plugin"])
        async with await daemon.client() as client:
            reply = await client.call("skills.call", {"name": "my_plugin.hello", "arguments": {}})

The daemon is a real ``assistant serve`` subprocess with its own socket,
config and XDG directories (nothing of the user's is touched). By default it
does not preload a model, so plugin tests start in about a second; a chat
request loads the default model on demand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import pytest
import yaml

from assistant.client import Client


def short_socket_path() -> Path:
    """A socket path short enough for AF_UNIX's ~104-byte limit."""
    return Path(tempfile.mkdtemp(prefix="as-", dir="/tmp")) / "d.sock"


def socket_answers(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


def isolated_env(home: Path) -> dict[str, str]:
    """Environment variables that point every per-user directory into ``home``."""
    env = {}
    for var, sub in (("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "data"), ("XDG_STATE_HOME", "state"),
                     ("XDG_CACHE_HOME", "cache")):
        d = home / sub
        d.mkdir(parents=True, exist_ok=True)
        env[var] = str(d)
    runtime = Path(tempfile.mkdtemp(prefix="as-rt-", dir="/tmp"))
    env["XDG_RUNTIME_DIR"] = str(runtime)
    return env


class DaemonProcess:
    """A real ``assistant serve`` subprocess on its own socket."""

    def __init__(self, home: Path, *, config_text: str | None = None, socket_path: Path | None = None,
                 extra_args: Iterable[str] = (), global_args: Iterable[str] = (),
                 env: dict[str, str] | None = None):
        self.home = Path(home)
        self.socket = socket_path or short_socket_path()
        self.config = self.home / "config.yaml"
        if config_text is not None and not self.config.exists():
            self.config.write_text(config_text)
        elif not self.config.exists():
            self.config.write_text("")
        self.extra_args = list(extra_args)
        self.global_args = list(global_args)
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.home / f"daemon-{time.monotonic_ns()}.stderr"
        self._err = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "assistant", "--socket", str(self.socket), "--config", str(self.config),
                *self.global_args, "serve", *self.extra_args]

    def start(self, *, wait: bool = True, timeout: float = 60) -> "DaemonProcess":
        self._err = open(self.stderr_path, "wb")
        # cwd is the daemon's own home: a source tree's stale *.egg-info in the
        # current directory would otherwise shadow the installed entry points.
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._err, env=self.env,
                                     cwd=str(self.home))
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.stderr()}")
            if socket_answers(self.socket):
                return
            time.sleep(0.05)
        raise RuntimeError(f"daemon did not answer within {timeout} s:\n{self.stderr()}")

    async def client(self, name: str = "test") -> Client:
        """A connected, initialized client (use it with ``async with``)."""
        return await Client.connect(self.socket, client_name=name)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._err is not None:
            self._err.close()
            self._err = None

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def run_cli(*args: str, socket_path: Path | None = None, config: Path | None = None, input: str | None = None,
            timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None
            ) -> subprocess.CompletedProcess:
    """Run the real ``assistant`` command line."""
    cmd = [sys.executable, "-m", "assistant"]
    if socket_path is not None:
        cmd += ["--socket", str(socket_path)]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, input=input, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd or tempfile.gettempdir())


@pytest.fixture
def assistant_home(tmp_path):
    """A private home: XDG dirs inside tmp_path (for this process's code and the daemons it starts)."""
    home = tmp_path / "assistant-home"
    home.mkdir()
    env = isolated_env(home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)


@pytest.fixture
def assistant_daemon_factory(assistant_home):
    """``factory(plugins=None, plugin_files=(), config=None, preload=False, no_plugins=False)``
    starts a daemon and returns its ``DaemonProcess`` (stopped after the test).

    - ``plugins``: an allow-list of plugin names (entry points or files); None loads all;
    - ``plugin_files``: paths of single-file plugins to load (copied into a plugin dir);
    - ``config``: a dict merged into the daemon's config.
    """
    started: list[DaemonProcess] = []

    def factory(*, plugins: list[str] | None = None, plugin_files: Iterable[str | Path] = (),
                config: dict[str, Any] | None = None, preload: bool = False, no_plugins: bool = False,
                wait: bool = True) -> DaemonProcess:
        home = assistant_home / f"daemon{len(started)}"
        home.mkdir()
        plugin_dir = home / "plugins"
        plugin_dir.mkdir()
        for f in plugin_files:
            shutil.copy(f, plugin_dir / Path(f).name)
        env = {"ASSISTANT_PLUGIN_DIR": str(plugin_dir)}
        if plugins is not None:
            env["ASSISTANT_PLUGINS"] = ",".join(plugins)
        text = yaml.safe_dump({"preload": preload, "threads": 2, **(config or {})})
        d = DaemonProcess(home, config_text=text, env=env, global_args=["--no-plugins"] if no_plugins else ())
        started.append(d)
        return d.start(wait=wait)

    yield factory
    for d in started:
        d.stop()
