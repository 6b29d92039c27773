"""What every backend's ``forward`` checks the same way: that the tokens fit
the context window, and which rows the caller wants logits for."""

from __future__ import annotations

from typing import Sequence

from .base import ContextOverflowError


def overflow_error(n0: int, n: int, n_ctx: int) -> ContextOverflowError:
    """The error for ``n`` new tokens that do not fit after ``n0`` cached ones.

    Built only once the (inline, cheap) check has failed, so the hot path
    pays nothing for it."""
    return ContextOverflowError(
        f"{n0 + n} tokens do not fit the {n_ctx}-token context window ({n0} cached + {n} new)",
        needed=n0 + n,
        available=n_ctx,
    )


def logit_rows(n: int, logits_at: Sequence[int] | None) -> list[int]:
    """``logits_at`` as row indices into the ``n`` tokens given (negative ones
    count from the end; None means the last row); IndexError for one outside."""
    if logits_at is None:
        return [n - 1]
    rows = [int(i) + n if int(i) < 0 else int(i) for i in logits_at]
    for i, r in zip(logits_at, rows):
        if not 0 <= r < n:
            raise IndexError(f"logits_at index {i} is outside the {n} tokens given")
    return rows
