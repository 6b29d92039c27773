"""Calibration: the largest verify batch whose logits equal one-token steps
bit for bit (:func:`calibrate`), measured once per model file and machine
and kept on disk (:class:`CalibrationStore`, at a path the caller chooses).

Why: llama.cpp computes a batch row exactly as a one-token step only up to
a batch size that depends on the model's tensor types and the CPU (see the
figures in tests/test_speculative.py); the engine never verifies more tokens
at once than calibration found exact, so greedy output is plain decoding's.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from backends.base import Backend

from assistant.inference.speculative.cache import rollback
from assistant.inference.speculative.costs import CostModel
from assistant.inference.speculative.drafter import MAX_DRAFT_LIMIT

# Calibration probes at least this far into the context: llama.cpp's CPU flash
# attention changes how it computes a one-token step once the KV cache holds
# 512 cells (more than 256 tokens), so a probe at the start of a short prompt
# would say "exact" where long contexts are not. Just past that point: the
# padding is most of calibration's cost (SmolLM2-135M, 2 cores, a 231-token
# prompt: 1.0 s at 320, 2.5 s at 600; both find the same limits).
CALIBRATION_CONTEXT = 320

# The KV cache a llama.cpp model loads with when a drafter is on: with an F16 K
# cache a one-token step is computed differently from a batch (never exact past
# 256 tokens of context); with Q8_0 K, SmolLM2-135M Q4_1 is exact for batches of
# 2..48 (from 64 another matrix kernel runs), which calibration measures.
DRAFTING_KV_TYPE = "q8_0/f16"

# The file name the daemon gives the store, in the user cache dir.
CALIBRATION_FILE = "speculative-calibration.json"

# The distribution whose version identifies a backend's arithmetic.
BACKEND_DISTS = {"llama.cpp": "llama-cpp-python", "mlx": "mlx"}


class CalibrationStore:
    """Calibration results in one JSON file (``path``), keyed by what decides
    them: the model file (path, size, mtime), the backend and its library
    version, the load choices (KV cache type, flash attention, threads,
    context) and the machine (``machine_key``: :meth:`in_cache` joins the
    platform tag and CPU model with a NUL, which keeps the entries of earlier
    versions valid). The first request that drafts on a model then skips the
    ~2 s measurement on every later start.

    A missing or corrupt file is measured over and rewritten; a read-only
    location costs a calibration per start, nothing else."""

    def __init__(self, path: Path, machine_key: str):
        self.path = Path(path)
        self.machine_key = machine_key

    @classmethod
    def in_cache(cls, cache_dir: Path, *, platform_tag: str, cpu_model: str | None) -> "CalibrationStore":
        """The store the daemon and ``assistant bench spec`` share: ``CALIBRATION_FILE``
        in ``cache_dir``, keyed by the machine as earlier versions keyed it."""
        return cls(Path(cache_dir) / CALIBRATION_FILE, f"{platform_tag}\0{cpu_model}")

    def key(self, backend: Backend) -> str | None:
        """The entry's key for this loaded model, or None for a backend that
        cannot be identified (tests' fakes, plugins): those measure every time."""
        try:
            info = backend.info
            path = Path(info.path)
            st = path.stat()
            version = importlib.metadata.version(BACKEND_DISTS[info.backend])
        except (AttributeError, KeyError, OSError, TypeError, ValueError, importlib.metadata.PackageNotFoundError):
            return None
        parts = [info.backend, version, str(path.resolve()), str(st.st_size), str(st.st_mtime_ns),
                 str(info.context_length), str(info.n_threads), str(info.choices.get("kv_cache")),
                 str(info.choices.get("flash_attn")), self.machine_key]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]

    def load(self, backend: Backend, costs: CostModel, max_batch: int) -> bool:
        """Fill ``costs`` from the stored entry if it answers a calibration up
        to ``max_batch`` (the limit was found, or as far was tried)."""
        key = self.key(backend)
        if key is None:
            return False
        try:
            entry = json.loads(self.path.read_text()).get(key)
            exact, upto = int(entry["exact_batch"]), int(entry["calibrated_to"])
            ratios = {int(n): float(r) for n, r in entry["ratios"].items()}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return False
        if exact < upto or upto >= max_batch:
            costs.exact_batch, costs.calibrated_to = exact, upto
            costs.set_ratios(ratios)
            if costs.step is None and entry.get("step"):
                costs.step = float(entry["step"])  # a starting value; plain steps refresh it
            return True
        return False

    def save(self, backend: Backend, costs: CostModel) -> None:
        """Store what ``costs`` says about this model (atomically: two daemons never leave half a file)."""
        key = self.key(backend)
        if key is None or costs.exact_batch is None:
            return
        path = self.path
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = {"model": str(backend.info.path), "exact_batch": costs.exact_batch,
                     "calibrated_to": costs.calibrated_to,
                     "ratios": {str(n): round(r, 4) for n, (r, _) in costs.ratios.items()}, "step": costs.step,
                     "saved": time.time()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass


def calibrate(backend: Backend, probe: Sequence[int], max_batch: int, *, costs: CostModel | None = None,
              store: CalibrationStore | None = None) -> CostModel:
    """Measure the largest verify batch (up to ``max_batch``) whose logits equal
    one-token steps bit for bit, and seed ``costs`` (a new CostModel if None)
    with the timings; returns it. The cache is left as it was.

    The test runs after the current cache, padded with ``probe`` tokens to at
    least ``CALIBRATION_CONTEXT`` tokens where the window allows (the text does
    not matter; the request's own tokens are realistic). Sizes tried: 2, 4,
    8, ... up to ``max_batch``, then a binary search between the last exact
    and the first inexact size. Costs about ``max_batch`` one-token steps, as
    many batched tokens again and the padding (about a second for
    SmolLM2-135M on 2 cores), once per model file and machine where a
    ``store`` keeps the result (None: measure, keep nothing)."""
    cm = CostModel() if costs is None else costs
    n0 = len(backend.cached_tokens)
    max_batch = min(max_batch, MAX_DRAFT_LIMIT + 1, backend.info.context_length - n0)
    if cm.exact_batch is not None and (cm.exact_batch < cm.calibrated_to or cm.calibrated_to >= max_batch):
        return cm
    if max_batch < 2 or not probe:
        return cm
    if cm.exact_batch is None and store is not None and store.load(backend, cm, max_batch):
        return cm
    good, bad = _measure(backend, cm, [int(t) for t in probe], max_batch)
    cm.exact_batch = good
    cm.calibrated_to = max_batch if bad is None else bad
    if store is not None:
        store.save(backend, cm)
    return cm


def _measure(backend: Backend, cm: CostModel, probe: list[int], max_batch: int) -> tuple[int, int | None]:
    """(largest exact batch size, smallest inexact one or None); the cache is
    rolled back to what it was."""
    n0 = len(backend.cached_tokens)
    base = list(backend.cached_tokens)
    at = max(n0, min(CALIBRATION_CONTEXT, backend.info.context_length - max_batch))
    fill = [probe[i % len(probe)] for i in range(at - n0)]
    here = base + fill
    toks = [probe[(i * 7 + 3) % len(probe)] for i in range(max_batch)]
    try:
        if fill:
            backend.forward(fill)
        ref, times = [], []
        for t in toks:
            t0 = time.perf_counter()
            ref.append(backend.forward((t,))[0])
            times.append(time.perf_counter() - t0)
        ref = np.stack(ref)
        cm.step = float(np.median(times))  # the median: robust to a busy moment

        def exact(n: int) -> bool:
            rollback(backend, at, here)
            t0 = time.perf_counter()
            rows = backend.forward(toks[:n], logits_at=list(range(n)))
            cm.observe_verify(n, time.perf_counter() - t0)
            return bool(np.array_equal(rows, ref[:n]))

        return _search(exact, max_batch)
    finally:
        rollback(backend, n0, base)


def _search(exact, max_batch: int) -> tuple[int, int | None]:
    """Sizes 2, 4, 8, ... up to ``max_batch`` until one is inexact, then a
    binary search between the last exact and the first inexact size."""
    good, bad = 1, None
    n = 2
    while True:
        if exact(n):
            good = n
        else:
            bad = n
            break
        if n >= max_batch:
            break
        n = min(2 * n, max_batch)
    if bad is not None:
        while bad - good > 1:
            mid = (good + bad) // 2
            if exact(mid):
                good = mid
            else:
                bad = mid
    return good, bad
