"""Cutting a backend's KV cache back (after rejected drafts, after calibration)."""

from __future__ import annotations

from typing import Sequence

from backends.base import Backend


def rollback(backend: Backend, n: int, tokens: Sequence[int]) -> None:
    """Cut the cache back to ``n`` tokens; where the backend could not cut
    there (and cleared more), evaluate ``tokens[len(cache):n]`` again."""
    backend.truncate(n)
    have = len(backend.cached_tokens)
    if have < n:
        backend.forward(list(tokens[have:n]))
