"""One loaded model and the one thread that drives it.

Inference is blocking native code, so every call into a backend runs on the
model's own thread and the event loop only awaits it. What runs next on that
thread is the scheduler's choice, not arrival order alone:

- **priority**: a person waiting (``interactive``: the TUI, the CLI, HTTP)
  goes ahead of ``background`` work (automations, plugin-initiated chats);
  unloading (``drain``) comes after everything queued;
- **yielding**: a background generation checks between decode steps (and
  prefill chunks) whether interactive work is waiting; if so it runs that
  work right there, on the same thread, and goes on (its stream continues);
- **a context of its own**: where memory allows, background work runs on a
  second instance of the model (a second KV cache; llama.cpp maps the
  weights once), so neither side's cache is lost to the other: a person's
  conversation keeps its prefix warm, and a background reply resumes with
  nothing to rebuild. Otherwise they share one cache, and a background reply
  rebuilds its own after yielding (prefix reuse, a small chunk at a time,
  stopping again for interactive work that arrives meanwhile);
- **small steps while a person is around**: a background request prefills
  in small chunks (each a chance to yield), and for ``PERSON_WINDOW_S``
  after a person's last request its speculative drafts are capped at
  ``BACKGROUND_DRAFT_CAP`` tokens, so that a person's next request waits for
  a short verify batch rather than a long one;
- **fairness**: within a priority, clients (connections) take turns, one
  job each, so one client cannot starve the rest;
- **bound**: past ``max_queued`` waiting jobs a new request is refused at
  once (``Busy``; the daemon answers ``BUSY``). Background work never
  counts against a person: interactive requests count only interactive ones;
- **withdrawal**: a queued job whose request is cancelled leaves the queue
  at once (``Withdrawn``), without waiting for the running one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from backends.base import Backend, LoadOptions, ModelInfo
from backends.remote import ChatBackend

from assistant.config.models import ModelSpec
from assistant.inference.generation import common_prefix
from assistant.inference.speculative import CostModel

T = TypeVar("T")

log = logging.getLogger("assistant.daemon")

INTERACTIVE, BACKGROUND, DRAIN = 0, 1, 2
PRIORITIES = {"interactive": INTERACTIVE, "background": BACKGROUND}
_LEVEL_NAMES = ("interactive", "background", "drain")
DEFAULT_MAX_QUEUED = 64
# Tokens evaluated at a time where a background job may have to give way: its
# prompt's prefill and the rebuild of its cache after yielding. Small, so that
# interactive work arriving meanwhile waits for one chunk (tens of ms), not all.
YIELD_CHUNK = 8
# For this long after a person's last request, background drafts stay short.
PERSON_WINDOW_S = 30.0
BACKGROUND_DRAFT_CAP = 4
# "Not given" for a keep-alive, where None already means forever.
UNSET: Any = type("Unset", (), {"__repr__": lambda self: "UNSET"})()


class Busy(Exception):
    """The queue is at its bound: the request is refused before it waits."""

    def __init__(self, waiting: int, limit: int):
        super().__init__(f"{waiting} requests are already waiting (the limit is {limit})")
        self.waiting, self.limit = waiting, limit


class Withdrawn(Exception):
    """The job's request was cancelled while it waited: it never ran."""


class WorkerClosed(Exception):
    """The model was unloaded: its thread takes no more work."""


class CancelFlag(threading.Event):
    """A ``threading.Event`` that also tells listeners when it is set, so
    that a request cancelled while it waits in a queue can leave it at once
    (a plain Event can only be polled). ``set`` may be called from any thread;
    listeners run on that thread and must be quick."""

    def __init__(self) -> None:
        super().__init__()
        self._listeners: list[Callable[[], None]] = []
        self._guard = threading.Lock()

    @classmethod
    def adopt(cls, event: threading.Event | None) -> "CancelFlag":
        """``event`` itself if it is a CancelFlag, else a new one in the same state."""
        if isinstance(event, CancelFlag):
            return event
        flag = cls()
        if event is not None and event.is_set():
            flag.set()
        return flag

    def set(self) -> None:
        super().set()
        with self._guard:
            listeners, self._listeners = self._listeners, []
        for fn in listeners:
            fn()

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call ``fn`` once when the flag is set (now, if it is); returns a function that stops listening."""
        with self._guard:
            if not self.is_set():
                self._listeners.append(fn)
                return lambda: self._forget(fn)
        fn()
        return lambda: None

    def _forget(self, fn: Callable[[], None]) -> None:
        with self._guard:
            if fn in self._listeners:
                self._listeners.remove(fn)


@dataclass(eq=False)
class Ticket:
    """Who a job is for: its priority, its client (for fairness, typically the
    connection) and its request's cancel flag. One per request: after its first
    job was accepted, later ones (tool rounds) skip the queue bound."""

    priority: int = INTERACTIVE
    client: Any = None
    cancel: threading.Event | None = None
    admitted: bool = False
    yields: int = 0  # times a background job let interactive work go first
    yielded_s: float = 0.0  # and how long that took, cache rebuild included

    @property
    def priority_name(self) -> str:
        return _LEVEL_NAMES[self.priority]


_CONTROL = Ticket(client="daemon")  # loads and other housekeeping: interactive, never bounded


class _Job:
    __slots__ = ("fn", "args", "ticket", "priority", "future", "loop")

    def __init__(self, fn: Callable[..., Any], args: tuple, ticket: Ticket, priority: int,
                 loop: asyncio.AbstractEventLoop):
        self.fn, self.args, self.ticket, self.priority = fn, args, ticket, priority
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()

    def settle(self, ok: bool, value: Any) -> None:
        """Any thread: hand the outcome to the awaiting coroutine."""
        def deliver() -> None:
            if self.future.done():  # withdrawn, or its awaiter was cancelled
                return
            if ok:
                self.future.set_result(value)
            else:
                self.future.set_exception(value)
        try:
            self.loop.call_soon_threadsafe(deliver)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class Scheduler:
    """The model's one thread and the queue it takes its jobs from (see the module docstring)."""

    def __init__(self, name: str, *, max_queued: int = DEFAULT_MAX_QUEUED):
        self.max_queued = max_queued
        self._cond = threading.Condition()
        # per level: client -> its jobs in order; the first client's turn is next
        self._levels: list[collections.OrderedDict[Any, collections.deque[_Job]]] = \
            [collections.OrderedDict() for _ in _LEVEL_NAMES]
        self._counts = [0] * len(_LEVEL_NAMES)
        self._closed = False
        self.last_interactive = float("-inf")  # monotonic time of the last interactive request's job
        self.running: list[_Job] = []  # outermost first; two deep while a background job yields
        self._thread = threading.Thread(target=self._main, name=f"model-{name}", daemon=True)
        self._thread.start()

    # -- the loop's side -------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        """Queue ``job``. Raises ``Busy`` (a request's first job, past the bound) or ``WorkerClosed``."""
        with self._cond:
            if self._closed:
                raise WorkerClosed()
            ticket = job.ticket
            if not ticket.admitted and job.priority != DRAIN and ticket is not _CONTROL:
                waiting = self._counts[INTERACTIVE] + (self._counts[BACKGROUND] if job.priority == BACKGROUND else 0)
                if waiting >= self.max_queued:
                    raise Busy(waiting, self.max_queued)
            ticket.admitted = True
            if job.priority == INTERACTIVE and ticket is not _CONTROL:
                self.last_interactive = time.monotonic()
            self._levels[job.priority].setdefault(ticket.client, collections.deque()).append(job)
            self._counts[job.priority] += 1
            self._cond.notify()

    def withdraw(self, job: _Job) -> bool:
        """Take ``job`` out of the queue; False if it already started (or finished)."""
        with self._cond:
            clients = self._levels[job.priority]
            jobs = clients.get(job.ticket.client)
            if jobs is None or job not in jobs:
                return False
            jobs.remove(job)
            if not jobs:
                del clients[job.ticket.client]
            self._counts[job.priority] -= 1
            return True

    def close(self) -> None:
        """Take no more jobs; the thread ends once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def queued(self) -> dict[str, int]:
        return {name: self._counts[i] for i, name in enumerate(_LEVEL_NAMES[:2])}

    # -- the model thread's side -------------------------------------------------------

    def _main(self) -> None:
        while True:
            job = self._take(DRAIN, block=True)
            if job is None:
                return
            self._execute(job)

    def _take(self, lowest: int, *, block: bool) -> _Job | None:
        """The next job of priority ``lowest`` or better: the first level with work, its
        first client's oldest job (that client then goes to the back of the line)."""
        with self._cond:
            while True:
                for level in range(lowest + 1):
                    clients = self._levels[level]
                    if clients:
                        client, jobs = next(iter(clients.items()))
                        job = jobs.popleft()
                        self._counts[level] -= 1
                        if jobs:
                            clients.move_to_end(client)
                        else:
                            del clients[client]
                        return job
                if not block or self._closed:
                    return None
                self._cond.wait()

    def _execute(self, job: _Job) -> None:
        self.running.append(job)
        try:
            value, ok = job.fn(*job.args), True
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            value, ok = exc, False
        finally:
            self.running.pop()
        job.settle(ok, value)

    def interactive_waiting(self) -> bool:
        return self._counts[INTERACTIVE] > 0

    def person_active(self) -> bool:
        """Whether an interactive request came in the last ``PERSON_WINDOW_S`` seconds."""
        return time.monotonic() - self.last_interactive < PERSON_WINDOW_S

    def yield_point(self, shared: Backend | None = None, cancelled: Callable[[], bool] = lambda: False) -> float:
        """On the model thread, inside a running background job: run the interactive
        jobs waiting now (and any that arrive meanwhile). ``shared``: the backend the
        background job shares with them, whose cache is then rebuilt (interactive
        work arriving during the rebuild goes first again), unless ``cancelled()``
        says the job stops anyway. Returns the seconds it took (0.0: nothing waited)."""
        if not self._counts[INTERACTIVE] or threading.get_ident() != self._thread.ident:
            return 0.0
        t0 = time.perf_counter()
        saved = list(shared.cached_tokens) if shared is not None else None
        while True:
            while (job := self._take(INTERACTIVE, block=False)) is not None:
                self._execute(job)
            # A job that stops now needs no cache: the backend's own record of it stays true.
            if saved is None or cancelled() or restore_cache(shared, saved, self.interactive_waiting):
                return time.perf_counter() - t0


class Checkpoint:
    """What a generation gets as its cancel flag. ``generate`` calls ``is_set()``
    between decode steps and prefill chunks: for a background request that is
    also where it lets waiting interactive work go first (``shared``: the
    backend it shares with them, None when it runs on a context of its own),
    and where its speculative ``engine`` (if any) gets its draft length capped
    while a person is active. Then it reports the request's own cancel flag."""

    def __init__(self, scheduler: Scheduler, ticket: Ticket, engine: Any = None, shared: Backend | None = None):
        self.scheduler, self.ticket, self.engine, self.shared = scheduler, ticket, engine, shared
        self._max_draft = getattr(engine, "max_draft", None)

    def is_set(self) -> bool:
        ticket = self.ticket
        if ticket.priority == BACKGROUND:
            if self.scheduler.interactive_waiting():
                spent = self.scheduler.yield_point(self.shared, self._cancelled)
                if spent:
                    ticket.yields += 1
                    ticket.yielded_s += spent
            if self._max_draft is not None:  # read by the engine before each draft
                self.engine.max_draft = (min(self._max_draft, BACKGROUND_DRAFT_CAP)
                                         if self.scheduler.person_active() else self._max_draft)
        return self._cancelled()

    def _cancelled(self) -> bool:
        return self.ticket.cancel is not None and self.ticket.cancel.is_set()


def prefill_in_steps(backend: Backend, prompt: list[int], checkpoint: Checkpoint) -> None:
    """For a background request, before ``generate``: bring the cache to all of
    ``prompt`` but its last token, ``YIELD_CHUNK`` tokens at a time, calling
    ``checkpoint.is_set()`` between chunks (where it yields). ``generate``'s own
    prefill then reuses it. Stops when cancelled; leaves a prompt that does not
    fit to ``generate``, which says so."""
    if len(prompt) >= backend.info.context_length:
        return
    target = list(prompt[:-1])
    backend.truncate(common_prefix(backend.cached_tokens, target))
    for i in range(len(backend.cached_tokens), len(target), YIELD_CHUNK):
        if checkpoint.is_set():
            return
        backend.forward(target[i:i + YIELD_CHUNK])


def restore_cache(backend: Backend, tokens: list[int], interrupted: Callable[[], bool] = lambda: False) -> bool:
    """Bring ``backend``'s KV cache back to exactly ``tokens``: keep the prefix it
    still shares with them, evaluate the rest in small chunks. Stops early (False)
    when ``interrupted()`` says so between chunks; called again, it goes on."""
    backend.truncate(common_prefix(backend.cached_tokens, tokens))
    n = len(backend.cached_tokens)  # a cache that could not be cut there was cleared
    for i in range(n, len(tokens), YIELD_CHUNK):
        if i > n and interrupted():
            return False
        backend.forward(tokens[i:i + YIELD_CHUNK])
    return True


class ModelWorker:
    """A backend instance, its model, and its scheduler's single thread."""

    def __init__(self, key: str, spec: ModelSpec, backend: Backend, options: LoadOptions, *,
                 max_queued: int = DEFAULT_MAX_QUEUED, second_context: Callable[["ModelWorker"], bool] | None = None):
        self.key = key  # the name clients use for it
        self.spec = spec
        self.backend = backend
        self.options = options
        self.info: ModelInfo | None = None
        self.state = "loading"  # loading | ready | failed | unloaded
        self.error: str | None = None
        self.loaded_at: float | None = None
        self.last_used = time.monotonic()
        self.active = 0  # jobs queued or running
        self.holds = 0  # requests using this model, from the registry's get() to their end
        self.retired = False  # replaced or being unloaded: takes no new requests
        self.requests_done = 0
        self.tokens_generated = 0
        self.last_request: dict[str, Any] | None = None  # finish_reason, tokens, ... of the latest reply
        # Keep-alive (set by the registry): seconds it stays loaded once idle (None: forever),
        # when it will unload (wall clock; None while busy or kept), and the timer.
        self.keep_alive: float | None = None
        self.unload_at: float | None = None
        self.unload_timer: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Models this one uses (speculative-decoding draft models), by file; loaded,
        # driven and unloaded on this worker's thread.
        self.companions: dict[str, Backend] = {}
        # What a decode step and a verify batch cost on this model, measured by
        # speculative decoding and kept for the model's life.
        self.costs = CostModel()
        self.scheduler = Scheduler(key, max_queued=max_queued)
        # Background work's own instance of the model, made on first use if ``second_context``
        # (asked on the model thread) says memory allows; else background work shares ``backend``.
        # (Draft models are shared: the draft drafter brings its cache in step before each draft.)
        self.background_backend: Backend | None = None
        self._second_context = second_context
        self._second_asked = False

    @property
    def remote(self) -> bool:
        """Whether a server generates for this model (a ``ChatBackend``: ``backend: remote``).
        Its requests go to ``assistant.daemon.remote_chat`` instead of the token loop: no
        tokens, logits, drafters, second context or local memory here."""
        return isinstance(self.backend, ChatBackend)

    # -- running work ----------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any, ticket: Ticket | None = None) -> T:
        """Run ``fn(*args)`` on this model's thread when the scheduler gives it its turn.
        Raises ``Busy``, ``WorkerClosed``, or ``Withdrawn`` once ``ticket.cancel`` is set
        while the job still waits."""
        return await self._run(fn, args, ticket or _CONTROL, None)

    async def _run(self, fn: Callable[..., T], args: tuple, ticket: Ticket, priority: int | None) -> T:
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, ticket, ticket.priority if priority is None else priority, loop)
        if isinstance(ticket.cancel, CancelFlag) and ticket.cancel.is_set():
            raise Withdrawn()
        self.scheduler.submit(job)
        self._busy(+1)
        stop = (ticket.cancel.listen(lambda: loop.call_soon_threadsafe(self._withdraw, job))
                if isinstance(ticket.cancel, CancelFlag) else (lambda: None))
        try:
            return await job.future
        except asyncio.CancelledError:
            self.scheduler.withdraw(job)
            raise
        finally:
            stop()
            self._busy(-1)
            self.last_used = time.monotonic()

    def _withdraw(self, job: _Job) -> None:
        if not job.future.done() and self.scheduler.withdraw(job):
            job.future.set_exception(Withdrawn())

    def checkpoint(self, ticket: Ticket, engine: Any = None, backend: Backend | None = None) -> Checkpoint:
        """The cancel flag to hand ``generate`` for ``ticket``'s request, decoding on
        ``backend`` (default: the model's; see ``backend_for``) with ``engine`` (a
        SpeculativeEngine, or None); see ``Checkpoint``."""
        backend = self.backend if backend is None else backend
        return Checkpoint(self.scheduler, ticket, engine, shared=backend if backend is self.backend else None)

    def backend_for(self, ticket: Ticket) -> Backend:
        """On the model thread: the instance ``ticket``'s job decodes on. Background work
        gets a second one (loaded here, the first time, if memory allows)."""
        if ticket.priority != BACKGROUND or self.remote:
            return self.backend
        if not self._second_asked:
            self._second_asked = True
            self.background_backend = self._load_second()
        return self.background_backend or self.backend

    def _load_second(self) -> Backend | None:
        try:
            if self._second_context is None or not self._second_context(self):
                return None
            second = type(self.backend)()
            second.load(str(self.spec.path), self.options)
        except Exception:  # noqa: BLE001 - background work shares the one context instead
            log.exception("%s: no second context for background work", self.key)
            return None
        log.info("%s: background work has a context of its own", self.key)
        return second

    # -- holding and idling (the registry's bookkeeping) ------------------------------------

    @property
    def idle(self) -> bool:
        """No request holds it and no job waits or runs."""
        return self.holds == 0 and self.active == 0

    def hold(self) -> None:
        self.holds += 1
        self._changed()

    def release(self) -> None:
        self.holds = max(0, self.holds - 1)
        self._changed()

    def _busy(self, delta: int) -> None:
        self.active += delta
        self._changed()

    def _changed(self) -> None:
        if self.idle:
            self._idle.set()
        else:
            self._idle.clear()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def cancel_unload_timer(self) -> None:
        if self.unload_timer is not None:
            self.unload_timer.cancel()
            self.unload_timer = None
        self.unload_at = None

    # -- loading -------------------------------------------------------------------------

    async def load(self) -> ModelInfo:
        try:
            # A remote model's "path" is its server's URL (``spec.path`` shows it without credentials).
            where = self.spec.url if self.spec.remote else str(self.spec.path)
            self.info = await self.run(self.backend.load, where, self.options)
        except BaseException as exc:
            self.state, self.error = "failed", str(exc)
            raise
        self.state, self.loaded_at = "ready", time.time()
        return self.info

    async def unload(self) -> None:
        """Unload after every job already queued (of any priority); then stop the thread."""
        self.cancel_unload_timer()
        if self.state == "unloaded":
            return
        try:
            await self._run(self._unload_now, (), _CONTROL, DRAIN)
        except WorkerClosed:
            pass
        # Not reached when cancelled: the state stays and a later unload() goes on.
        self.state = "unloaded"
        self.scheduler.close()

    def _unload_now(self) -> None:
        self.backend.unload()
        if self.background_backend is not None:
            self.background_backend.unload()
            self.background_backend = None
        for companion in list(self.companions.values()):
            companion.unload()
        self.companions.clear()

    def matches(self, backend: str | None, context: int | None, threads: int | None = None) -> bool:
        """Whether this loaded model serves a request for ``backend``, ``context`` and
        ``threads`` (None: any). "auto" keeps whatever backend the model runs on: it was
        chosen for this machine. A size counts as met when it is what the load was asked
        for or what it got (a context is capped at the model's training context)."""
        info = self.info
        wanted_backend = backend in (None, "", "auto") or backend == self.backend.name
        wanted_ctx = context is None or context == self.options.n_ctx or (
            info is not None and info.context_length == context)
        wanted_threads = threads is None or threads == self.options.n_threads or (
            info is not None and info.n_threads == threads)
        return wanted_backend and wanted_ctx and wanted_threads

    # -- reporting -------------------------------------------------------------------------

    def record(self, stats: dict[str, Any]) -> None:
        """Account a finished generation (shown by ``status``)."""
        self.requests_done += 1
        self.tokens_generated += stats.get("completion_tokens") or 0
        self.last_request = {k: stats.get(k) for k in ("finish_reason", "completion_tokens", "prompt_tokens",
                                                       "cached_prompt_tokens", "tokens_per_second", "ttft_ms")}

    def describe(self) -> dict[str, Any]:
        running = self.scheduler.running[-1:]  # a slice: the model thread may pop meanwhile
        data: dict[str, Any] = {
            "name": self.key,
            "path": str(self.spec.path),
            "backend": self.backend.name,
            "state": self.state,
            "active_requests": self.active,
            "requests_held": self.holds,
            "queued": self.scheduler.queued(),
            "running": running[-1].ticket.priority_name if running else None,
            "background_context": self.background_backend is not None,
            "requests_done": self.requests_done,
            "tokens_generated": self.tokens_generated,
            "last_request": self.last_request,
            **self._keep_alive_view(),
        }
        if self.error:
            data["error"] = self.error
        if self.info is not None:
            data["info"] = self.info.to_dict()
        return data

    def _keep_alive_view(self) -> dict[str, Any]:
        """When it will unload: ``keep_alive_s`` (-1: never), ``unload_at`` (Unix time) and
        ``unload_in_s``; the last two are null while it is in use or kept forever."""
        left = None if self.unload_at is None else round(max(0.0, self.unload_at - time.time()), 1)
        return {"keep_alive_s": -1 if self.keep_alive is None else self.keep_alive,
                "unload_at": None if self.unload_at is None else round(self.unload_at, 3),
                "unload_in_s": left}
