"""Helpers for the tests that point our remote backend at real servers on loopback:
ports, waiting for HTTP, chatting through a daemon (``test_remote_backend``,
``test_vllm_remote``), and the scale-out environment (``scripts/scale-setup``:
vLLM in its own virtualenv, ``scripts/convert_for_vllm.py``: the embedded
SmolLM2 as a Hugging Face folder) with a vLLM server started from it
(``test_vllm_remote``, ``test_mlx_real_weights``, ``bench/vllm_remote.py``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SCALE_SETUP = ROOT / "scripts" / "scale-setup"
CONVERT = ROOT / "scripts" / "convert_for_vllm.py"
# Where converted models are kept between runs, as ./dev keeps its llama-cpp-python wheel. Read at
# import, before conftest points XDG_CACHE_HOME at a per-run folder (a conversion takes ~40 s).
BUILD_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "assistant-build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers_http(port: int, timeout: float = 1.0) -> bool:
    """Whether anything answers HTTP on ``port`` (an error status counts: it is up)."""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def wait_http(port: int, proc: subprocess.Popen | None = None, timeout: float = 180.0,
              progress: Callable[[float], None] | None = None) -> None:
    """Until something answers HTTP on ``port``; ``progress(elapsed)`` is called every few seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server on port {port} exited with {proc.returncode}")
        if answers_http(port):
            return
        if progress is not None:
            progress(time.monotonic() - t0)
        time.sleep(0.2 if progress is None else 1.0)
    raise RuntimeError(f"nothing answered on port {port} within {timeout} s")


# -- chatting through a daemon (assistant.testing.DaemonProcess) ------------------------------


async def chat(d, **params):
    """(deltas, result) of one chat."""
    async with await d.client() as c:
        stream = await c.chat(**params)
        deltas = [piece async for piece in stream]
        return deltas, await stream.result()


async def error_of(d, **params):
    """The RPCError a chat ends with (the test fails if it ends without one)."""
    import pytest

    from assistant.protocol import RPCError

    with pytest.raises(RPCError) as info:
        await chat(d, **params)
    return info.value


async def cancel_after(d, pieces: int, **params):
    """Start a chat, cancel it after ``pieces`` deltas; (deltas, result)."""
    async with await d.client() as c:
        stream = await c.chat(**params)
        got = []
        async for piece in stream:
            got.append(piece)
            if len(got) == pieces:
                assert await stream.cancel()
                break
        return got, await stream.result()


# -- the scale-out environment and vLLM --------------------------------------------------------


class ScaleUnavailable(Exception):
    """The scale environment cannot be had here; the message says why (a skip reason)."""


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip())


def scale_python(*, install: bool | None = None, timeout: float = 1800,
                 say: Callable[[str], None] | None = None) -> Path:
    """The scale environment's python, made by ``scripts/scale-setup`` when missing.

    ``install`` None: install unless ``ASSISTANT_SCALE_SETUP=0`` is set (then only an
    environment already made is used). Raises ScaleUnavailable with the script's own
    words where it cannot be made (no wheel for this platform, no index, ...)."""
    if install is None:
        install = os.environ.get("ASSISTANT_SCALE_SETUP", "1") != "0"
    present = subprocess.run([str(SCALE_SETUP), "--check"], capture_output=True, timeout=60, cwd=ROOT)
    if present.returncode != 0:
        if not install:
            raise ScaleUnavailable("the scale environment is not installed and ASSISTANT_SCALE_SETUP=0 "
                                   "(run scripts/scale-setup)")
        if say is not None:
            say("making the scale environment (scripts/scale-setup: vLLM CPU and torch, ~3.5 GB, minutes)")
    try:
        done = subprocess.run([str(SCALE_SETUP)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise ScaleUnavailable(f"scripts/scale-setup did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise ScaleUnavailable(f"scripts/scale-setup failed (exit {done.returncode}): {_tail(done.stderr)}")
    return Path(done.stdout.strip().splitlines()[-1])


def converted_model(python: Path, gguf: Path | None = None, out: Path | None = None,
                    timeout: float = 900) -> Path:
    """The Hugging Face folder of ``gguf`` (default: the embedded SmolLM2, into
    BUILD_CACHE/smollm2-hf), converted by ``scripts/convert_for_vllm.py`` under ``python``
    or reused from an earlier run."""
    if gguf is None:
        from assistant.config.models import resolve_model

        gguf = resolve_model("smollm2-135m").path
        out = out or BUILD_CACHE / "smollm2-hf"
    args = [str(python), str(CONVERT), "--gguf", str(gguf)] + (["--out", str(out)] if out else [])
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if done.returncode != 0:
        raise ScaleUnavailable(f"scripts/convert_for_vllm.py failed (exit {done.returncode}): {_tail(done.stderr)}")
    return Path(done.stdout.strip().splitlines()[-1])


class VllmServer:
    """vLLM's OpenAI-compatible server (``vllm.entrypoints.openai.api_server``) on a model
    folder, on loopback, in a process group of its own (its engine and worker processes
    are children: killing the group takes them all, and nothing else)."""

    def __init__(self, python: Path, model: Path, port: int, log: Path, *extra: str, served: str = "smol",
                 max_model_len: int = 2048):
        self.port, self.log, self.served = port, log, served
        self.url = f"http://127.0.0.1:{port}/v1"
        self.scratch = log.parent / f"{log.stem}-tmp"
        self.scratch.mkdir(mode=0o700, exist_ok=True)
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", served, "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", str(max_model_len), "--dtype", "float32", *extra]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache: plenty for 2048-token requests
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",  # nothing from a hub: the folder is all
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_HOST_IP": "127.0.0.1",  # its internal sockets on loopback too
               # its scratch files (torch.distributed's rendezvous file, left behind when it is
               # killed) in a folder of its own beside the log, removed by stop()
               "TMPDIR": str(self.scratch)}
        self._out = open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.startup_s: float | None = None

    def ready(self, timeout: float = 600, say: Callable[[str], None] | None = None) -> "VllmServer":
        """Wait until it answers; ``say`` gets a progress line (its log's last line) every 30 s."""
        last = [0.0]

        def progress(elapsed: float) -> None:
            if say is not None and elapsed - last[0] >= 30:
                last[0] = elapsed
                say(f"vLLM starting, {elapsed:.0f} s: {_tail(self.output(), 1)[:160]}")

        try:
            wait_http(self.port, self.proc, timeout=timeout, progress=progress)
        except RuntimeError as exc:
            raise ScaleUnavailable(f"vLLM did not start: {exc}; its log ends: {_tail(self.output())[:600]}") from None
        self.startup_s = time.monotonic() - self.started
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Its Prometheus metrics, ``name{labels}`` -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def metric(self, prefix: str) -> float:
        """The sum of the metrics whose ``name{labels}`` starts with ``prefix``."""
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def kill(self) -> None:
        """SIGKILL to its process group: the server, its engine and workers at once."""
        self._signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (vLLM shuts its engine down), SIGKILL after 30 s."""
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._signal(signal.SIGKILL)  # any child left behind in its group
        self._out.close()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)  # its own group (start_new_session): only what it started
        except ProcessLookupError:
            pass


def reporter(config=None) -> Callable[[str], None]:
    """A function printing progress lines on the terminal, past pytest's output capture
    when ``config`` (pytest's) is given: a start-up of minutes should show it is alive."""
    capture = config.pluginmanager.getplugin("capturemanager") if config is not None else None

    def say(line: str) -> None:
        if capture is None:
            print(f"[scale] {line}", file=sys.stderr, flush=True)
            return
        with capture.global_and_fixture_disabled():
            print(f"\n[scale] {line}", file=sys.stderr, flush=True)

    return say
