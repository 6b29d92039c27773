"""A person's time to first token while an automation rewrites a long text.

    ./dev bench priorities.py [--samples 12] [--fifo-samples 2] [--threads 2]

One daemon (SmolLM2-135M, greedy). Measured from the client, send to first
delta, over the same short questions:

1. idle: nothing else running;
2. loaded: while a background chat (``priority: "background"``, as
   ``PluginContext.chat`` and filewatch send it; prompt lookup, as filewatch's
   in-place rewrite uses) rewrites a ~1,000-token text, over and over;
3. FIFO: the same rewrite sent as an interactive chat, which is what every
   automation was before priorities: the question waits behind it.

Then the background rewrite's own figures: its speed alone and while it
yields, how often and how long it yielded, and whether its text is the same
as an uninterrupted run's (greedy). Goal (issue 14): loaded median TTFT
within 1.5x of idle. The load average is printed: on a shared machine the
figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant.client import Client  # noqa: E402
from assistant.testing import DaemonProcess, isolated_env  # noqa: E402

QUESTIONS = ["Name a color.", "What is 2 + 2?", "Say hello.", "Name a fruit.", "What day comes after Monday?",
             "Name an animal.", "Give me a word that rhymes with cat.", "What is the capital of Italy?"]

PARAGRAPH = ("The quick brown fox jumps over the lazy dog near the river bank, where the old mill "
             "still turns slowly in the afternoon light. Villagers walk past with baskets of bread "
             "and vegetables, talking about the weather, the harvest and the market next week. ")


def long_text(target_words: int = 700) -> str:
    """A document of numbered paragraphs with a few misspellings to fix."""
    out, words, i = [], 0, 0
    while words < target_words:
        i += 1
        para = PARAGRAPH.replace("quick", "quikc" if i % 3 == 0 else "quick").replace("weather", "wether"
                                                                                        if i % 4 == 0 else "weather")
        out.append(f"{i}. {para}")
        words += len(para.split())
    return "\n\n".join(out)


def rewrite_messages(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You fix spelling mistakes. Reply with the whole text and nothing else."},
            {"role": "user", "content": f"Fix the spelling in this text:\n\n{text}"}]


async def ttft(client: Client, question: str, into: list[dict] | None = None) -> float:
    """Client-side milliseconds from sending a question to its first delta (the
    server's stats go to ``into``)."""
    t0 = time.perf_counter()
    stream = await client.chat(prompt=question, max_tokens=8, temperature=0.0)
    first = None
    async for _ in stream:
        if first is None:
            first = time.perf_counter()
    result = await stream.result()
    if into is not None:
        into.append(result["stats"])
    return ((first or time.perf_counter()) - t0) * 1000


async def questions(client: Client, n: int, rng: random.Random, pause: tuple[float, float],
                    stats: list[dict] | None = None) -> list[float]:
    out = []
    for i in range(n):
        await asyncio.sleep(rng.uniform(*pause))
        out.append(await ttft(client, QUESTIONS[i % len(QUESTIONS)], stats))
    return out


async def rewrite(client: Client, text: str, tokens: int, priority: str) -> dict:
    stream = await client.chat(messages=rewrite_messages(text), max_tokens=tokens, temperature=0.0, draft="ngram",
                               priority=priority)
    return await stream.result()


async def loaded(bg: Client, person: Client, text: str, tokens: int, n: int, rng: random.Random,
                 stats: list[dict]) -> tuple[list[float], list[dict]]:
    """Questions while rewrites run back to back; returns the TTFTs and the rewrites' results."""
    results: list[dict] = []
    stop = asyncio.Event()

    async def keep_rewriting():
        while not stop.is_set():
            results.append(await rewrite(bg, text, tokens, "background"))

    worker = asyncio.ensure_future(keep_rewriting())
    await asyncio.sleep(1.0)  # the rewrite is past its prefill and decoding
    try:
        times = await questions(person, n, rng, (0.3, 0.9), stats)
    finally:
        stop.set()
        await worker
    return times, results


async def fifo(bg: Client, person: Client, text: str, tokens: int, n: int, stats: list[dict]) -> list[float]:
    """The rewrite sent as interactive work: a question asked just after it waits for all of it."""
    times = []
    for i in range(n):
        job = asyncio.ensure_future(rewrite(bg, text, tokens, "interactive"))
        await asyncio.sleep(0.5)
        times.append(await ttft(person, QUESTIONS[i % len(QUESTIONS)], stats))
        await job
    return times


def row(name: str, values: list[float], base: float | None = None) -> str:
    if not values:
        return f"  {name:<46} {'-':>8}"
    med = statistics.median(values)
    p90 = sorted(values)[max(0, int(round(0.9 * len(values))) - 1)]
    ratio = f"{med / base:7.2f}x" if base else ""
    return f"  {name:<46} {med:8.1f} {p90:8.1f} {max(values):8.1f} {ratio}"


def breakdown(name: str, stats: list[dict]) -> str:
    """Where the time went on the daemon: waiting for the model, prefill, first token."""
    if not stats:
        return f"  {name:<46} {'-':>8}"
    med = {k: statistics.median(s[k] or 0 for s in stats) for k in ("queue_ms", "prefill_ms", "ttft_ms")}
    cached = statistics.median(s["cached_prompt_tokens"] for s in stats)
    prompt = statistics.median(s["prompt_tokens"] for s in stats)
    return (f"  {name:<46} {med['queue_ms']:8.1f} {med['prefill_ms']:8.1f} {med['ttft_ms']:8.1f}"
            f"  {cached:.0f} of {prompt:.0f} prompt tokens")


async def run(args: argparse.Namespace, d: DaemonProcess) -> None:
    rng = random.Random(7)
    text = long_text()
    async with await d.client("automation") as bg, await d.client("person") as person:
        alone = await rewrite(bg, text, args.tokens, "background")  # also pays the one-off verify calibration
        alone = await rewrite(bg, text, args.tokens, "background")
        for q in QUESTIONS[:3]:
            await ttft(person, q)
        server: dict[str, list[dict]] = {"idle": [], "busy": [], "fifo": []}
        idle = await questions(person, args.samples, rng, (0.05, 0.2), server["idle"])
        busy, rewrites = await loaded(bg, person, text, args.tokens, args.samples, rng, server["busy"])
        queued = await fifo(bg, person, text, args.tokens, args.fifo_samples, server["fifo"]) \
            if args.fifo_samples else []
    base = statistics.median(idle)
    s = alone["stats"]
    print(f"\nprompt of the rewrite: {s['prompt_tokens']} tokens; output {s['completion_tokens']} tokens; "
          f"{args.samples} questions per row (max_tokens 8)")
    print(f"\n  {'time to first token, client-side (ms)':<46} {'median':>8} {'p90':>8} {'max':>8}  vs idle")
    print(row("idle daemon", idle))
    print(row("during a background rewrite (priority)", busy, base))
    print(row("during the rewrite sent as interactive (FIFO)", queued, base))
    print(f"\n  {'the same, server-side medians (ms)':<46} {'queue':>8} {'prefill':>8} {'ttft':>8}  cached")
    for name, key in (("idle daemon", "idle"), ("during a background rewrite", "busy"), ("FIFO", "fifo")):
        print(breakdown(name, server[key]))
    ratio = statistics.median(busy) / base
    print(f"\n  goal: loaded median within 1.5x of idle -> {ratio:.2f}x: {'met' if ratio <= 1.5 else 'NOT met'}")
    yielded = [r for r in rewrites if r["stats"].get("yielded")]
    tps = [r["stats"]["tokens_per_second"] for r in yielded if r["stats"]["tokens_per_second"]]
    same = all(r["text"] == alone["text"] for r in rewrites if r["finish_reason"] == alone["finish_reason"])
    print(f"\n  background rewrite alone: {s['tokens_per_second']} tokens/s, {s['total_ms'] / 1000:.1f} s")
    if yielded:
        times = sum(r["stats"]["yielded"] for r in yielded)
        ms = sum(r["stats"]["yielded_ms"] for r in yielded)
        speed = f"{statistics.median(tps):.1f}" if tps else "-"
        print(f"  while yielding: {speed} tokens/s (median of {len(yielded)} "
              f"rewrites), yielded {times} times for {ms / 1000:.1f} s in all (the questions and the cache rebuilds)")
    print(f"  rewrites done while measuring: {len(rewrites)}; text identical to the uninterrupted run: "
          f"{'yes' if same else 'no'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--fifo-samples", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=600, help="most tokens of one rewrite")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-prio-"))
    os.environ.update(isolated_env(home))
    d = DaemonProcess(home, config_text=f"threads: {args.threads}\ncontext: 4096\npreload: true\n").start()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    try:
        asyncio.run(run(args, d))
    finally:
        d.stop()
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
