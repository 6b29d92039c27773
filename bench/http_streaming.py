"""Streaming over the daemon's HTTP API vs its JSON-RPC socket vs llama-cpp-python directly.

Same model, same prompt tokens, greedy, plain decoding (no drafter), same
threads and context, interleaved round by round in one run. Prints, side by
side, client-measured tokens/s (after the first token) and time to first
token each way, the ratios to direct, and whether the text is the same.

The HTTP side is the OpenAI chat completions endpoint read as server-sent
events by httpx (what the openai SDK does), and again by aiohttp. httpx
itself costs a few ms of the time to first token (measured: the request
reaches the daemon ~3 ms later than aiohttp's, the first event is read ~4 ms
later) and CPU per event that the model's threads miss on a small machine;
the aiohttp row is closer to the daemon's own part.

The daemon's cache is dropped between rounds (the model unloaded, then
loaded again, both done before the round starts), as llama-cpp-python's is
(``reset``), so every TTFT includes the prompt's whole prefill. Both sides
load the model alike: the same file, context, threads (prompt and
generation), batch (512), flash attention on (llama.cpp's "auto" on the CPU,
which the daemon keeps; llama-cpp-python is told), an F16 K and V cache
(drafting off: with a drafter the daemon asks for a Q8_0 K cache), no MTP
layers.

    .venv/bin/python bench/http_streaming.py [--rounds 5] [--tokens 200] [--threads 2]

Goal (issue 13): HTTP throughput >= 0.97x of direct, TTFT overhead under 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from assistant.client import Client  # noqa: E402
from assistant.config.models import resolve_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from daemon_vs_direct import PROMPT, _daemon_tokens, daemon_run, direct_run  # noqa: E402


def _body(messages, n: int) -> dict:
    return {"messages": messages, "max_tokens": n, "temperature": 0.0, "draft": "off", "stream": True,
            "stream_options": {"include_usage": True}}


class _Reading:
    """One streamed reply as the client reads it: its first text's time, its text, its token count."""

    def __init__(self) -> None:
        self.t0, self.first, self.parts, self.tokens = time.perf_counter(), None, [], 0

    def line(self, line: str) -> None:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices", []):
            text = choice["delta"].get("content")
            if text:
                self.first = self.first or time.perf_counter()
                self.parts.append(text)

    def row(self) -> tuple[float, float, int, str]:
        end = time.perf_counter()
        return ((self.first - self.t0) * 1000, (self.tokens - 1) / (end - self.first), self.tokens,
                "".join(self.parts))


async def http_run(http: httpx.AsyncClient, url: str, messages, n: int) -> tuple[float, float, int, str]:
    """(ttft_ms, tokens/s after the first, tokens, text) of one streamed chat completion, read
    with httpx (as the openai SDK reads it)."""
    reading = _Reading()
    async with http.stream("POST", url, json=_body(messages, n)) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            reading.line(line)
    return reading.row()


async def aiohttp_run(session: aiohttp.ClientSession, url: str, messages, n: int) -> tuple[float, float, int, str]:
    """The same read with aiohttp, a lighter client: what is left is the daemon's part."""
    reading = _Reading()
    async with session.post(url, json=_body(messages, n)) as r:
        r.raise_for_status()
        async for raw in r.content:
            reading.line(raw.decode("utf-8").strip())
    return reading.row()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_daemon(home: Path, args, port: int) -> subprocess.Popen:
    cfg = home / "config.yaml"
    # Drafting off, as in daemon_vs_direct.py: the same arithmetic (F16 KV cache) as llama-cpp-python.
    cfg.write_text(f"model: {args.model}\nthreads: {args.threads}\ncontext: {args.context}\n"
                   "speculative:\n  drafter: 'off'\n")
    env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "XDG_STATE_HOME": str(home / "state")}
    return subprocess.Popen([sys.executable, "-m", "assistant", "--socket", str(home / "d.sock"), "--config",
                             str(cfg), "serve", "--quiet", "--http", f"127.0.0.1:{port}"], env=env, cwd=str(ROOT))


async def _connect(sock: Path) -> Client:
    for _ in range(600):
        try:
            return await Client.connect(sock, client_name="bench")
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit("daemon did not start")


def _report(args, spec, tokens, rows: dict[str, list]) -> None:
    med = lambda name, i: statistics.median(r[i] for r in rows[name])  # noqa: E731
    texts = {r[3] for series in rows.values() for r in series}
    print(f"model {args.model} ({spec.path.name}), {args.threads} threads, context {args.context}, "
          f"{len(tokens)} prompt tokens, {rows['direct'][0][2]} generated tokens, {args.rounds} rounds, medians")
    print(f"{'':<28}{'tokens/s':>10}{'TTFT ms':>10}{'tok/s ratio':>13}{'TTFT +ms':>10}")
    x_tps, x_ttft = med("direct", 1), med("direct", 0)
    for name, label in (("direct", "llama-cpp-python direct"), ("rpc", "daemon, JSON-RPC socket"),
                        ("http", "daemon, HTTP (OpenAI SSE)"), ("aiohttp", "  the same, aiohttp client")):
        tps, ttft = med(name, 1), med(name, 0)
        print(f"{label:<28}{tps:>10.1f}{ttft:>10.1f}{tps / x_tps:>13.3f}{ttft - x_ttft:>+10.1f}")
    print(f"HTTP/direct throughput {med('http', 1) / x_tps:.3f} (goal >= 0.97); HTTP TTFT overhead "
          f"{med('http', 0) - x_ttft:+.1f} ms (goal < 20 ms); HTTP vs JSON-RPC TTFT "
          f"{med('http', 0) - med('rpc', 0):+.1f} ms")
    print(f"identical text every way: {len(texts) == 1}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()

    from llama_cpp import Llama

    spec = resolve_model(args.model)
    home = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    port = _free_port()
    daemon = _start_daemon(home, args, port)
    llm = Llama(model_path=str(spec.path), n_ctx=args.context, n_threads=args.threads,
                n_threads_batch=args.threads, n_batch=512, n_ubatch=512, flash_attn=True, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def run() -> int:
        client = await _connect(home / "d.sock")
        await client.call("models.load", {"model": args.model})
        tokens = _daemon_tokens(spec.path, messages)

        async def drop_cache() -> None:
            # Unloaded, then loaded: both answered once done. A reload (models.load with another
            # context) would answer as soon as the new copy is in, while the old one is freed in
            # the background, on the cores the next round's prefill needs (measured: the free
            # overlapped the first 40-60 ms of the next request).
            await client.call("models.unload", {"model": args.model})
            await client.call("models.load", {"model": args.model, "context": args.context})

        rows: dict[str, list] = {"direct": [], "rpc": [], "http": [], "aiohttp": []}
        async with httpx.AsyncClient(timeout=600) as http, aiohttp.ClientSession() as session:
            direct_run(llm, tokens, 8)  # warm-up, every way
            llm.reset()
            await daemon_run(client, messages, 8)
            await http_run(http, url, messages, 8)
            await aiohttp_run(session, url, messages, 8)
            for _ in range(args.rounds):
                rows["direct"].append(direct_run(llm, tokens, args.tokens))
                llm.reset()
                await drop_cache()
                rows["rpc"].append(await daemon_run(client, messages, args.tokens))
                await drop_cache()
                rows["http"].append(await http_run(http, url, messages, args.tokens))
                await drop_cache()
                rows["aiohttp"].append(await aiohttp_run(session, url, messages, args.tokens))
        _report(args, spec, tokens, rows)
        await client.close()
        return 0

    try:
        return asyncio.run(run())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
