"""Shared test fixtures: an isolated home for every test, and real daemons.

Every test runs with its own XDG directories, so nothing touches the user's
config, data or sockets. ``DaemonProcess`` starts the real ``assistant serve``
as a subprocess on a private socket with the real SmolLM2 weights.
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

import pytest

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
    for var in ("ASSISTANT_SOCKET", "ASSISTANT_CONFIG", "ASSISTANT_PLUGINS", "ASSISTANT_PLUGIN_DIR"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    shutil.rmtree(runtime, ignore_errors=True)


def short_socket_path() -> Path:
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


class DaemonProcess:
    """A real ``assistant serve`` subprocess on its own socket."""

    def __init__(self, home: Path, *, config_text: str = TEST_CONFIG, socket_path: Path | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.home = home
        self.socket = socket_path or short_socket_path()
        self.config = home / "config.yaml"
        if config_text is not None and not self.config.exists():
            self.config.write_text(config_text)
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None
        self.stderr_path = home / f"daemon-{time.monotonic_ns()}.stderr"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "assistant", "--socket", str(self.socket), "--config", str(self.config),
                "serve", *self.extra_args]

    def start(self, *, wait: bool = True, timeout: float = 60) -> "DaemonProcess":
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=self._err,
                                     env=os.environ.copy(), cwd=str(ROOT))
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
        if getattr(self, "_err", None):
            self._err.close()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def daemon_factory(isolated_home):
    started: list[DaemonProcess] = []

    def make(**kwargs) -> DaemonProcess:
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


def run_cli(*args: str, socket_path: Path | None = None, config: Path | None = None, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the real ``assistant`` command line."""
    cmd = [sys.executable, "-m", "assistant"]
    if socket_path is not None:
        cmd += ["--socket", str(socket_path)]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, input=input, timeout=timeout,
                          cwd=str(ROOT), env=os.environ.copy())
