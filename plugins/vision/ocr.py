"""Text recognition with RapidOCR: PP-OCRv4 detection, angle and recognition models
(ONNX, inside the ``rapidocr-onnxruntime`` wheel), on onnxruntime.

The engine is loaded on first use and kept for the process (about 0.7 s and
60 MB to load), with onnxruntime's threads capped (``threads``): the daemon
shares the machine with the model it serves. ``read`` is blocking; the plugin
runs it in a worker thread, one at a time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_engines: dict[int, Any] = {}
_load_lock = threading.Lock()


def engine(threads: int) -> Any:
    """The process's RapidOCR engine for ``threads`` threads, loaded on first call."""
    with _load_lock:
        eng = _engines.get(threads)
        if eng is None:
            import cv2
            from rapidocr_onnxruntime import RapidOCR

            cv2.setNumThreads(threads)  # RapidOCR resizes and crops with OpenCV: its pool too

            # inter_op 1: the models' graphs are sequential; intra_op is the parallelism.
            eng = RapidOCR(intra_op_num_threads=threads, inter_op_num_threads=1)
            _engines[threads] = eng
        return eng


@dataclass
class Line:
    text: str
    box: list[list[float]]  # four corners, clockwise from top left, in the image's pixels
    score: float

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "box": self.box, "score": self.score}


def read(image: Any, *, threads: int = 2, min_score: float = 0.5) -> list[Line]:
    """The text lines RapidOCR finds in ``image`` (an RGB ``PIL.Image``), top to bottom.

    Lines scoring under ``min_score`` (RapidOCR's confidence, 0 to 1) are left out.
    """
    result, _elapsed = engine(threads)(image, text_score=min_score)
    lines = []
    for box, text, score in result or []:
        text = str(text).strip()
        if text:
            lines.append(Line(text, [[round(float(x), 1), round(float(y), 1)] for x, y in box], round(float(score), 4)))
    return lines


def join_lines(lines: list[Line]) -> str:
    """The page's text: boxes on the same row joined by a space, rows by newlines.

    RapidOCR often splits one printed line into several boxes (at wide gaps);
    boxes whose vertical centres lie within half a box height of the row's are
    one row, read left to right.
    """
    rows: list[list[Line]] = []
    for line in sorted(lines, key=lambda ln: (_centre_y(ln), ln.box[0][0])):
        if rows and abs(_centre_y(line) - _centre_y(rows[-1][0])) <= _height(rows[-1][0]) / 2:
            rows[-1].append(line)
        else:
            rows.append([line])
    return "\n".join(" ".join(ln.text for ln in sorted(row, key=lambda ln: ln.box[0][0])) for row in rows)


def _centre_y(line: Line) -> float:
    return sum(y for _, y in line.box) / 4


def _height(line: Line) -> float:
    ys = [y for _, y in line.box]
    return max(ys) - min(ys)
