"""Streaming through the daemon vs calling llama-cpp-python directly.

Same model, same prompt tokens, greedy, same threads and context, in one run.
Prints throughput and time to first token for both and their ratios, then the
second-turn time to first token of a session with a ~1,500-token history
against the first turn's (the KV-cache prefix reuse).

    ./dev bench daemon_vs_direct.py [--rounds 5] [--tokens 200] [--threads 2]

Goals on a 2-core machine (issue 2): daemon throughput >= 0.97 of direct,
TTFT overhead < 20 ms, second-turn TTFT < 1/3 of the first turn's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant.client import Client  # noqa: E402
from assistant.config.models import resolve_model  # noqa: E402

PROMPT = "Write a long, detailed story about a dragon who learns to bake bread."


def direct_run(llm, tokens: list[int], n: int) -> tuple[float, float, int, str]:
    """(ttft_ms, tokens/s after the first, tokens, text) for llama-cpp-python's own streaming."""
    t0 = time.perf_counter()
    first = None
    count = 0
    text = []
    for chunk in llm.create_completion(tokens, max_tokens=n, temperature=0.0, top_k=1, stream=True):
        now = time.perf_counter()
        if first is None:
            first = now
        count += 1
        text.append(chunk["choices"][0]["text"])
    end = time.perf_counter()
    return (first - t0) * 1000, (count - 1) / (end - first), count, "".join(text)


async def daemon_run(client: Client, messages, n: int) -> tuple[float, float, int, str]:
    t0 = time.perf_counter()
    first = None
    # Plain decoding on both sides: this measures the daemon, not speculative decoding.
    stream = await client.chat(messages=messages, max_tokens=n, temperature=0.0, draft="off")
    count = 0
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
        count += 1
    end = time.perf_counter()
    result = await stream.result()
    s = result["stats"]
    # Client-side figures: what a user of the socket sees.
    return (first - t0) * 1000, (s["completion_tokens"] - 1) / (end - first), s["completion_tokens"], result["text"]


async def second_turn(client: Client, history_words: int) -> tuple[float, float, int, int]:
    """TTFT of turn 1 (long history, cold) and turn 2 (same session), client-measured."""
    filler = " ".join(f"item{i % 97}" for i in range(history_words))
    sid = f"bench-{time.time_ns()}"

    async def turn(prompt):
        t0 = time.perf_counter()
        stream = await client.chat(prompt=prompt, session=sid, max_tokens=16, temperature=0.0, draft="off")
        first = None
        async for _ in stream:
            if first is None:
                first = time.perf_counter()
        r = await stream.result()
        return (first - t0) * 1000, r["stats"]

    t1, s1 = await turn(f"Here are my notes: {filler}\nSay OK.")
    t2, s2 = await turn("Thanks. Now say bye.")
    return t1, t2, s1["prompt_tokens"], s2["cached_prompt_tokens"]


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
    sock = home / "d.sock"
    cfg = home / "config.yaml"
    # Drafting off in the daemon's config too: with a drafter the daemon loads
    # models with a Q8_0 K cache (see backends/llamacpp.py), and this compares
    # the daemon with llama-cpp-python on the same arithmetic (F16 KV cache).
    cfg.write_text(f"model: {args.model}\nthreads: {args.threads}\ncontext: {args.context}\n"
                   "speculative:\n  drafter: 'off'\n")
    env = {**os.environ, "XDG_DATA_HOME": str(home / "data"), "XDG_STATE_HOME": str(home / "state")}
    daemon = subprocess.Popen([sys.executable, "-m", "assistant", "--socket", str(sock), "--config", str(cfg),
                               "serve", "--quiet"], env=env, cwd=str(ROOT))
    # flash_attn=True: llama.cpp's own default ("auto", on for the CPU), which the
    # daemon keeps; llama-cpp-python's Llama turns it off unless asked.
    llm = Llama(model_path=str(spec.path), n_ctx=args.context, n_threads=args.threads,
                n_threads_batch=args.threads, flash_attn=True, verbose=False)
    messages = [{"role": "user", "content": PROMPT}]

    async def run() -> int:
        for _ in range(600):
            try:
                client = await Client.connect(sock, client_name="bench")
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("daemon did not start")
        await client.call("models.load", {"model": args.model})
        # The exact prompt tokens the daemon uses, so both sides decode the same thing.
        tokens = _daemon_tokens(spec.path, messages)
        d_rows, x_rows = [], []
        # warm-up both
        direct_run(llm, tokens, 8)
        await daemon_run(client, messages, 8)
        for r in range(args.rounds):
            x_rows.append(direct_run(llm, tokens, args.tokens))
            llm.reset()
            d_rows.append(await daemon_run(client, messages, args.tokens))
            await client.call("models.load", {"model": args.model, "context": args.context + 1})  # drop the cache
            await client.call("models.load", {"model": args.model, "context": args.context})
        same = all(d[3] == x_rows[0][3] for d in d_rows) and all(x[3] == x_rows[0][3] for x in x_rows)
        med = lambda rows, i: statistics.median(row[i] for row in rows)  # noqa: E731
        x_ttft, x_tps, d_ttft, d_tps = med(x_rows, 0), med(x_rows, 1), med(d_rows, 0), med(d_rows, 1)
        print(f"model {args.model} ({spec.path.name}), {args.threads} threads, context {args.context}, "
              f"{len(tokens)} prompt tokens, {x_rows[0][2]} generated tokens, {args.rounds} rounds, medians")
        print(f"{'':<26}{'tokens/s':>10}{'TTFT ms':>10}")
        print(f"{'llama-cpp-python direct':<26}{x_tps:>10.1f}{x_ttft:>10.1f}")
        print(f"{'daemon over the socket':<26}{d_tps:>10.1f}{d_ttft:>10.1f}")
        print(f"throughput ratio daemon/direct: {d_tps / x_tps:.3f}  (goal >= 0.97)")
        print(f"TTFT overhead: {d_ttft - x_ttft:+.1f} ms  (goal < 20 ms)")
        print(f"identical text both ways: {same}")
        t1, t2, p1, cached = await second_turn(client, 1200)
        print(f"second turn on a {p1}-token history: TTFT {t2:.1f} ms vs first turn {t1:.1f} ms "
              f"(ratio {t2 / t1:.3f}, goal < 0.333); {cached} prompt tokens reused")
        await client.close()
        return 0

    try:
        return asyncio.run(run())
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def _daemon_tokens(path, messages) -> list[int]:
    """The prompt tokens exactly as the daemon makes them (same backend code)."""
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend()
    backend.load(str(path), LoadOptions(n_ctx=512, n_threads=1))
    try:
        return backend.tokenize(backend.apply_chat_template(messages), special=True)
    finally:
        backend.unload()


if __name__ == "__main__":
    sys.exit(main())
