"""Time to first token with one image on the MLX backend (Gemma 4's vision tower through mlx-vlm).

    python bench/mlx_media.py [--model DIR] [--image PATH] [--repeat 5]

Without ``--model`` it writes the tiny random Gemma 4 folder with vision and
audio towers that the tests use (tests/mlx_gemma4_media_files.py); without
``--image`` it draws a 640x480 page of text with Pillow. Per run, from an
empty cache: the image decoded and preprocessed (``tokenize_media``), encoded
by the tower (``span.encode_ms``), its soft tokens and the text prefilled,
the first token's logits: TTFT and the encode share of it. Then the next turn
with the same image in the history (the cached prefix reused: no decode, no
encode, only the new text), and a text-only prompt of the same text for
scale. The first run (MLX compiles its CPU kernels on first use) is not
counted. Prints the medians.
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

from backends.base import LoadOptions  # noqa: E402
from backends.media import MediaInput, MediaPrompt  # noqa: E402
from backends.mlx_backend import MLXBackend  # noqa: E402

TURN1 = "<|turn>user\nWhat does this page say?\n<__media__>\n<turn|>\n<|turn>model\n"
TURN2 = "It is a page of text.<turn|>\n<|turn>user\nAnd the last line?<turn|>\n<|turn>model\n"


def _page(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(img)
    for i in range(20):
        draw.text((20, 20 + 22 * i), f"Line {i + 1}: the quick brown fox jumps over the lazy dog.", fill="black")
    img.save(path)
    return path


def _prefill(b: MLXBackend, prompt: MediaPrompt) -> dict[str, float]:
    """Prefill what the cache lacks of ``prompt`` (as the generation loop
    does) and compute the first token's logits; the times in ms."""
    cached = b.cached_tokens
    common = 0
    while common < min(len(cached), len(prompt.tokens)) and cached[common] == prompt.tokens[common]:
        common += 1
    pos = prompt.safe_prefix(min(common, len(prompt.tokens) - 1))
    b.truncate(pos)
    t = {"encode": 0.0, "media": 0.0, "text": 0.0}
    for span in [s for s in prompt.spans if s.start >= pos] + [None]:
        stop = span.start if span is not None else len(prompt.tokens)
        if stop > pos:
            t0 = time.perf_counter()
            b.forward(prompt.tokens[pos:stop])
            t["text"] += (time.perf_counter() - t0) * 1000
        if span is not None:
            t0 = time.perf_counter()
            b.forward_media(span)
            t["media"] += (time.perf_counter() - t0) * 1000
            t["encode"] += span.encode_ms or 0.0
            pos = span.end
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an MLX Gemma 4 folder with a vision tower (default: the tiny random one)")
    ap.add_argument("--image", help="an image file (default: a drawn 640x480 page)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from mlx_gemma4_media_files import write_media_target

            model = str(write_media_target(Path(tmp) / "gemma-4-tiny-av"))
        image = Path(args.image) if args.image else _page(Path(tmp) / "page.png")
        medium = MediaInput("image", str(image), hashlib.sha256(image.read_bytes()).hexdigest(), "image/png")
        b = MLXBackend()
        b.load(model, LoadOptions(n_ctx=4096))
        print(f"model: {b.info.name}; {b.info.choices['media']}")
        rows: dict[str, list[float]] = {k: [] for k in ("ttft", "prepare", "encode", "share", "turn2", "text")}
        for run in range(args.repeat + 1):
            b.truncate(0)
            b._embeds.clear()  # a cold image every run: decoded and encoded again
            t0 = time.perf_counter()
            prompt = b.tokenize_media(TURN1, [medium])
            prepare = (time.perf_counter() - t0) * 1000
            t = _prefill(b, prompt)
            ttft = (time.perf_counter() - t0) * 1000
            t1 = time.perf_counter()
            _prefill(b, b.tokenize_media(TURN1 + TURN2, [medium]))
            turn2 = (time.perf_counter() - t1) * 1000
            b.truncate(0)
            t2 = time.perf_counter()
            b.forward(b.tokenize(TURN1.replace("<__media__>", "") + TURN2))
            text = (time.perf_counter() - t2) * 1000
            if run == 0:
                print(f"soft tokens: {prompt.spans[0].length}; prompt tokens: {len(prompt.tokens)} "
                      "(warm-up run not counted)")
                continue
            for k, v in (("ttft", ttft), ("prepare", prepare), ("encode", t["encode"]),
                         ("share", t["encode"] / ttft), ("turn2", turn2), ("text", text)):
                rows[k].append(v)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(f"TTFT with one image (cold): {med['ttft']:.1f} ms  "
              f"[decode+preprocess {med['prepare']:.1f} ms, tower encode {med['encode']:.1f} ms = "
              f"{100 * med['share']:.0f}% of TTFT]")
        print(f"next turn, same image cached: {med['turn2']:.1f} ms ({med['ttft'] / med['turn2']:.1f}x faster)")
        print(f"text-only prompt of the same text: {med['text']:.1f} ms")
        b.unload()


if __name__ == "__main__":
    main()
