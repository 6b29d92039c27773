"""The model registry: the one path by which models are loaded and unloaded.

Target models and the draft models speculative decoding uses alike go
through ``ModelRegistry``: the alias is resolved, the backend chosen (one
function, shared with ``doctor``), the file checked by the backend before
anything is unloaded, idle models evicted to make room, and ``model.loaded``
/ ``model.unloaded`` events published.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from backends import BackendRegistry
from backends.base import Backend, BackendError, BackendUnavailable, LoadOptions, ModelLoadError

from assistant.config import Config
from assistant.config.models import ModelNotFoundError, ModelSpec, resolve_model
from assistant.daemon.worker import ModelWorker
from assistant.machine.choice import BackendChoiceError, choose_backend
from assistant.machine.hardware import Machine, figures
from assistant.protocol import ErrorCode, RPCError

log = logging.getLogger("assistant.daemon")

Emit = Callable[..., Any]


def _as_auto(value: Any) -> int | None:
    return None if value in (None, "auto") else int(value)


def _load_error(exc: Exception) -> RPCError:
    if isinstance(exc, ModelNotFoundError):
        return RPCError(ErrorCode.MODEL_NOT_FOUND, str(exc))
    return RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc))


class ModelRegistry:
    """Loaded models by alias, each with its worker thread."""

    def __init__(self, config: Config, machine: Machine, backends: BackendRegistry, emit: Emit,
                 drafting_on: Callable[[str], bool]):
        self.config = config
        self.machine = machine
        self.backends = backends
        self.emit = emit
        self.drafting_on = drafting_on  # whether an alias decodes with a drafter (llama.cpp load options)
        self.models: dict[str, ModelWorker] = {}
        self._loading: dict[str, asyncio.Task] = {}

    # -- choosing ---------------------------------------------------------------

    def choose_backend(self, requested: str | None) -> str:
        """The backend to run a model on; BACKEND_UNAVAILABLE says why not."""
        try:
            return choose_backend(requested, self.machine, self.backends.availability()).name
        except BackendChoiceError as exc:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, str(exc)) from None

    async def _resolve(self, name: str, backend_name: str | None) -> ModelSpec:
        """The alias resolved (off the loop: a built-in may be assembled and hashed first) and,
        with ``backend_name``, that backend's file checked by the backend itself."""
        loop = asyncio.get_running_loop()
        try:
            spec = await loop.run_in_executor(None, resolve_model, name, self.config)
            if backend_name is not None:
                cls = self.backends.get(backend_name)
                spec = await loop.run_in_executor(None, lambda: spec.for_backend(backend_name, backend_class=cls))
        except (ModelNotFoundError, ModelLoadError, BackendUnavailable) as exc:
            raise _load_error(exc) from None
        return spec

    # -- target models ------------------------------------------------------------

    async def get(self, name: str | None, *, backend: str | None = None, context: int | None = None,
                  threads: int | None = None) -> ModelWorker:
        """The loaded model called ``name`` (default: the config's), loading it first if needed."""
        name = name or self.config.model
        if name in self._loading:
            await asyncio.shield(self._loading[name])
        worker = self.models.get(name)
        if worker is not None and worker.state == "ready" and worker.matches(backend, context):
            return worker
        task = asyncio.ensure_future(self._load(name, backend, context, threads))
        self._loading[name] = task
        try:
            return await asyncio.shield(task)
        finally:
            if self._loading.get(name) is task:
                del self._loading[name]

    def _options(self, name: str, spec: ModelSpec, backend_name: str, context: int | None,
                 threads: int | None) -> LoadOptions:
        options = LoadOptions(
            n_ctx=context or spec.context or _as_auto(self.config.context),
            n_threads=threads or spec.threads or _as_auto(self.config.threads),
            chat_template=spec.chat_template,
            machine=figures(self.machine),
        )
        if backend_name == "llama.cpp" and self.drafting_on(name):
            # Verified batches are bit-identical to one-token steps only when
            # the K cache is not F16/F32 (see backends/llamacpp.py): greedy
            # identity needs it. Q8_0 K with F16 V costs plain decoding nothing.
            options.extra["kv_type"] = "q8_0/f16"
        elif backend_name == "llama.cpp":
            # No drafting configured: no MTP layers, context or hidden-state copies per token.
            options.extra["mtp"] = False
        return options

    async def _load(self, name: str, backend: str | None, context: int | None, threads: int | None) -> ModelWorker:
        spec = await self._resolve(name, None)
        backend_name = self.choose_backend(backend or spec.backend or self.config.backend)
        spec = await self._resolve(name, backend_name)  # checked before anything is unloaded
        old = self.models.pop(name, None)
        if old is not None:  # reloading with other settings: the old one goes first
            await old.unload()
        await self._evict_for_one_more()
        try:
            instance = self.backends.get(backend_name)()
        except BackendUnavailable as exc:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, str(exc)) from None
        worker = ModelWorker(name, spec, instance, self._options(name, spec, backend_name, context, threads))
        self.models[name] = worker
        log.info("loading %s from %s with %s", name, spec.path, backend_name)
        try:
            info = await worker.load()
        except Exception as exc:  # noqa: BLE001 - a backend bug must not kill the daemon
            self.models.pop(name, None)
            try:
                await worker.unload()
            except Exception:  # noqa: BLE001 - the load's own error is the one to report
                log.exception("cleaning up the failed load of %s", name)
            if isinstance(exc, ModelLoadError):
                raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
            log.exception("loading %s failed", name)
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"could not load {name}: {type(exc).__name__}: {exc}") from None
        log.info("loaded %s: %s, context %d, %d threads", name, info.architecture, info.context_length, info.n_threads)
        self.emit("model.loaded", {"model": name, "backend": backend_name, "path": str(spec.path)})
        return worker

    async def _evict_for_one_more(self) -> None:
        """Unload least-recently-used idle models until one more fits."""
        while len(self.models) >= self.config.max_loaded_models:
            idle = [w for w in self.models.values() if w.active == 0]
            if not idle:
                log.warning("all %d loaded models are busy; loading one more anyway", len(self.models))
                return
            victim = min(idle, key=lambda w: w.last_used)
            log.info("unloading %s to make room", victim.key)
            del self.models[victim.key]
            await victim.unload()

    async def unload(self, name: str) -> None:
        """Unload a loaded model; MODEL_NOT_FOUND if it is not loaded."""
        worker = self.models.pop(name, None)
        if worker is None:
            raise RPCError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not loaded")
        await worker.unload()
        self.emit("model.unloaded", {"model": name})

    async def unload_all(self) -> None:
        for worker in list(self.models.values()):
            try:
                await asyncio.wait_for(worker.unload(), 15)
            except Exception:  # noqa: BLE001
                log.exception("unloading %s failed", worker.key)
        self.models.clear()

    # -- draft models ----------------------------------------------------------------

    async def draft_for(self, worker: ModelWorker, name: str) -> Backend:
        """The draft model ``name`` for ``worker``'s model: the same backend class,
        context and threads, loaded once and driven on the target's thread (the
        speculative engine calls both from one job). MODEL_LOAD_FAILED says why not."""
        try:
            spec = await self._resolve(name, worker.backend.name)
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
                              machine=figures(self.machine))
        try:
            await worker.run(instance.load, key, options)
        except BackendError as exc:  # ModelLoadError and the rest
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"draft model {name!r}: {exc}", {"draft_model": name}) from None
        worker.companions[key] = instance
        log.info("loaded draft model %s for %s from %s", name, worker.key, key)
        self.emit("model.loaded", {"model": name, "backend": worker.backend.name, "path": key,
                                   "draft_for": worker.key})
        return instance

    # -- reporting ----------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        return [w.describe() for w in self.models.values()]

    def loading(self) -> list[str]:
        return sorted(self._loading)
