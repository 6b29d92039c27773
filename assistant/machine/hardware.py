"""What machine are we on, and what follows from that.

:func:`probe` gathers facts into a :class:`Machine`. The decisions made from
it are pure functions of a ``Machine`` plus their other arguments, so tests
and ``assistant doctor`` can feed in any machine they like: the sizing ones
(:func:`pick_threads`, :func:`pick_context`, :func:`fits_in_memory`) live in
``backends.sizing``, where backends use them on the :func:`figures` the
daemon hands them, and are imported here for doctor; the backend choice is
``assistant.machine.choice``.
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

from backends.base import MachineFigures
from backends.sizing import fits_in_memory, parse_meminfo, pick_context, pick_threads

__all__ = ["Machine", "backend_availability", "figures", "fits_in_memory", "parse_cpuinfo", "parse_meminfo",
           "pick_context", "pick_threads", "probe"]

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


def figures(machine: Machine) -> MachineFigures:
    """What a backend needs of ``machine`` to size a load, as plain values (``LoadOptions.machine``)."""
    return MachineFigures(physical_cores=machine.physical_cores, logical_cores=machine.logical_cores,
                          ram_total_bytes=machine.ram_total_bytes, ram_available_bytes=machine.ram_available_bytes,
                          performance_cores=machine.performance_cores)


# --------------------------------------------------------------------------
# Probing (never raises: every fact falls back to None or os.cpu_count())


def probe() -> Machine:
    """Describe this machine. Cheap (no imports of native libraries) and never raises."""
    system = (platform.system() or "unknown").lower()
    arch = _normalize_arch(platform.machine())
    hostname = _safe(socket.gethostname, "") or platform.node()
    fallback = max(1, os.cpu_count() or 1)
    facts: dict[str, Any] = {"cpu_model": None, "chip": None, "performance_cores": None, "physical_cores": fallback,
                             "logical_cores": fallback, "ram_total_bytes": None, "ram_available_bytes": None,
                             "apple_silicon": False, "gpu": []}
    if system == "linux":
        facts.update(_linux_facts(fallback))
    elif system == "darwin":
        facts.update(_darwin_facts(fallback))
    if facts["ram_total_bytes"] is None:
        facts["ram_total_bytes"] = _safe(lambda: os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None)
    facts["physical_cores"] = max(1, facts["physical_cores"])
    facts["logical_cores"] = max(1, facts["logical_cores"])
    return Machine(os=system, arch=arch, platform_tag=f"{system}-{arch}", hostname=hostname,
                   unified_memory=facts["apple_silicon"], **facts)


def _linux_facts(fallback: int) -> dict[str, Any]:
    """Cores and memory usable by this process (affinity, cgroup limits), and GPUs, from /proc and /sys."""
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
    gpu = []
    if shutil.which("nvidia-smi") or os.path.exists("/proc/driver/nvidia"):
        gpu.append("cuda")
    if os.path.exists("/dev/kfd"):
        gpu.append("rocm")
    return {"cpu_model": cpu_model, "physical_cores": physical, "logical_cores": logical,
            "ram_total_bytes": total, "ram_available_bytes": available, "gpu": gpu}


def _darwin_facts(fallback: int) -> dict[str, Any]:
    """The chip, its cores (P-cores apart), memory and Metal, from sysctl and vm_stat."""
    apple = _sysctl("hw.optional.arm64") == "1"
    chip = _sysctl("machdep.cpu.brand_string")
    return {"apple_silicon": apple, "chip": chip, "cpu_model": chip,
            "physical_cores": _int(_sysctl("hw.physicalcpu")) or fallback,
            "logical_cores": _int(_sysctl("hw.logicalcpu")) or fallback,
            "performance_cores": _int(_sysctl("hw.perflevel0.physicalcpu")) if apple else None,
            "ram_total_bytes": _int(_sysctl("hw.memsize")), "ram_available_bytes": _safe(_darwin_available_bytes, None),
            "gpu": ["metal"] if apple else []}


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
# Which backends are installed (for doctor: without importing them)


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
