"""The model registry: the one path by which models are loaded and unloaded.

Target models and the draft models speculative decoding uses alike go
through ``ModelRegistry``: the alias is resolved, the backend chosen (one
function, shared with ``doctor``), and ``model.loaded`` / ``model.unloaded``
events published.

A load never costs the daemon the model that is serving. Before anything is
unloaded the file is checked (by the backend, and here that a GGUF file is
as long as its tensors need: a truncated download passes a header check).
When memory allows, the new model is loaded beside the old one, which keeps
serving until the new one is ready and then finishes what it holds; when it
does not, the old one goes first and, should the load fail, is loaded again.
Either way requests that wait meanwhile are served by whichever model ends
up loaded. Loads, evictions and restores run one at a time.

Keep-alive: a model nobody uses unloads after its keep-alive (the config's
``keep_alive``, or the last request's own), so a laptop gets its memory back.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from backends import BackendRegistry, gguf, memory_plan
from backends.base import Backend, BackendUnavailable, LoadOptions, ModelLoadError
from backends.sizing import fits_in_memory

from assistant.config import Config, parse_duration
from assistant.config.models import ModelNotFoundError, ModelSpec, resolve_model
from assistant.daemon import drafts
from assistant.daemon.worker import UNSET, ModelWorker
from assistant.inference.speculative.calibration import DRAFTING_KV_TYPE
from assistant.machine import hardware
from assistant.machine.choice import BackendChoiceError, choose_backend
from assistant.machine.hardware import Machine, figures
from assistant.protocol import ErrorCode, RPCError

log = logging.getLogger("assistant.daemon")

Emit = Callable[..., Any]

# Memory kept free when two models would be loaded side by side: a share of the
# RAM for the OS and the user's programs (the load itself is counted in full).
SIDE_BY_SIDE_RESERVE = 0.1


def _as_auto(value: Any) -> int | None:
    return None if value in (None, "auto") else int(value)


def _load_error(exc: Exception) -> RPCError:
    if isinstance(exc, ModelNotFoundError):
        return RPCError(ErrorCode.MODEL_NOT_FOUND, str(exc))
    return RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc))


# -- is the whole file there? -----------------------------------------------------

# ggml_type -> (values per block, bytes per block), from ggml's type traits.
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
                9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
                15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18),
                21: (256, 110), 22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8),
                28: (1, 8), 29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17)}


def gguf_shortfall(path: str | os.PathLike) -> tuple[int, int] | None:
    """(bytes the tensors need, bytes the file has) when a GGUF file ends before
    its last tensor does, else None (whole, or not a GGUF file at all: the
    backend's own check says what that is). A tensor of a type not known here
    counts to its start only. Raises ``ModelLoadError`` for a damaged header."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != gguf.GGUF_MAGIC:
            return None
        r = gguf._Reader(f, path)  # the header reader of backends.gguf (header errors and all)
        if r.unpack("<I") not in (2, 3):
            return None
        n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
        alignment = 32
        for _ in range(n_kv):
            key, value = r.string(), r.value(r.unpack("<I"), False)
            if key == "general.alignment" and isinstance(value, int) and value > 0:
                alignment = value
        end = 0
        for _ in range(n_tensors):
            r.string()
            n_dims = r.unpack("<I")
            if n_dims > 8:
                return None  # a corrupt header: llama.cpp names it
            shape = [r.unpack("<Q") for _ in range(n_dims)]
            ttype, offset = r.unpack("<I"), r.unpack("<Q")
            per, size = _GGML_BLOCKS.get(ttype, (1, 0))
            end = max(end, offset + math.prod(shape) // per * size)
        data_start = -(-f.tell() // alignment) * alignment
        have = os.fstat(f.fileno()).st_size
    need = data_start + end
    return (need, have) if have < need else None


def check_complete(path: str | os.PathLike) -> None:
    """ModelLoadError when ``path`` is a GGUF file cut short (see ``gguf_shortfall``)."""
    try:
        short = gguf_shortfall(path) if Path(path).is_file() else None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None
    if short is not None:
        need, have = short
        raise ModelLoadError(f"{path}: truncated model file: its tensors need {need:,} bytes but the file has "
                             f"{have:,} (an interrupted download or copy?)")


def _weights_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return path.stat().st_size


def _memory_needed(spec: ModelSpec, options: LoadOptions) -> tuple[int, int]:
    """(model bytes, KV cache bytes, estimated) of loading ``spec`` with ``options``.
    A GGUF file: its memory plan's (model: weights, a separate MTP drafter, a
    projector, compute buffers; KV: by layer kind). Else the weights' size, the
    drafter's beside it (an assistant drafter holds no KV of its own: it reads the
    target's), and a KV estimate."""
    n_ctx = options.n_ctx or 4096
    drafter = options.mtp_model if (options.extra or {}).get("mtp", True) else None
    if Path(spec.path).is_file():
        plan = memory_plan.plan_for_load(spec.path, n_ctx, options.extra or {}, n_batch=options.n_batch,
                                         mtp_model=drafter, mmproj=options.mmproj)
        if plan is not None:
            kv = sum(ln.bytes for ln in plan.lines if ln.name.startswith(("kv cache", "drafter kv cache")))
            return plan.needed - kv, kv
    size = _weights_bytes(Path(spec.path)) + (_weights_bytes(Path(drafter)) if drafter else 0)
    per_token = None
    if Path(spec.path).is_file():
        try:
            per_token = gguf.kv_bytes_per_token(gguf.read_metadata(spec.path))
        except ModelLoadError:
            pass
    kv = per_token * n_ctx if per_token else size // 8
    return size, kv


def _remote_options(name: str, spec: ModelSpec, context: int | None) -> LoadOptions:
    """A remote model's load options: its name on the server and the key's variable. The
    server decides the context; a request's or the alias's is only what is reported where
    the server does not say."""
    return LoadOptions(n_ctx=context or spec.context,
                       extra={"alias": name, "model": spec.remote_model, "api_key_env": spec.api_key_env})


def _fits_another(worker: ModelWorker) -> tuple[bool, str]:
    """Whether the RAM available now takes one more instance of ``worker``'s model and
    its KV cache, keeping ``SIDE_BY_SIDE_RESERVE`` of the RAM free; and the figures."""
    try:
        size, kv = _memory_needed(worker.spec, worker.options)
    except OSError as exc:
        return False, f"cannot size {worker.spec.path}: {exc.strerror or exc}"
    machine = hardware.probe()
    if machine.ram_available_bytes is None:
        return False, "free RAM unknown"
    reserve = int((machine.ram_total_bytes or 0) * SIDE_BY_SIDE_RESERVE)
    ok, why = fits_in_memory(figures(machine), size, kv)
    ok = ok and size + kv + reserve <= machine.ram_available_bytes
    return ok, f"{why}; {reserve / 2**30:.1f} GiB kept free"


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
        self._switch = asyncio.Lock()  # one load, eviction or restore at a time
        self._retiring: set[ModelWorker] = set()  # replaced or evicted: unloading once idle
        self._starting: dict[str, ModelWorker] = {}  # being loaded (shown as "loading" where nothing serves)
        self._tasks: set[asyncio.Task] = set()
        self.keep_alive = parse_duration(getattr(config, "keep_alive", "5m"))

    # -- choosing ---------------------------------------------------------------

    def choose_backend(self, requested: str | None) -> str:
        """The backend to run a model on; BACKEND_UNAVAILABLE says why not."""
        try:
            return choose_backend(requested, self.machine, self.backends.availability()).name
        except BackendChoiceError as exc:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, str(exc)) from None

    async def resolve(self, name: str, backend_name: str | None) -> ModelSpec:
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
                  threads: int | None = None, hold: bool = False) -> ModelWorker:
        """The loaded model called ``name`` (default: the config's), loading it first if needed.

        With ``hold`` the caller holds it until ``release``: it is neither evicted nor
        unloaded by keep-alive meanwhile. Without, its keep-alive starts over. A caller
        that waited for someone else's load gets whatever model ends up serving ``name``
        (a failed reload leaves the previous one); an empty ``backend`` is no wish."""
        name = name or self.config.model
        backend = backend or None
        for _ in range(4):  # each turn waits for one load; another may begin meanwhile
            pending, own = self._loading.get(name), False
            if pending is None:
                ready = self._ready(name, backend, context, threads)
                if ready is not None:
                    return self._take(ready, hold)
                pending, own = self._start_load(name, backend, context, threads), True
            try:
                await asyncio.shield(pending)
                failure = None
            except RPCError as exc:
                failure = exc
            ready = self._ready(name, backend, context, threads)
            if ready is not None:
                return self._take(ready, hold)
            if failure is not None and own:
                raise failure
        raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"model {name!r} kept being reloaded while this request waited; "
                                                    "try again")

    def release(self, worker: ModelWorker, keep_alive: Any = UNSET) -> None:
        """A request that held ``worker`` is done; ``keep_alive`` (seconds, None: forever;
        default: the config's) is how long the model stays loaded once nobody uses it."""
        worker.release()
        if not worker.retired:
            self._arm(worker, keep_alive)

    def _ready(self, name: str, backend: str | None, context: int | None, threads: int | None) -> ModelWorker | None:
        worker = self.models.get(name)
        if worker is not None and worker.state == "ready" and worker.matches(backend, context, threads):
            return worker
        return None

    def _take(self, worker: ModelWorker, hold: bool) -> ModelWorker:
        if hold:
            worker.cancel_unload_timer()
            worker.hold()
        else:
            self._arm(worker, UNSET)
        return worker

    def _start_load(self, name: str, backend: str | None, context: int | None, threads: int | None) -> asyncio.Task:
        task = asyncio.ensure_future(self._load(name, backend, context, threads))
        self._loading[name] = task

        def done(t: asyncio.Task) -> None:
            if self._loading.get(name) is t:
                del self._loading[name]
            if not t.cancelled():
                t.exception()  # retrieved: its waiters report it
        task.add_done_callback(done)
        return task

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
            options.extra["kv_type"] = DRAFTING_KV_TYPE
        elif backend_name == "llama.cpp":
            # No drafting configured: no MTP layers, context or hidden-state copies per token.
            options.extra["mtp"] = False
        if backend_name == "llama.cpp":
            # context auto: the largest whose memory plan (weights, drafter, KV by layer kind,
            # compute, OS headroom) fits; the backend used alone keeps its simple rule
            options.extra["memory_plan"] = True
        return options

    async def _load(self, name: str, backend: str | None, context: int | None, threads: int | None) -> ModelWorker:
        async with self._switch:
            ready = self._ready(name, backend, context, threads)
            if ready is not None:  # loaded while this one waited its turn
                return ready
            worker = await self._prepared(name, backend, context, threads)  # every check before any unload
            try:
                if self._room_for_one_more(name) or worker.remote or await self._fits_beside(worker):
                    await self._start(worker)  # on failure nothing else has changed
                else:
                    evicted = await self._make_room(name)
                    try:
                        await self._start(worker)
                    except BaseException:
                        await self._restore(evicted)
                        raise
            except BaseException:
                worker.scheduler.close()  # its thread ends (a failed start has unloaded it already)
                raise
            self._install(worker)
            return worker

    async def _prepared(self, name: str, backend: str | None, context: int | None,
                        threads: int | None) -> ModelWorker:
        """A worker for ``name``, not loaded yet, once the file passed every check: the
        backend's (headers), and that a GGUF file is whole."""
        spec = await self.resolve(name, None)
        if spec.remote and backend in (None, "", "auto"):
            backend = "remote"  # the alias says where it runs; "auto" is no wish against that
        backend_name = self.choose_backend(backend or spec.backend or self.config.backend)
        spec = await self.resolve(name, backend_name)
        try:
            await asyncio.get_running_loop().run_in_executor(None, check_complete, spec.path)
        except ModelLoadError as exc:
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
        try:
            instance = self.backends.get(backend_name)()
        except BackendUnavailable as exc:
            raise RPCError(ErrorCode.BACKEND_UNAVAILABLE, str(exc)) from None
        if spec.remote:  # a server's model: no file, memory or drafter here
            return self._worker(name, spec, instance, _remote_options(name, spec, context))
        options = self._options(name, spec, backend_name, context, threads)
        # A separate MTP drafter (configured, or an mtp-*.gguf beside the file), checked here:
        # one that cannot be used is refused before anything is unloaded.
        options.mtp_model = await drafts.resolve_mtp_model(self.config, name, spec)
        # The alias's media projector (mmproj:), checked against the model's header here, so one
        # that does not belong to it is refused before anything is unloaded; none: the backend
        # looks for a mmproj-*.gguf beside the file.
        options.mmproj = await drafts.resolve_mmproj(name, spec, backend_name)
        return self._worker(name, spec, instance, options)

    def _worker(self, name: str, spec: ModelSpec, instance: Backend, options: LoadOptions) -> ModelWorker:
        return ModelWorker(name, spec, instance, options, max_queued=getattr(self.config, "max_queued_requests", 64),
                           second_context=self._second_context)

    def _room_for_one_more(self, name: str) -> bool:
        """Nothing would have to go: not a reload, and under ``max_loaded_models``."""
        return name not in self.models and self._local_count() < self.config.max_loaded_models

    def _local_count(self) -> int:
        """Loaded models that hold memory here: a remote one (a server's) counts for nothing."""
        return sum(1 for w in self.models.values() if not w.remote)

    async def _fits_beside(self, worker: ModelWorker) -> bool:
        """Whether the RAM available now holds ``worker``'s model and its KV cache on top
        of what is loaded, with a share of the RAM to spare (unknown: no)."""
        ok, why = await asyncio.get_running_loop().run_in_executor(None, _fits_another, worker)
        log.info("loading %s beside the loaded models: %s (%s)", worker.key, "yes" if ok else "no", why)
        return ok

    @staticmethod
    def _second_context(worker: ModelWorker) -> bool:
        """On the model thread: whether background work may have its own instance of the
        model (weights counted again in full: a GPU backend or MLX copies them)."""
        ok, why = _fits_another(worker)
        log.info("%s: a second context for background work: %s (%s)", worker.key, "yes" if ok else "no", why)
        return ok

    async def _start(self, worker: ModelWorker) -> None:
        """Load ``worker``'s model; MODEL_LOAD_FAILED (its thread stopped) if it cannot be."""
        name, spec = worker.key, worker.spec
        log.info("loading %s from %s with %s", name, spec.path, worker.backend.name)
        self._starting[name] = worker
        try:
            info = await worker.load()
        except Exception as exc:  # noqa: BLE001 - a backend bug must not kill the daemon
            try:
                await worker.unload()
            except Exception:  # noqa: BLE001 - the load's own error is the one to report
                log.exception("cleaning up the failed load of %s", name)
            if isinstance(exc, ModelLoadError):
                raise RPCError(ErrorCode.MODEL_LOAD_FAILED, str(exc)) from None
            log.exception("loading %s failed", name)
            raise RPCError(ErrorCode.MODEL_LOAD_FAILED, f"could not load {name}: {type(exc).__name__}: {exc}") from None
        finally:
            if self._starting.get(name) is worker:
                del self._starting[name]
        log.info("loaded %s: %s, context %d, %d threads", name, info.architecture, info.context_length, info.n_threads)

    def _install(self, worker: ModelWorker) -> None:
        """``worker`` serves its name from now on: the one it replaces finishes what it
        holds and unloads; idle models beyond ``max_loaded_models`` go, oldest first."""
        old = self.models.get(worker.key)
        self.models[worker.key] = worker
        if old is not None:
            self._spawn(self._retire(old, None))
        while self._local_count() > self.config.max_loaded_models:
            idle = [w for w in self.models.values() if w is not worker and w.idle and not w.remote]
            if not idle:
                log.warning("all %d loaded models are busy; keeping one more loaded for now", len(self.models) - 1)
                break
            victim = min(idle, key=lambda w: w.last_used)
            log.info("unloading %s to make room", victim.key)
            del self.models[victim.key]
            self._spawn(self._retire(victim, "evicted"))
        self.emit("model.loaded", {"model": worker.key, "backend": worker.backend.name, "path": str(worker.spec.path)})

    async def _make_room(self, name: str) -> list[ModelWorker]:
        """No room for two: take ``name``'s current model and the least recently used idle
        ones out until one more fits; each finishes what it holds, then unloads. Returns
        them, for ``_restore``."""
        victims = [self.models.pop(name)] if name in self.models else []
        while self._local_count() >= self.config.max_loaded_models:
            idle = [w for w in self.models.values() if w.idle and not w.remote]
            if not idle:
                log.warning("all %d loaded models are busy; loading one more anyway", len(self.models))
                break
            victim = min(idle, key=lambda w: w.last_used)
            del self.models[victim.key]
            victims.append(victim)
        for victim in victims:
            log.info("unloading %s to make room", victim.key)
            await self._retire(victim, None if victim.key == name else "evicted")
        return victims

    async def _restore(self, evicted: list[ModelWorker]) -> None:
        """After a failed load: load again what was unloaded for it, with its old settings."""
        for old in evicted:
            if old.key in self.models:
                continue
            worker = self._worker(old.key, old.spec, type(old.backend)(), old.options)
            try:
                await self._start(worker)
            except RPCError as exc:
                log.error("could not load %s again after a failed load: %s", old.key, exc.message)
                continue
            log.info("loaded %s again: the load that needed its room failed", old.key)
            self._install(worker)
            self._arm(worker, old.keep_alive)

    async def _retire(self, worker: ModelWorker, reason: str | None) -> None:
        """Unload ``worker`` (already out of ``models``) once it is idle: its queued jobs
        run and the requests holding it finish first. ``reason``: the ``model.unloaded``
        event's (None: no event, as for a model replaced by its own reload)."""
        worker.retired = True
        worker.cancel_unload_timer()
        self._retiring.add(worker)
        try:
            await worker.wait_idle()
            await worker.unload()
        finally:
            self._retiring.discard(worker)
        if reason is not None:
            self.emit("model.unloaded", {"model": worker.key, "reason": reason})

    async def unload(self, name: str) -> None:
        """Unload a loaded model once the requests it serves are done; MODEL_NOT_FOUND if it is not loaded."""
        worker = self.models.pop(name, None)
        if worker is None:
            raise RPCError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} is not loaded")
        await self._retire(worker, "unload")

    async def unload_all(self) -> None:
        """Shutdown: unload everything after the jobs already queued (requests were cancelled first)."""
        for task in list(self._tasks):
            task.cancel()
        workers = [*self.models.values(), *self._retiring]
        self.models.clear()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.unload(), 15)
            except Exception:  # noqa: BLE001
                log.exception("unloading %s failed", worker.key)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- keep-alive ---------------------------------------------------------------------

    def _arm(self, worker: ModelWorker, keep_alive: Any) -> None:
        """Set ``worker``'s keep-alive (UNSET: the config's) and, if nobody uses it, the
        timer that unloads it when that has passed."""
        worker.keep_alive = self.keep_alive if keep_alive is UNSET else keep_alive
        worker.cancel_unload_timer()
        if worker.retired or not worker.idle or worker.keep_alive is None:
            return
        delay = max(0.0, worker.keep_alive)
        worker.unload_at = time.time() + delay
        worker.unload_timer = asyncio.get_running_loop().call_later(delay, self._expire, worker)

    def _expire(self, worker: ModelWorker) -> None:
        worker.unload_timer = None
        if self.models.get(worker.key) is not worker or not worker.idle:
            worker.unload_at = None
            return
        if self._switch.locked() or worker.key in self._loading:  # a load is deciding about it: ask again soon
            worker.unload_timer = asyncio.get_running_loop().call_later(1.0, self._expire, worker)
            return
        log.info("unloading %s: unused for %s s (keep_alive)", worker.key, _seconds(worker.keep_alive))
        del self.models[worker.key]
        self._spawn(self._retire(worker, "keep_alive"))

    # -- reporting ----------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """The loaded models, and those being loaded where nothing serves their name yet."""
        starting = [w for name, w in self._starting.items() if name not in self.models]
        return [w.describe() for w in [*self.models.values(), *starting]]

    def loading(self) -> list[str]:
        return sorted(self._loading)


def _seconds(value: float | None) -> str:
    return "forever" if value is None else f"{value:g}"
