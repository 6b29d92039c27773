"""Streaming over the daemon's HTTP API vs its JSON-RPC socket vs llama-cpp-python directly.

Same model, same prompt tokens, greedy, plain decoding (no drafter), same
threads and context, interleaved round by round in one run. Prints, side by
side, client-measured tokens/s (after the first token) and time to first
token for the three, the ratios to direct, and whether the text is the same.
The HTTP side is the OpenAI chat completions endpoint read as server-sent
events by httpx (what an OpenAI client does); the daemon's cache is dropped
between rounds (a reload), so every TTFT includes the prompt's prefill.

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

import httpx  # noqa: E402

from assistant.client import Client  # noqa: E402
from assistant.config.models import resolve_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from daemon_vs_direct import PROMPT, _daemon_tokens, daemon_run, direct_run  # noqa: E402


async def http_run(http: httpx.AsyncClient, url: str, messages, n: int) -> tuple[float, float, int, str]:
    """(ttft_ms, tokens/s after the first, tokens, text) of one streamed chat completion."""
    body = {"messages": messages, "max_tokens": n, "temperature": 0.0, "draft": "off", "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, tokens = None, [], 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice["delta"].get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return (first - t0) * 1000, (tokens - 1) / (end - first), tokens, "".join(parts)


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
                        ("http", "daemon, HTTP (OpenAI SSE)")):
        tps, ttft = med(name, 1), med(name, 0)
        print(f"{label:<28}{tps:>10.1f}{ttft:>10.1f}{tps / x_tps:>13.3f}{ttft - x_ttft:>+10.1f}")
    print(f"HTTP/direct throughput {med('http', 1) / x_tps:.3f} (goal >= 0.97); HTTP TTFT overhead "
          f"{med('http', 0) - x_ttft:+.1f} ms (goal < 20 ms); HTTP vs JSON-RPC TTFT "
          f"{med('http', 0) - med('rpc', 0):+.1f} ms")
    print(f"identical text all three ways: {len(texts) == 1}")


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
                n_threads_batch=args.threads, flash_attn=True, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def run() -> int:
        client = await _connect(home / "d.sock")
        await client.call("models.load", {"model": args.model})
        tokens = _daemon_tokens(spec.path, messages)

        async def drop_cache() -> None:
            await client.call("models.load", {"model": args.model, "context": args.context + 1})
            await client.call("models.load", {"model": args.model, "context": args.context})

        rows: dict[str, list] = {"direct": [], "rpc": [], "http": []}
        async with httpx.AsyncClient(timeout=600) as http:
            direct_run(llm, tokens, 8)  # warm-up, all three
            llm.reset()
            await daemon_run(client, messages, 8)
            await http_run(http, url, messages, 8)
            for _ in range(args.rounds):
                rows["direct"].append(direct_run(llm, tokens, args.tokens))
                llm.reset()
                await drop_cache()
                rows["rpc"].append(await daemon_run(client, messages, args.tokens))
                await drop_cache()
                rows["http"].append(await http_run(http, url, messages, args.tokens))
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
