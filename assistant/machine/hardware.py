"""What machine are we on, and what follows from that.

:func:`probe` gathers facts into a :class:`Machine`; every decision
(:func:`pick_threads`, :func:`pick_context`, :func:`fits_in_memory`,
:func:`choose_backend`) is a pure function of a ``Machine`` plus its other
arguments, so tests and ``assistant doctor`` can feed in any machine they
like. Each decision returns a human reason alongside the value, because
"why did it pick that?" is the first question a user asks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from assistant.config import BACKENDS

DEFAULT_CONTEXT_CAP = 4096
MIN_CONTEXT = 512
# Share of the RAM left after the model that the KV cache may take; the rest
# stays with the OS and the user's other programs.
KV_RAM_FRACTION = 0.5
_CONTEXT_STEP = 256  # shrunk contexts are rounded down to a multiple of this

_T = TypeVar("_T")


@dataclass
class Machine:
    """Facts about the machine; None where a fact could not be found out."""

    os: str  # "linux", "darwin", ...
    arch: str  # "x86_64", "arm64", ... (aarch64 is reported as arm64)
    platform_tag: str  # f"{os}-{arch}"
    hostname: str
    cpu_model: str | None
    physical_cores: int  # usable by this process (affinity, cgroup quota)
    logical_cores: int
    ram_total_bytes: int | None  # capped by a cgroup memory limit
    ram_available_bytes: int | None
    apple_silicon: bool  # true even for an x86_64 Python under Rosetta
    chip: str | None  # e.g. "Apple M2 Pro"
    gpu: list[str] = field(default_factory=list)  # "metal", "cuda", "rocm"
    # Apple Silicon: the P-cores (hw.perflevel0.physicalcpu); None elsewhere.
    performance_cores: int | None = None
    # CPU and GPU share one memory (Apple Silicon): a model on the GPU uses the RAM counted above.
    unified_memory: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for ``assistant doctor --json`` and logs."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------
# Probing (never raises: every fact falls back to None or os.cpu_count())


def probe() -> Machine:
    """Describe this machine. Cheap (no imports of native libraries) and never raises."""
    system = (platform.system() or "unknown").lower()
    arch = _normalize_arch(platform.machine())
    hostname = _safe(socket.gethostname, "") or platform.node()
    fallback = max(1, os.cpu_count() or 1)
    cpu_model = chip = perf = None
    physical = logical = fallback
    total = available = None
    apple = False
    gpu: list[str] = []

    if system == "linux":
        affinity = _safe(lambda: set(os.sched_getaffinity(0)), None)
        cpuinfo = _safe(lambda: Path("/proc/cpuinfo").read_text(errors="replace"), "")
        cpu_model, physical_found = parse_cpuinfo(cpuinfo, affinity)
        physical_found = physical_found or _safe(lambda: _sysfs_physical_cores(affinity), None)
        logical = len(affinity) if affinity else fallback
        physical = min(physical_found or logical, logical)
        quota = _safe(_cgroup_cpu_limit, None)
        if quota is not None:
            logical = min(logical, quota)
            physical = min(physical, quota)
        meminfo = _safe(lambda: parse_meminfo(Path("/proc/meminfo").read_text()), {})
        total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
        limit, used = _safe(_cgroup_memory, (None, None))
        if limit is not None:
            total = min(total, limit) if total else limit
            if used is not None:
                free_in_cgroup = max(0, limit - used)
                available = min(available, free_in_cgroup) if available is not None else free_in_cgroup
        if shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia"):
            gpu.append("cuda")
        if os.path.exists("/dev/kfd"):
            gpu.append("rocm")
    elif system == "darwin":
        apple = _sysctl("hw.optional.arm64") == "1"
        chip = cpu_model = _sysctl("machdep.cpu.brand_string")
        physical = _int(_sysctl("hw.physicalcpu")) or fallback
        logical = _int(_sysctl("hw.logicalcpu")) or fallback
        perf = _int(_sysctl("hw.perflevel0.physicalcpu")) if apple else None
        total = _int(_sysctl("hw.memsize"))
        available = _safe(_darwin_available_bytes, None)
        if apple:
            gpu.append("metal")

    if total is None:
        total = _safe(lambda: os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None)
    return Machine(
        os=system,
        arch=arch,
        platform_tag=f"{system}-{arch}",
        hostname=hostname,
        cpu_model=cpu_model,
        physical_cores=max(1, physical),
        logical_cores=max(1, logical),
        ram_total_bytes=total,
        ram_available_bytes=available,
        apple_silicon=apple,
        chip=chip,
        gpu=gpu,
        performance_cores=perf,
        unified_memory=apple,
    )


def parse_cpuinfo(text: str, allowed: set[int] | None = None) -> tuple[str | None, int | None]:
    """(CPU model, physical cores) from /proc/cpuinfo text.

    Physical cores are the unique (physical id, core id) pairs among the
    processors in ``allowed`` (all when None); None when the file has no such
    ids (common on ARM), so the caller can fall back.
    """
    model = None
    cores: set[tuple[str, str]] = set()
    for block in text.split("\n\n"):
        info = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip().lower()] = value.strip()
        # x86 says "model name"; ARM boards put "Hardware" or "Model" in a trailing block.
        for key in ("model name", "cpu model", "hardware", "model"):
            if model is None and info.get(key) and not info[key].isdigit():
                model = info[key]
        if "physical id" in info and "core id" in info and "processor" in info:
            try:
                if allowed is not None and int(info["processor"]) not in allowed:
                    continue
            except ValueError:
                pass
            cores.add((info["physical id"], info["core id"]))
    return model, (len(cores) or None)


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as {field: bytes} (the kernel writes kB, meaning KiB)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(\w+):\s+(\d+)(?:\s+kB)?", line)
        if m:
            out[m.group(1)] = int(m.group(2)) * (1024 if line.rstrip().endswith("kB") else 1)
    return out


def _sysfs_physical_cores(allowed: set[int] | None) -> int | None:
    base = Path("/sys/devices/system/cpu")
    cores = set()
    for cpu in base.glob("cpu[0-9]*"):
        n = int(cpu.name[3:])
        if allowed is not None and n not in allowed:
            continue
        topo = cpu / "topology"
        # cluster_id keeps big.LITTLE clusters that reuse core ids apart.
        key = tuple((topo / name).read_text().strip() for name in
                    ("physical_package_id", "cluster_id", "core_id") if (topo / name).exists())
        if key:
            cores.add(key)
    return len(cores) or None


def _cgroup_dirs() -> list[Path]:
    """This process's cgroup v2 directory and its ancestors (limits can sit on any of them)."""
    root = Path("/sys/fs/cgroup")
    rel = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and not controllers:
            rel = path
    out = []
    d = root / rel.lstrip("/")
    while True:
        if d.is_dir():
            out.append(d)
        if d == root or root not in d.parents:
            break
        d = d.parent
    return out


def _cgroup_cpu_limit() -> int | None:
    """CPUs allowed by a cgroup quota (docker --cpus), rounded up; None when unlimited."""
    limits = []
    for d in _cgroup_dirs():
        f = d / "cpu.max"
        if f.exists():
            quota, period = f.read_text().split()[:2]
            if quota != "max":
                limits.append(int(quota) / int(period))
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").exists():
        quota = int((v1 / "cpu.cfs_quota_us").read_text())
        if quota > 0:
            limits.append(quota / int((v1 / "cpu.cfs_period_us").read_text()))
    return max(1, math.ceil(min(limits))) if limits else None


def _cgroup_memory() -> tuple[int | None, int | None]:
    """(limit, usage without reclaimable file cache) of a cgroup memory limit; (None, None) if none."""
    best: tuple[int | None, int | None] = (None, None)
    candidates = [(d / "memory.max", d / "memory.current", d / "memory.stat") for d in _safe(_cgroup_dirs, [])]
    v1 = Path("/sys/fs/cgroup/memory")
    candidates.append((v1 / "memory.limit_in_bytes", v1 / "memory.usage_in_bytes", v1 / "memory.stat"))
    for limit_f, usage_f, stat_f in candidates:
        if not limit_f.exists():
            continue
        raw = limit_f.read_text().strip()
        # v1 writes a huge number (about 2**63) for "no limit".
        if raw == "max" or int(raw) >= 2**60:
            continue
        limit = int(raw)
        if best[0] is not None and best[0] <= limit:
            continue
        usage = _safe(lambda: int(usage_f.read_text()), None)
        if usage is not None:
            stat = _safe(lambda: parse_meminfo(stat_f.read_text().replace(" ", ": ")), {})
            # Page cache is counted in usage but the kernel gives it back on demand.
            usage -= stat.get("inactive_file", stat.get("total_inactive_file", 0))
        best = (limit, usage)
    return best


def _darwin_available_bytes() -> int | None:
    out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
    m = re.search(r"page size of (\d+) bytes", out)
    pages = dict(re.findall(r"^Pages (free|inactive|speculative):\s+(\d+)", out, re.M))
    if not m or not pages:
        return None
    # free + inactive (+ speculative) is what macOS can hand out without swapping.
    return int(m.group(1)) * sum(int(v) for v in pages.values())


def _sysctl(name: str) -> str | None:
    try:
        r = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (r.stdout.strip() or None) if r.returncode == 0 else None


def _normalize_arch(machine: str) -> str:
    m = machine.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "aarch64": "arm64", "arm64e": "arm64"}.get(m, m or "unknown")


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _safe(fn: Callable[[], _T], default: _T) -> _T:
    # A probe must not take the daemon down: odd /proc files, sandboxes and
    # missing tools all just mean "don't know".
    try:
        return fn()
    except Exception:
        return default


# --------------------------------------------------------------------------
# Decisions (pure functions of a Machine)


def pick_threads(machine: Machine) -> tuple[int, str]:
    """Decode threads for llama.cpp and why: one per physical core, at least 1.

    Decoding is memory-bound and threads meet at a barrier every step, so
    hyperthread siblings and efficiency cores add nothing or slow it down.
    """
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
    machine: Machine,
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


def fits_in_memory(machine: Machine, model_bytes: int, kv_bytes: int) -> tuple[bool, str]:
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


def backend_availability() -> dict[str, tuple[bool, str]]:
    """{backend: (installed?, why)}; looks for the packages without importing them."""
    result = {}
    found = _find("llama_cpp")
    result["llama.cpp"] = ((True, f"llama-cpp-python found ({found})") if found else
                           (False, "llama-cpp-python is not installed (pip install llama-cpp-python)"))
    mlx_lm, mlx = _find("mlx_lm"), _find("mlx")
    if mlx_lm and mlx:
        result["mlx"] = (True, f"mlx-lm found ({mlx_lm})")
    else:
        missing = " and ".join(n for n, f in (("mlx-lm", mlx_lm), ("mlx", mlx)) if not f)
        result["mlx"] = (False, f"{missing} not installed (pip install 'local-assistant[mlx]')")
    return result


def choose_backend(machine: Machine, requested: str, available: dict[str, tuple[bool, str]]) -> tuple[str, str]:
    """(backend, reason) for a configured ``backend`` value.

    ``auto`` picks mlx on darwin-arm64 when it is available, llama.cpp
    otherwise. A pinned backend is returned even if unavailable: reporting
    that is the caller's job, with ``available``'s reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r} (known: {', '.join(BACKENDS)})")
    if requested != "auto":
        return requested, "pinned in config"
    mlx_ok, mlx_why = available.get("mlx", (False, "not checked"))
    if machine.os == "darwin" and machine.arch == "arm64":
        if mlx_ok:
            return "mlx", "auto: Apple Silicon (darwin-arm64) with mlx-lm installed"
        return "llama.cpp", f"auto: Apple Silicon, but MLX is unavailable ({mlx_why}); llama.cpp runs on Metal"
    if machine.os == "darwin" and machine.apple_silicon:
        return "llama.cpp", (f"auto: Apple Silicon, but this Python is {machine.arch} (Rosetta), which "
                             f"MLX does not support; install a native arm64 Python to use MLX")
    return "llama.cpp", f"auto: llama.cpp on {machine.platform_tag} (MLX is only picked on Apple Silicon)"


def _find(module: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin:
        return str(Path(spec.origin).parent)
    locations = list(spec.submodule_search_locations or [])  # a namespace package
    return locations[0] if locations else module


def _size(n: float) -> str:
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"
