"""The remote backend's overhead: a chat through our daemon (a ``backend: remote``
alias) against the same request sent straight to the same server, in one run.

By default it starts llama-cpp-python's own OpenAI-compatible server on the
embedded SmolLM2 (``--flash_attn true``, as our llama.cpp backend computes
attention); ``--url`` (and ``--served-model``, ``--api-key-env``) points it at
a server already running instead: vLLM, llama-server, another daemon of ours.
Both sides stream the same messages, greedy, with the same ``max_tokens``;
rounds alternate, medians are printed. Time to first token is measured by
the client from sending the request to the first text; tokens/s is the
tokens after the first over the time after the first (the server's pieces,
one per token on llama.cpp's servers).

    .venv/bin/python bench/remote_overhead.py [--rounds 5] [--tokens 200] [--server-cpus 0]
    .venv/bin/python bench/remote_overhead.py --url http://gpu-box:8000/v1 --served-model smol

``--server-cpus 0`` pins the server to those CPUs (its threads: one per CPU) and
this script, its daemon and the direct client to the others, as when the server
is another machine: on one small machine the daemon's own CPU (parsing the
server's events, sending ours) would otherwise be taken from the server's
decode, which says how crowded the machine is, not what the remote backend adds.
Without it everything shares every CPU.

Goal (issue 13): throughput >= 0.97x of direct, under 20 ms added to the first token.
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
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant.client import Client  # noqa: E402
from assistant.config.models import resolve_model  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."
ALIAS = "remote-bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout} s")


async def direct_run(session, url: str, model: str, n: int) -> tuple[float, float, int, str]:
    """(ttft_ms, tokens/s after the first, pieces, text) straight from the server (aiohttp, SSE;
    ``session`` kept across runs, as the daemon keeps its connection)."""
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": n,
            "temperature": 0.0, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.0, "top_k": 40}
    pieces, first = [], None
    t0 = time.perf_counter()
    async with session.post(f"{url}/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            delta = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
            if delta:
                first = first or time.perf_counter()
                pieces.append(delta)
    end = time.perf_counter()
    return (first - t0) * 1000, (len(pieces) - 1) / (end - first), len(pieces), "".join(pieces)


async def daemon_run(client: Client, n: int) -> tuple[float, float, int, str]:
    """The same through our daemon's remote alias, measured by the socket's client."""
    t0 = time.perf_counter()
    first = None
    stream = await client.chat(model=ALIAS, messages=[{"role": "user", "content": PROMPT}], max_tokens=n,
                               temperature=0.0)
    async for _ in stream:
        first = first or time.perf_counter()
    end = time.perf_counter()
    result = await stream.result()
    count = result["stats"]["completion_tokens"]
    return (first - t0) * 1000, (count - 1) / (end - first), count, result["text"]


def _start_server(args) -> tuple[str, str, subprocess.Popen | None]:
    if args.url:
        return args.url.rstrip("/"), args.served_model, None
    port = _free_port()
    smol = resolve_model("smollm2-135m").path
    cpus = args.server_cpus
    threads = len(cpus) if cpus else args.threads
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smol), "--model_alias", "smol",
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.context),
                             "--n_threads", str(threads), "--flash_attn", "true"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
    return f"http://127.0.0.1:{port}/v1", "smol", proc


def report(what: str, x_rows: list[tuple], d_rows: list[tuple]) -> None:
    """Print the medians side by side, their ratios, and whether every text was the same."""
    same = all(row[3] == x_rows[0][3] for row in (*d_rows, *x_rows))
    med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
    x_ttft, x_tps, d_ttft, d_tps = med(x_rows, 0), med(x_rows, 1), med(d_rows, 0), med(d_rows, 1)
    print(f"{what}, {x_rows[0][2]} tokens per reply, {len(x_rows)} rounds, medians")
    print(f"{'':<30}{'tokens/s':>10}{'TTFT ms':>10}")
    print(f"{'the server directly':<30}{x_tps:>10.1f}{x_ttft:>10.1f}")
    print(f"{'through the remote backend':<30}{d_tps:>10.1f}{d_ttft:>10.1f}")
    print(f"throughput ratio remote/direct: {d_tps / x_tps:.3f}  (goal >= 0.97)")
    print(f"TTFT overhead: {d_ttft - x_ttft:+.1f} ms  (goal < 20 ms)")
    print(f"identical text both ways: {same}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--url", help="an OpenAI-compatible server already running (its base URL, .../v1)")
    ap.add_argument("--served-model", default="smol", help="the model's name on --url's server")
    ap.add_argument("--api-key-env", help="the environment variable holding --url's API key")
    ap.add_argument("--server-cpus", type=lambda v: {int(c) for c in v.split(",")}, default=None,
                    help="pin the server to these CPUs (comma-separated) and everything else to the rest")
    args = ap.parse_args()
    if args.server_cpus:
        rest = set(os.sched_getaffinity(0)) - args.server_cpus
        if not rest:
            raise SystemExit("--server-cpus leaves no CPU for the daemon and the client")
        os.sched_setaffinity(0, rest)  # the daemon (started below) inherits it

    url, served, server = _start_server(args)
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    home = Path(tempfile.mkdtemp(prefix="as-bench-", dir="/tmp"))
    sock, cfg = home / "d.sock", home / "config.yaml"
    entry = {"backend": "remote", "url": url, "model": served, **({"api_key_env": args.api_key_env}
                                                                   if args.api_key_env else {})}
    cfg.write_text(json.dumps({"models": {ALIAS: entry}}))  # JSON is YAML
    env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "XDG_STATE_HOME": str(home / "state")}
    daemon = subprocess.Popen([sys.executable, "-m", "assistant", "--socket", str(sock), "--config", str(cfg),
                               "serve", "--quiet"], env=env, cwd=str(ROOT))

    async def run() -> int:
        import aiohttp

        _wait_http(url, server)
        for _ in range(600):
            try:
                client = await Client.connect(sock, client_name="bench")
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("daemon did not start")
        await client.call("models.load", {"model": ALIAS})
        session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"} if key else {})
        await direct_run(session, url, served, 8)  # warm-up both
        await daemon_run(client, 8)
        d_rows, x_rows = [], []
        for _ in range(args.rounds):
            x_rows.append(await direct_run(session, url, served, args.tokens))
            d_rows.append(await daemon_run(client, args.tokens))
        await session.close()
        await client.close()
        where = f", server on CPUs {sorted(args.server_cpus)}, the rest elsewhere" if args.server_cpus else ""
        report(f"server {url} ({served}){where}", x_rows, d_rows)
        return 0

    try:
        return asyncio.run(run())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        if server is not None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
