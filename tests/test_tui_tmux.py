"""End to end in a real terminal: tmux runs `assistant` (the TUI), send-keys
types a question, capture-pane shows the answer from the real SmolLM2 model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_CONFIG

pytestmark = pytest.mark.slow

TMUX = shutil.which("tmux")


class Tmux:
    def __init__(self, name: str):
        self.base = ["tmux", "-L", name, "-f", "/dev/null"]

    def run(self, *args: str) -> str:
        return subprocess.run(self.base + list(args), capture_output=True, text=True, check=True, timeout=30).stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "tui")

    def wait_for(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} did not appear on the terminal within {timeout} s; the screen:\n{screen}")

    def kill(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True, timeout=30)


@pytest.mark.skipif(TMUX is None, reason="tmux is not installed (apt-get install tmux; .ci/run installs it)")
def test_tui_in_a_real_terminal(daemon_factory, isolated_home):
    daemon = daemon_factory(config_text=TEST_CONFIG + "generation:\n  temperature: 0\n").start()
    assistant = Path(sys.executable).with_name("assistant")
    command = f"{assistant} --socket {daemon.socket} --config {daemon.config}"
    tmux = Tmux(f"assistant-test-{os.getpid()}")
    env = {k: os.environ[k] for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME",
                                      "XDG_RUNTIME_DIR")}
    env_args = [a for k, v in env.items() for a in ("-e", f"{k}={v}")]
    try:
        tmux.run("new-session", "-d", "-s", "tui", "-x", "120", "-y", "40", *env_args,
                 f"TERM=xterm-256color {command}")
        tmux.wait_for("● connected", 60)
        tmux.run("send-keys", "-t", "tui", "-l", "Tell me the capital of France.")
        tmux.run("send-keys", "-t", "tui", "Enter")
        screen = tmux.wait_for("Paris", 240)  # a busy 2-core machine can be slow
        assert "You" in screen and "Assistant" in screen
        assert "tok/s" in tmux.wait_for("tok/s", 30)
        tmux.run("send-keys", "-t", "tui", "C-q")
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if "tui" not in subprocess.run(tmux.base + ["list-sessions"], capture_output=True, text=True).stdout:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the TUI did not quit on Ctrl+Q")
    finally:
        tmux.kill()
    # The conversation is in the daemon's database.
    import asyncio

    async def sessions():
        async with await daemon.client() as c:
            return (await c.call("sessions.list"))["sessions"]

    listed = asyncio.run(sessions())
    assert listed[0]["title"] == "Tell me the capital of France." and listed[0]["message_count"] == 2
