"""How many threads and how much context a model gets on a machine.

Pure functions of :class:`~backends.base.MachineFigures` plus the model's own
numbers, each returning a human reason alongside the value, because "why did
it pick that?" is the first question a user asks. They live here, below the
application, so a backend sizes its load from plain figures and depends on
nothing above it; ``assistant doctor`` uses the same functions (through
``assistant.machine.hardware``) to predict what a load will pick.

:func:`pick_context` is the simple rule a backend used alone applies (the
model file and a per-token KV size). :func:`pick_context_planned` sizes the
context from the whole memory plan (``backends.memory_plan``: weights, MTP
drafter, KV cache with sliding-window layers as they are, projector, compute,
OS headroom): the daemon's ``context: auto`` (``extra["memory_plan"]``).

Any object with MachineFigures' attributes will do as ``machine``:
``assistant.machine.hardware.Machine`` has the same names.

:func:`measure` is for a backend used on its own (no daemon to hand it the
figures): a cheap, rougher look at this machine with the standard library.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from . import memory_plan as mp
from .base import MachineFigures
from .gguf import GGUFHeader, read_header

DEFAULT_CONTEXT_CAP = 4096
MIN_CONTEXT = 512
# Share of the RAM left after the model that the KV cache may take; the rest
# stays with the OS and the user's other programs.
KV_RAM_FRACTION = 0.5
_CONTEXT_STEP = 256  # shrunk contexts are rounded down to a multiple of this


def pick_threads(machine: MachineFigures) -> tuple[int, str]:
    """Decode threads for llama.cpp and why: one per physical core, at least 1.

    Decoding is memory-bound and threads meet at a barrier every step, so
    hyperthread siblings and efficiency cores add nothing or slow it down.
    """
    if machine.physical_cores is None:  # measured without a probe: only the logical CPUs are known
        n = max(1, machine.logical_cores or 1)
        return n, f"{n} logical CPU{'s' * (n != 1)} (physical cores unknown: one thread per logical CPU)"
    physical = max(1, machine.physical_cores or machine.logical_cores or 1)
    perf = machine.performance_cores
    if perf and 0 < perf < physical:
        # llama.cpp itself counts only P-cores on macOS, for the same reason.
        return perf, (f"{perf} performance cores of {physical} (the efficiency cores would slow "
                      f"every decode step down to their pace)")
    if physical <= 4:
        return physical, f"all {physical} physical core{'s' * (physical != 1)} (with 4 or fewer, none is left spare)"
    extra = (f" of {machine.logical_cores} logical; hyperthreads add no decoding speed"
             if machine.logical_cores > physical else "")
    return physical, f"{physical} physical cores ({'one thread per core' + extra})"


def pick_context(
    machine: MachineFigures,
    *,
    train_ctx: int,
    model_bytes: int,
    kv_bytes_per_token: int | None,
    requested: int | None,
) -> tuple[int, str]:
    """Context size in tokens and why.

    A requested size is used as is, capped at the training context. Otherwise
    min(train_ctx, 4096), shrunk (in steps of 256, never below 512) until the
    KV cache fits in half of the RAM that is available once the model is
    loaded. ``train_ctx <= 0`` means unknown; ``kv_bytes_per_token`` None
    means the memory check is skipped.
    """
    if requested is not None:
        if train_ctx > 0 and requested > train_ctx:
            return train_ctx, (f"{train_ctx}: {requested} was requested but the model was trained "
                               f"on {train_ctx} tokens, so it is capped there")
        return requested, f"{requested}: set in config"

    if train_ctx <= 0:
        ctx, why = DEFAULT_CONTEXT_CAP, f"the default {DEFAULT_CONTEXT_CAP} (training context unknown)"
    elif train_ctx > DEFAULT_CONTEXT_CAP:
        ctx, why = DEFAULT_CONTEXT_CAP, (f"the default cap {DEFAULT_CONTEXT_CAP} (the model was trained "
                                         f"on {train_ctx}; set context: to use more)")
    else:
        ctx, why = train_ctx, f"the model's training context {train_ctx}"
    floor = min(MIN_CONTEXT, ctx)

    available = machine.ram_available_bytes
    if not kv_bytes_per_token or available is None:
        return ctx, f"{ctx}: {why}"
    budget = (available - model_bytes) * KV_RAM_FRACTION
    fit = int(budget // kv_bytes_per_token) if budget > 0 else 0
    if fit >= ctx:
        return ctx, f"{ctx}: {why}; its KV cache ({_size(ctx * kv_bytes_per_token)}) fits in memory"
    shrunk = max(floor, fit // _CONTEXT_STEP * _CONTEXT_STEP)
    need = _size(ctx * kv_bytes_per_token)
    if budget <= 0:
        room = (f"the model ({_size(model_bytes)}) leaves no room in {_size(available)} of available RAM")
    else:
        room = (f"a {ctx}-token KV cache needs {need} but only {_size(budget)} is budgeted "
                f"(half of the {_size(available - model_bytes)} available after the {_size(model_bytes)} model)")
    at_floor = " (the minimum)" if shrunk == floor and fit < floor else ""
    return shrunk, f"{shrunk}{at_floor}: reduced from {ctx}; {room}"


def fits_in_memory(machine: MachineFigures, model_bytes: int, kv_bytes: int) -> tuple[bool, str]:
    """Whether the model plus its KV cache fit in the RAM available now, and the figures."""
    need = model_bytes + kv_bytes
    parts = f"{_size(need)} (model {_size(model_bytes)} + KV cache {_size(kv_bytes)})"
    available, total = machine.ram_available_bytes, machine.ram_total_bytes
    if available is None and total is None:
        return True, f"needs {parts}; RAM size unknown, assuming it fits"
    if available is None:
        ok = need <= total
        return ok, f"needs {parts} of {_size(total)} total RAM (free RAM unknown)"
    if need <= available:
        return True, f"needs {parts}; {_size(available)} available"
    hint = ("close other programs, or use a smaller model or context" if total is None or need <= total
            else "more than this machine has; use a smaller model or quantization, or a smaller context")
    of_total = f" of {_size(total)}" if total is not None else ""
    return False, f"needs {parts} but only {_size(available)}{of_total} is available: {hint}"


# --------------------------------------------------------------------------
# The context from the memory plan (backends.memory_plan): the daemon's `context: auto`


def pick_context_planned(machine: MachineFigures, header: GGUFHeader, *, train_ctx: int, requested: int | None,
                         options: mp.PlanOptions) -> tuple[int, str, mp.MemoryPlan]:
    """(context, why, the MemoryPlan at that context) from the whole plan: the
    weights, the drafter, the KV cache, a projector, compute buffers and the
    OS headroom against the machine's RAM.

    A requested size is used as is (capped at the training context) and the
    reason says when its plan does not fit. Otherwise the largest context up
    to the training context (at least 512) whose plan fits; with the RAM
    unknown, min(train_ctx, 4096) as :func:`pick_context` picks it.
    """
    if requested is not None:
        ctx, why = pick_context(machine, train_ctx=train_ctx, model_bytes=0, kv_bytes_per_token=None,
                                requested=requested)
        plan = mp.build_plan(header, machine, ctx, options)
        return ctx, why + ("" if plan.fits is not False else f"; it does not fit: {plan.verdict()}"), plan
    ceiling = train_ctx if train_ctx > 0 else DEFAULT_CONTEXT_CAP
    unknown = machine.ram_total_bytes is None and machine.ram_available_bytes is None
    if unknown:
        ctx, why = pick_context(machine, train_ctx=train_ctx, model_bytes=0, kv_bytes_per_token=None, requested=None)
        return ctx, why + " (RAM size unknown)", mp.build_plan(header, machine, ctx, options)
    plan = mp.largest_context(header, machine, options, ceiling=ceiling, floor=MIN_CONTEXT)
    trained = f"trained on {train_ctx}" if train_ctx > 0 else "training context unknown"
    if plan.context == ceiling and plan.fits:
        what = "the model's training context" if train_ctx > 0 else f"the default {DEFAULT_CONTEXT_CAP}"
        return plan.context, f"{plan.context}: {what}; its memory plan fits ({_needs(plan)})", plan
    if plan.fits:
        why = f"{plan.context}: the largest context whose memory plan fits ({trained}; {_needs(plan)})"
        return plan.context, why, plan
    return plan.context, f"{plan.context} (the minimum): even this does not fit: {plan.verdict()}", plan


def _needs(plan: mp.MemoryPlan) -> str:
    return f"it needs {_size(plan.needed)} of the {_size(plan.limit)} the load may take"


def pick_context_for_load(machine: MachineFigures, path, *, train_ctx: int, requested: int | None, extra: dict,
                          n_batch: int | None = None, mtp_model: str | None = None) -> tuple[int, str]:
    """:func:`pick_context_planned` for a GGUF file loaded with ``LoadOptions``'
    ``extra`` / ``n_batch`` / ``mtp_model`` (a ``mmproj-*.gguf`` beside the file
    that pairs with it is counted too). What the llama.cpp backend calls when the
    daemon asks for the plan (``extra["memory_plan"]``). Raises ModelLoadError for a
    file (or drafter) whose header cannot be read."""
    header = read_header(path)
    projector = mp.find_projector(path, header)
    options = mp.PlanOptions.for_load(extra, n_batch=n_batch, mtp_model=mtp_model,
                                      mmproj=str(projector) if projector else None)
    ctx, why, _ = pick_context_planned(machine, header, train_ctx=train_ctx, requested=requested, options=options)
    return ctx, why


# --------------------------------------------------------------------------
# Measuring, for a backend used without the daemon


def measure() -> MachineFigures:
    """This machine's figures from the standard library alone; never raises.

    Rougher than ``assistant.machine.hardware.probe`` (which the daemon
    uses): physical cores, performance cores and cgroup limits are not looked
    into, so the physical core count is None."""
    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on macOS
        logical = os.cpu_count() or 1
    total = _sysconf_bytes("SC_PHYS_PAGES")
    available = _sysconf_bytes("SC_AVPHYS_PAGES")  # free pages only: MemAvailable below is better
    try:
        meminfo = parse_meminfo(Path("/proc/meminfo").read_text())
    except OSError:
        meminfo = {}
    return MachineFigures(physical_cores=None, logical_cores=max(1, logical),
                          ram_total_bytes=meminfo.get("MemTotal", total),
                          ram_available_bytes=meminfo.get("MemAvailable", available))


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {field: bytes} (the kernel writes kB, meaning KiB)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _sysconf_bytes(pages: str) -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf(pages)
    except (ValueError, OSError, AttributeError):  # a name this OS does not have
        return None


def _size(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
