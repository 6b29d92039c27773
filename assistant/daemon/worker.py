"""One loaded model and the one thread that drives it.

Inference is blocking native code, so every call into a backend runs on the
model's own worker thread and the event loop only awaits it. The thread's
queue is FIFO: requests for a model run in the order they arrived.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Any, Callable, TypeVar

from backends.base import Backend, LoadOptions, ModelInfo

from assistant.config.models import ModelSpec
from assistant.inference.speculative import CostModel

T = TypeVar("T")


class ModelWorker:
    """A backend instance, its model, and its single worker thread."""

    def __init__(self, key: str, spec: ModelSpec, backend: Backend, options: LoadOptions):
        self.key = key  # the name clients use for it
        self.spec = spec
        self.backend = backend
        self.options = options
        self.info: ModelInfo | None = None
        self.state = "loading"  # loading | ready | failed | unloaded
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        self.active = 0  # requests queued or running
        self.requests_done = 0
        self.tokens_generated = 0
        self.last_request: dict[str, Any] | None = None  # finish_reason, tokens, ... of the latest reply
        # Models this one uses (speculative-decoding draft models), by file; loaded,
        # driven and unloaded on this worker's thread.
        self.companions: dict[str, Backend] = {}
        # What a decode step and a verify batch cost on this model, measured by
        # speculative decoding and kept for the model's life.
        self.costs = CostModel()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{key}")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on this model's thread, after the requests before it."""
        loop = asyncio.get_running_loop()
        self.active += 1
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        finally:
            self.active -= 1
            self.last_used = time.monotonic()

    async def load(self) -> ModelInfo:
        try:
            self.info = await self.run(self.backend.load, str(self.spec.path), self.options)
        except BaseException as exc:
            self.state, self.error = "failed", str(exc)
            raise
        self.state, self.loaded_at = "ready", time.time()
        return self.info

    async def unload(self) -> None:
        """Unload after the requests already queued; then stop the thread."""
        if self.state != "unloaded":
            await self.run(self.backend.unload)
            for companion in list(self.companions.values()):
                await self.run(companion.unload)
            self.companions.clear()
            self.state = "unloaded"
        self._executor.shutdown(wait=False)

    def matches(self, backend: str | None, context: int | None) -> bool:
        """Whether this loaded model serves a request for ``backend`` and ``context``
        (None: any). "auto" keeps whatever backend the model runs on: it was chosen
        for this machine."""
        wanted_backend = backend in (None, "auto") or backend == self.backend.name
        wanted_ctx = context is None or (self.info is not None and self.info.context_length == context)
        return wanted_backend and wanted_ctx

    def record(self, stats: dict[str, Any]) -> None:
        """Account a finished generation (shown by ``status``)."""
        self.requests_done += 1
        self.tokens_generated += stats.get("completion_tokens") or 0
        self.last_request = {k: stats.get(k) for k in ("finish_reason", "completion_tokens", "prompt_tokens",
                                                       "cached_prompt_tokens", "tokens_per_second", "ttft_ms")}

    def describe(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.key,
            "path": str(self.spec.path),
            "backend": self.backend.name,
            "state": self.state,
            "active_requests": self.active,
            "requests_done": self.requests_done,
            "tokens_generated": self.tokens_generated,
            "last_request": self.last_request,
        }
        if self.error:
            data["error"] = self.error
        if self.info is not None:
            data["info"] = self.info.to_dict()
        return data
