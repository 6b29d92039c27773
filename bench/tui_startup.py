"""TUI benchmarks: startup to the first interactive frame, and a fast stream.

    ./dev bench tui_startup.py [--runs 5] [--tokens 2000] [--rate 300] [--json]

1. Warm start: a daemon is already up, with one conversation (a code answer in
   Markdown); `assistant` is launched in a pseudo terminal (120x40) and timed
   until the first frame that shows the status line's "connected" (the session
   on screen, the input focused and usable). The goal is under 0.5 s on the
   2-core machine. Also printed: the first drawn frame, and the CPU time the
   TUI process used up to the interactive frame (on a busy machine wall time
   includes waiting for a CPU). The launches run without PYTHONDONTWRITEBYTECODE,
   as an installed program does (bytecode cached, not recompiled every launch).
2. Cold start: no daemon; `assistant` starts one (the frame "starting the
   daemon" shows), then connects. Timed to "connected"; the daemon's model
   preload goes on in the background.
3. Stream: a synthetic reply of N tokens (Markdown: paragraphs, lists, code
   blocks) arrives at R tokens/s through the TUI's chat path (FakeClient, the
   real widgets, Textual's MarkdownStream) in a headless app; every 50 ms the
   bench compares what is on screen with what has arrived. Lag = how long the
   oldest not-yet-shown token has been waiting. It must not grow over the
   stream; the lag at the end (last token arrived -> whole reply shown) is
   reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pty
import re
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import fcntl
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # tui_fake: the canned daemon the stream bench runs against

from assistant.testing import DaemonProcess, isolated_env, short_socket_path, socket_answers  # noqa: E402

ANSI = re.compile(rb"\x1b\[[0-9;?<>=$]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]")
CONNECTED = "● connected".encode()


def assistant_command(sock: Path, config: Path) -> list[str]:
    exe = Path(sys.executable).with_name("assistant")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "assistant"]
    return cmd + ["--socket", str(sock), "--config", str(config)]


def run_in_pty(cmd: list[str], env: dict[str, str], marks: dict[str, bytes], timeout: float = 120.0
               ) -> dict[str, float]:
    """Start ``cmd`` in a 120x40 pseudo terminal; seconds until each mark first shows
    (escape sequences stripped), plus ``first_frame`` (first output). Quits with Ctrl+Q."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
                            close_fds=True)
    os.close(slave)
    seen: dict[str, float] = {}
    raw = b""
    try:
        while not all(name in seen for name in marks):
            if time.perf_counter() - t0 > timeout:
                text = ANSI.sub(b"", raw).decode(errors="replace")
                raise RuntimeError(f"timed out; marks seen: {seen}; screen text: {text[-2000:]}")
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                if proc.poll() is not None:
                    raise RuntimeError(f"assistant exited with {proc.returncode}: "
                                       f"{ANSI.sub(b'', raw).decode(errors='replace')[-2000:]}")
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            now = time.perf_counter() - t0
            raw += chunk
            seen.setdefault("first_output", now)
            plain = ANSI.sub(b"", raw)
            for name, mark in marks.items():
                if name not in seen and mark in plain:
                    seen[name] = now
                    seen[name + "_cpu"] = _cpu_seconds(proc.pid)
        os.write(master, b"\x11")  # Ctrl+Q
        end = time.perf_counter() + 10
        while proc.poll() is None and time.perf_counter() < end:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    os.read(master, 65536)
                except OSError:
                    break
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        os.close(master)
    return seen


def _cpu_seconds(pid: int) -> float:
    """CPU time (user + system) the process has used: what the start costs, whatever else runs."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


PAINTED = b"Sessions"  # the sidebar's title: the first frame with the UI drawn


def bench_startup(runs: int) -> dict[str, object]:
    home = Path(tempfile.mkdtemp(prefix="tui-bench-"))
    env = {**os.environ, **isolated_env(home), "TERM": "xterm-256color", "COLORTERM": "truecolor"}
    # As installed, Python reads the project's modules from cached bytecode; an environment that
    # forbids writing it (PYTHONDONTWRITEBYTECODE) would recompile them on every launch.
    for var in ("ASSISTANT_SOCKET", "ASSISTANT_CONFIG", "PYTHONDONTWRITEBYTECODE"):
        env.pop(var, None)
    saved = dict(os.environ)
    os.environ.update(env)  # the daemon started below shares the isolated dirs
    config = home / "config.yaml"
    config.write_text("threads: 2\n")
    out: dict[str, object] = {}
    try:
        # warm: the daemon is up (model loaded)
        daemon = DaemonProcess(home, config_text=config.read_text(), socket_path=short_socket_path(), env=env)
        daemon.config = config
        daemon.start()
        try:
            _seed_conversation(daemon.socket)  # the TUI opens on a conversation (a Markdown reply)
            marks = {"painted": PAINTED, "connected": CONNECTED}
            run_in_pty(assistant_command(daemon.socket, config), env, marks)  # warm the file cache
            warm = [run_in_pty(assistant_command(daemon.socket, config), env, marks) for _ in range(runs)]
        finally:
            daemon.stop()
        out["warm_first_frame_s"] = [round(r["painted"], 3) for r in warm]
        out["warm_connected_s"] = [round(r["connected"], 3) for r in warm]
        out["warm_connected_cpu_s"] = [round(r["connected_cpu"], 3) for r in warm]
        # cold: no daemon; the TUI starts one
        cold = []
        for _ in range(max(1, min(runs, 3))):
            sock = short_socket_path()
            r = run_in_pty(assistant_command(sock, config), env,
                           {"starting": "starting the daemon".encode(), "connected": CONNECTED}, timeout=180)
            cold.append(r)
            _shutdown(sock)
        out["cold_starting_frame_s"] = [round(r.get("starting", float("nan")), 3) for r in cold]
        out["cold_connected_s"] = [round(r["connected"], 3) for r in cold]
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(home, ignore_errors=True)
    return out


def _seed_conversation(sock: Path) -> None:
    from assistant.client import Client

    async def chat() -> None:
        async with await Client.connect(sock) as c:
            stream = await c.chat(prompt="Write a Python function that adds two numbers.", session="bench",
                                  max_tokens=96, temperature=0)
            await stream.result()

    asyncio.run(chat())


def _shutdown(sock: Path) -> None:
    from assistant.client import Client

    async def stop() -> None:
        async with await Client.connect(sock) as c:
            await c.call("shutdown")

    try:
        asyncio.run(stop())
    except Exception:  # noqa: BLE001
        return
    deadline = time.monotonic() + 30
    while socket_answers(sock) and time.monotonic() < deadline:
        time.sleep(0.05)


def synthetic_tokens(n: int) -> list[str]:
    """~n tokens of Markdown: paragraphs, a list and code blocks, like a long technical answer."""
    words = ("the daemon streams every token to the terminal while the model keeps decoding and "
             "the interface renders markdown without falling behind").split()
    code = ["```python\n", "def ", "handle", "(request", "):\n", "    ", "result ", "= ", "await ", "run", "(request",
            ")\n", "    ", "return ", "result", "\n", "```\n\n"]
    out: list[str] = []
    i = 0
    while len(out) < n:
        block = (i // 60) % 4
        if block == 3 and i % 60 == 0:
            out.extend(code)
        elif block == 2 and i % 12 == 0:
            out.append("\n- ")
        elif i % 60 == 0 and i:
            out.append("\n\n")
        out.append(words[i % len(words)] + " ")
        i += 1
    return out[:n]


async def bench_stream(n_tokens: int, rate: float) -> dict[str, object]:
    from assistant.tui.app import AssistantApp
    from tui_fake import FakeClient
    from assistant.tui.widgets.chat import ChatInput, ChatView

    tokens = synthetic_tokens(n_tokens)
    produced_at: list[float] = []
    cumulative: list[int] = []
    total = 0

    def on_produce(i: int, tok: str) -> None:
        nonlocal total
        total += len(tok)
        produced_at.append(time.perf_counter())
        cumulative.append(total)

    fake = FakeClient(sessions={}, reply=tokens, rate=rate, on_produce=on_produce, events=[])

    # "On screen" = parsed and mounted into the Markdown widget (Textual paints it on its next frame):
    # record the document length each time an append completes.
    from textual.widgets import Markdown

    mounted = [0]
    original_append = Markdown.append

    def append(self, text):
        awaitable = original_append(self, text)

        async def done():
            await awaitable
            mounted[0] = max(mounted[0], len(self.source))

        return done()

    Markdown.append = append

    async def factory(on_starting, start):
        return fake

    app = AssistantApp(client_factory=factory, history_file=None)
    samples: list[tuple[float, float, int]] = []  # (time since first token, lag s, tokens behind)
    async with app.run_test(size=(120, 40)) as pilot:
        while app.connected_once is None or not app.connected_once.is_set():
            await pilot.pause(0.02)
        app.query_one(ChatInput).text = "Write a long answer."
        await pilot.press("enter")
        while not produced_at:
            await asyncio.sleep(0.005)
        t_first = produced_at[0]
        view = None
        while True:
            await asyncio.sleep(0.05)
            now = time.perf_counter()
            view = view or app.query_one(ChatView).last("assistant")
            if view is None:
                continue
            shown = mounted[0]
            done_tokens = len(produced_at)
            # the first token not yet on screen
            k = next((j for j in range(done_tokens) if cumulative[j] > shown), None)
            lag = (now - produced_at[k]) if k is not None else 0.0
            behind = done_tokens - k if k is not None else 0
            samples.append((now - t_first, lag, behind))
            if done_tokens == len(tokens) and k is None:
                end_lag = now - produced_at[-1]
                break
            if now - t_first > len(tokens) / rate + 60:
                raise RuntimeError("the stream did not finish rendering within 60 s of its end")
        await pilot.pause()
    Markdown.append = original_append
    duration = produced_at[-1] - produced_at[0]
    quarter = max(1, len(samples) // 4)
    first_q = [s[1] for s in samples[:quarter]]
    last_q = [s[1] for s in samples[-quarter:]]
    return {
        "tokens": len(tokens), "rate_target": rate, "rate_achieved": round((len(tokens) - 1) / duration, 1),
        "samples": len(samples),
        "lag_mean_first_quarter_ms": round(1000 * statistics.mean(first_q), 1),
        "lag_mean_last_quarter_ms": round(1000 * statistics.mean(last_q), 1),
        "lag_max_ms": round(1000 * max(s[1] for s in samples), 1),
        "max_tokens_behind": max(s[2] for s in samples),
        "lag_at_end_ms": round(1000 * end_lag, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--skip-startup", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result: dict[str, object] = {"load_average": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    if not args.skip_startup:
        result["startup"] = bench_startup(args.runs)
    if not args.skip_stream:
        result["stream"] = asyncio.run(bench_stream(args.tokens, args.rate))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"machine: {result['cpus']} CPUs, load average {result['load_average']}")
    if "startup" in result:
        s = result["startup"]
        med = statistics.median
        print(f"warm start (daemon up), `assistant` to first frame:       median {med(s['warm_first_frame_s']):.3f} s"
              f"  {s['warm_first_frame_s']}")
        print(f"warm start (daemon up), `assistant` to interactive frame: median {med(s['warm_connected_s']):.3f} s"
              f"  {s['warm_connected_s']}  (goal < 0.5 s)")
        print(f"  CPU time the TUI process used up to that frame: median "
              f"{med(s['warm_connected_cpu_s']):.3f} s  {s['warm_connected_cpu_s']}")
        print(f"cold start (no daemon), to 'starting the daemon' frame:   median "
              f"{med(s['cold_starting_frame_s']):.3f} s  {s['cold_starting_frame_s']}")
        print(f"cold start (no daemon), to interactive frame:             median {med(s['cold_connected_s']):.3f} s"
              f"  {s['cold_connected_s']}")
    if "stream" in result:
        st = result["stream"]
        print(f"stream: {st['tokens']} tokens at {st['rate_achieved']} tok/s (target {st['rate_target']:.0f}); "
              f"lag mean first quarter {st['lag_mean_first_quarter_ms']} ms, last quarter "
              f"{st['lag_mean_last_quarter_ms']} ms, max {st['lag_max_ms']} ms "
              f"({st['max_tokens_behind']} tokens behind); lag at end {st['lag_at_end_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
