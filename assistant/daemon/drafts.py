"""Draft models for speculative decoding, loaded through the model registry.

A draft model belongs to its target: the same backend class, context and
threads, loaded once, kept in the target's ``companions`` and driven on the
target's thread (the speculative engine calls both from one job). It is
resolved and its file checked like any model, and its load is a
``model.loaded`` event with ``draft_for`` set.
"""

from __future__ import annotations

import asyncio
import logging

from backends.base import Backend, BackendError, LoadOptions

from assistant.daemon.registry import ModelRegistry, check_complete
from assistant.daemon.worker import ModelWorker
from assistant.machine.hardware import figures
from assistant.protocol import ErrorCode, RPCError

log = logging.getLogger("assistant.daemon")


async def load_draft(registry: ModelRegistry, worker: ModelWorker, name: str) -> Backend:
    """The draft model ``name`` for ``worker``'s model: the same backend class,
    context and threads, loaded once and driven on the target's thread (the
    speculative engine calls both from one job). MODEL_LOAD_FAILED says why not."""
    try:
        spec = await registry.resolve(name, worker.backend.name)
    except RPCError as exc:
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"draft model {name!r}: {exc.message}",
                       {"draft_model": name}) from None
    key = str(spec.path)
    have = worker.companions.get(key)
    if have is not None:
        return have
    info = worker.backend.info
    instance = type(worker.backend)()
    options = LoadOptions(n_ctx=info.context_length, n_threads=info.n_threads, chat_template=spec.chat_template,
                          machine=figures(registry.machine))
    try:
        await asyncio.get_running_loop().run_in_executor(None, check_complete, spec.path)
        await worker.run(instance.load, key, options)
    except BackendError as exc:  # ModelLoadError and the rest
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"draft model {name!r}: {exc}", {"draft_model": name}) from None
    worker.companions[key] = instance
    log.info("loaded draft model %s for %s from %s", name, worker.key, key)
    registry.emit("model.loaded", {"model": name, "backend": worker.backend.name, "path": key,
                                   "draft_for": worker.key})
    return instance
