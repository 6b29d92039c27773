"""Awaiting with a deadline, on the hot path of a request or a stream.

``asyncio.wait_for`` runs what it awaits as a task of its own (before
Python 3.12): a task, its callbacks and two more turns of the loop for every
write of a stream. ``asyncio.timeout`` (3.11+) sets a deadline on the
running task instead; 3.10 keeps ``wait_for``. What is awaited is cancelled
at the deadline either way, and ``asyncio.TimeoutError`` raised.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")

if hasattr(asyncio, "timeout"):
    async def within(aw: Awaitable[T], seconds: float) -> T:
        """``await aw``, cancelled after ``seconds`` (``asyncio.TimeoutError``)."""
        async with asyncio.timeout(seconds):
            return await aw
else:  # pragma: no cover - Python 3.10
    async def within(aw: Awaitable[T], seconds: float) -> T:
        """``await aw``, cancelled after ``seconds`` (``asyncio.TimeoutError``)."""
        return await asyncio.wait_for(aw, seconds)
