"""OCR latency per page-sized image: the vision plugin's ``vision.ocr`` work, on 2 cores.

    ./dev bench ocr_latency.py [--dpi 300] [--lines 40] [--repeat 5] [--threads 2]

A page the size of A4 at ``--dpi`` (2480 x 3507 pixels at 300 dpi, a usual scan;
RapidOCR scales it to at most 2000 pixels a side), ``--lines`` lines of 12-point
text rendered by Pillow, goes through what the skill does: open and check
the file, decode it, RapidOCR (PP-OCRv4 detection, angle and recognition on
onnxruntime, ``--threads`` threads), rows joined. The process is pinned to as many
cores as threads. Prints the engine's load time (first call), the median, min and
max latency per page over ``--repeat`` runs after one untimed warm-up, and the share
of the page's words found.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from plugins.vision import images, ocr  # noqa: E402

A4_INCHES = (8.27, 11.69)
WORDS = ("invoice total amount due payment account number reference date customer order delivery address "
         "street city postal code quantity price description item service hours rate tax subtotal balance "
         "thank you for your business please pay within thirty days").split()


def page(path: Path, dpi: int, lines: int) -> tuple[Path, str]:
    """An A4 page at ``dpi`` with ``lines`` lines of text (a typical letter's size of print)."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = int(A4_INCHES[0] * dpi), int(A4_INCHES[1] * dpi)
    size = max(10, int(dpi * 12 / 72 * 0.9))  # about 12 pt type
    font = ImageFont.load_default(size=size)
    im = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(im)
    margin, step = dpi, (height - 2 * dpi) // max(lines, 1)
    text_lines = []
    for i in range(lines):
        words = [WORDS[(i * 7 + j) % len(WORDS)] for j in range(9)] + [str(1000 + i * 37)]
        line = " ".join(words).capitalize()
        while draw.textlength(line, font=font) > width - 2 * margin:
            line = line.rsplit(" ", 1)[0]
        draw.text((margin, margin + i * step), line, fill="black", font=font)
        text_lines.append(line)
    im.save(path)
    return path, "\n".join(text_lines)


def word_share(expected: str, got: str) -> float:
    want = re.findall(r"[a-z0-9]+", expected.lower())
    have = set(re.findall(r"[a-z0-9]+", got.lower()))
    return sum(w in have for w in want) / len(want)


def read_page(path: Path, threads: int) -> str:
    """What ``vision.ocr`` does with a file, minus the daemon."""
    image, _facts = images.open_image(str(path))
    return ocr.join_lines(ocr.read(image, threads=threads))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dpi", type=int, default=300)
    ap.add_argument("--lines", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))[: args.threads]
    os.sched_setaffinity(0, cores)
    with tempfile.TemporaryDirectory() as tmp:
        path, text = page(Path(tmp) / "page.png", args.dpi, args.lines)
        started = time.perf_counter()
        ocr.engine(args.threads)
        load_s = time.perf_counter() - started
        read_page(path, args.threads)  # warm-up: onnxruntime's first run allocates
        times, got = [], ""
        for _ in range(args.repeat):
            started = time.perf_counter()
            got = read_page(path, args.threads)
            times.append(time.perf_counter() - started)
    w, h = int(A4_INCHES[0] * args.dpi), int(A4_INCHES[1] * args.dpi)
    print(f"page: A4 at {args.dpi} dpi ({w} x {h}), {args.lines} lines; cores {cores}, onnxruntime threads "
          f"{args.threads}")
    print(f"engine load {load_s:.2f} s; per page: median {statistics.median(times):.2f} s, min {min(times):.2f} s, "
          f"max {max(times):.2f} s; words found {word_share(text, got):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
