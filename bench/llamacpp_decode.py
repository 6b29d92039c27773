"""Single-token greedy decode rate: our forward() loop vs llama-cpp-python's own.

    python bench/llamacpp_decode.py [--model smollm2-135m] [--tokens 200] [--threads N] [--repeat 3]

Both sides use the same prompt, context size and threads, and the end-of-
generation tokens are suppressed on both so that each produces exactly
``--tokens`` tokens. Reported: decode tokens/s (first generated token to
last, prompt processing excluded) and time to first token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from assistant.machine import hardware  # noqa: E402
from assistant.config.models import resolve_model  # noqa: E402
from backends.base import LoadOptions  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def ours(path: str, n_tokens: int, threads: int, n_ctx: int, fa: bool) -> tuple[float, float, list[int]]:
    b = LlamaCppBackend()
    b.load(path, LoadOptions(n_ctx=n_ctx, n_threads=threads, extra={"flash_attn": fa}))
    eog = np.array(sorted(b.info.eos_token_ids), dtype=np.int64)
    prompt = b.tokenize(b.apply_chat_template([{"role": "user", "content": PROMPT}]))
    t0 = time.perf_counter()
    logits = b.forward(prompt)[-1]
    logits[eog] = -np.inf
    tok = int(np.argmax(logits))
    t1 = time.perf_counter()
    out = [tok]
    forward = b.forward
    for _ in range(n_tokens - 1):
        row = forward((tok,))[0]
        row[eog] = -np.inf
        tok = int(row.argmax())
        out.append(tok)
    t2 = time.perf_counter()
    b.unload()
    return (n_tokens - 1) / (t2 - t1), (t1 - t0) * 1000, out


def theirs(path: str, n_tokens: int, threads: int, n_ctx: int, fa: bool) -> tuple[float, float, list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=512, flash_attn=fa, verbose=False)
    b = LlamaCppBackend()  # only for the same prompt tokens
    b.load(path, LoadOptions(n_ctx=256, n_threads=1))
    prompt = b.tokenize(b.apply_chat_template([{"role": "user", "content": PROMPT}]))
    eog = b.info.eos_token_ids
    b.unload()
    t0 = time.perf_counter()
    t1 = None
    count = 0
    toks: list[int] = []
    for chunk in llm.create_completion(
        prompt, max_tokens=n_tokens, temperature=0, stream=True, logit_bias={t: -1e9 for t in eog}
    ):
        count += 1
        if t1 is None:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    toks = list(llm._input_ids[len(prompt):])  # what it generated
    del llm
    return (count - 1) / (t2 - t1), (t1 - t0) * 1000, toks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-flash-attn", dest="fa", action="store_false", help="both sides without flash attention")
    args = ap.parse_args()
    path = str(resolve_model(args.model).path)
    threads = args.threads or hardware.pick_threads(hardware.probe())[0]
    print(f"model {args.model} ({path}), {threads} threads, n_ctx {args.ctx}, {args.tokens} tokens, flash attention {args.fa}")
    results: dict[str, list[tuple[float, float]]] = {"ours (forward loop)": [], "llama-cpp-python create_completion": []}
    same = None
    for _ in range(args.repeat):
        r1 = ours(path, args.tokens, threads, args.ctx, args.fa)
        r2 = theirs(path, args.tokens, threads, args.ctx, args.fa)
        results["ours (forward loop)"].append(r1[:2])
        results["llama-cpp-python create_completion"].append(r2[:2])
        same = r1[2][: len(r2[2])] == r2[2][: len(r1[2])]
    for name, rs in results.items():
        rates = [r for r, _ in rs]
        ttft = [t for _, t in rs]
        print(f"{name:38s} {statistics.median(rates):7.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in rates)})"
              f"  first token {statistics.median(ttft):.0f} ms")
    print(f"same greedy tokens: {same}")


if __name__ == "__main__":
    main()
