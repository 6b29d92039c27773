"""Time to first token with one image read natively (llama.cpp + libmtmd), the
encode share of it, and a session's second turn about the same image.

    python bench/media_ttft.py [--size 48x48] [--rounds 5] [--embd 64 --layers 4] [--threads 2]

No real vision model is reachable here: the script writes the tests' tiny random
Gemma 4 target and its gemma4uv + gemma4ua projector (tests/gemma4_media_files.py;
``--embd``/``--layers`` make a wider target, with a projector into it) and a PNG
of ``--size``, then per round, on a fresh cache:

- ``first``: a user turn with the image: tokenize_media (Pillow decode, mtmd
  preprocessing), prefill (the text, the image encoded and decoded into the KV
  cache), the first token; ``encode`` is the image's share (``media_encode_ms``:
  encoding plus its decode into the cache);
- ``second``: the next turn of the same session about the same image (the
  reply and a new question appended): the image comes from the KV cache, so
  nothing is encoded; ``tokenize`` is what re-tokenizing the history costs (the
  tokenized image is kept by sha256).

Greedy, 8 tokens per reply. Prints figures only (milliseconds; medians last).
Random weights: timings of the real code path, nothing about quality.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from gemma4_files import Gemma4Shape  # noqa: E402
from gemma4_media_files import ProjectorShape, png_bytes, write_media_pair  # noqa: E402

from assistant.inference.generation import generate  # noqa: E402
from assistant.inference.sampling import SamplingParams  # noqa: E402
from backends.base import LoadOptions  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402
from backends.media import MediaInput  # noqa: E402

GREEDY = SamplingParams(temperature=0)


def _shape(embd: int, layers: int) -> Gemma4Shape:
    pattern = tuple(i % 2 == 0 for i in range(layers))
    return Gemma4Shape(n_embd=embd, n_layer=layers, n_ff=2 * embd, swa_pattern=pattern,
                       n_head=max(2, embd // 64), head_dim=64, head_dim_swa=32)


def _turns(b: LlamaCppBackend, *texts: str) -> str:
    roles = ("user", "assistant")
    return b.apply_chat_template([{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="48x48", help="the image, WIDTHxHEIGHT (default 48x48)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    width, height = (int(x) for x in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="media-ttft-") as tmp:
        d = Path(tmp)
        shape = _shape(args.embd, args.layers)
        model, _ = write_media_pair(d, target_shape=shape, projector_shape=ProjectorShape(n_embd=args.embd))
        image = d / "image.png"
        image.write_bytes(png_bytes(width, height, seed=1))
        medium = MediaInput("image", str(image), hashlib.sha256(image.read_bytes()).hexdigest(), "image/png")
        b = LlamaCppBackend()
        b.load(str(model), LoadOptions(n_ctx=4096, n_threads=args.threads))
        mk = b.media_marker()
        print(f"model: gemma4 n_embd={args.embd} layers={args.layers}, threads={args.threads}, "
              f"image {width}x{height}")
        print(f"{'round':>5} {'tok1':>7} {'ttft1':>8} {'encode1':>8} {'share':>6} {'img pos':>7} "
              f"{'tok2':>7} {'ttft2':>8} {'encode2':>8} {'reused2':>8}")
        rows = []
        for r in range(args.rounds):
            b.truncate(0)
            b._media.cache.clear()  # each round decodes and preprocesses the image afresh
            t0 = time.perf_counter()
            first = b.tokenize_media(_turns(b, f"what is in {mk} this picture"), [medium])
            t1 = time.perf_counter()
            r1 = generate(b, first, GREEDY, max_tokens=8, started=t0)
            t2 = time.perf_counter()
            second = b.tokenize_media(_turns(b, f"what is in {mk} this picture", r1.text or "a picture",
                                             "and what colour is it"), [medium])
            t3 = time.perf_counter()
            r2 = generate(b, second, GREEDY, max_tokens=8, started=t2)
            row = {"tok1": (t1 - t0) * 1000, "ttft1": r1.stats.ttft_ms, "enc1": r1.stats.media_encode_ms,
                   "tok2": (t3 - t2) * 1000, "ttft2": r2.stats.ttft_ms, "enc2": r2.stats.media_encode_ms or 0.0,
                   "pos": r1.stats.media_tokens, "reused2": r2.stats.cached_prompt_tokens}
            row["share"] = row["enc1"] / row["ttft1"] if row["ttft1"] else 0.0
            rows.append(row)
            print(f"{r + 1:>5} {row['tok1']:>7.1f} {row['ttft1']:>8.1f} {row['enc1']:>8.1f} {row['share']:>6.0%} "
                  f"{row['pos']:>7} {row['tok2']:>7.1f} {row['ttft2']:>8.1f} {row['enc2']:>8.1f} "
                  f"{row['reused2']:>8}")
        med = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
        print(f"{'med':>5} {med['tok1']:>7.1f} {med['ttft1']:>8.1f} {med['enc1']:>8.1f} {med['share']:>6.0%} "
              f"{med['pos']:>7.0f} {med['tok2']:>7.1f} {med['ttft2']:>8.1f} {med['enc2']:>8.1f} "
              f"{med['reused2']:>8.0f}")
        print(f"second turn / first turn TTFT: {med['ttft2'] / med['ttft1']:.2f}")
        b.unload()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
