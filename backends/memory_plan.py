"""The memory a model load takes, line by line, from GGUF headers alone.

A plan is data: named lines with bytes (weights, the MTP drafter, the KV
cache at a given context, a media projector, compute buffers, headroom for
the OS) and the machine's RAM to hold them against. :func:`build_plan` makes
one from a header, the machine's figures, a context size and
:class:`PlanOptions`; :func:`largest_context` finds the largest context
whose plan fits. ``assistant doctor`` prints a plan; the daemon's
``context: auto`` loads at the context it picks (``backends.sizing``).

The figures follow llama.cpp (as vendored in llama-cpp-python 0.3.36) and
are checked against its own accounting (a ``no_alloc`` load reports the
buffers it would allocate; tests/test_memory_plan.py):

- weights: every tensor's data (whole ggml blocks), as in the file;
- KV cache (src/llama-kv-cache*.cpp): per layer that has KV (Gemma 4's
  shared-KV layers, ``attention.shared_kv_layers``, have none; a
  ``gemma4-assistant`` drafter has none of its own: it reads the target's),
  K and V rows of ``head_count_kv x key_length`` (the sliding layers'
  ``key_length_swa``) per cell. Full-attention layers hold ``n_ctx`` cells;
  sliding-window layers hold ``n_ctx`` with a full-size SWA cache
  (``swa_full``, what the llama.cpp backend uses so that ``truncate`` is exact),
  else ``pad256(window + n_ubatch)``. Without flash attention V rows are
  padded to the widest layer's;
- compute (measured): the graph's buffer for an ``n_ubatch`` batch, mostly
  its logits (``n_ubatch x vocab`` floats) plus the attention mask over the
  cache, or without flash attention the attention scores themselves; and the
  logits kept for reading.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import ModelLoadError
from .gguf import GGUFHeader, read_header
from .llamacpp_mtp_assistant import DRAFT_N_BATCH  # the drafter context's batch, as the backend makes it

GiB = 1 << 30
MiB = 1 << 20
MIN_CONTEXT = 512
MAX_LAYERS = 4096  # more than any model has: a header claiming more is not planned
CONTEXT_STEP = 256  # contexts are picked in steps of this (llama.cpp pads SWA caches to 256 too)

# KV cache types: (values per block, bytes per block), the names backends.llamacpp_load accepts
KV_TYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
            "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18)}

# Architectures whose sliding-window layers llama.cpp lays out by a fixed period when the
# file has no per-layer pattern (src/models/*.cpp: load_swa_pattern(ml, period[, dense_first])).
SWA_PERIODS = {"gemma2": (2, False), "gemma3": (6, False), "gemma-embedding": (6, False), "gemma3n": (5, False),
               "cohere2": (4, False), "openai-moe": (2, False), "gpt-oss": (2, False), "olmo2": (4, False),
               "exaone4": (4, False), "exaone-moe": (4, False), "afmoe": (4, False), "smallthinker": (4, True)}

# The OS and the user's other programs keep this share of the RAM (within the bounds below).
HEADROOM_SHARE = 0.25
HEADROOM_MIN, HEADROOM_MAX = int(1.5 * GiB), 6 * GiB
# Bytes per batch row besides the logits, per unit of hidden size: fitted to llama.cpp's compute
# buffers for the Gemma 4 12B shapes (with the masks below: -2% to +10% of them, see the tests).
_ACT_BYTES_PER_HIDDEN = 12


def os_headroom(ram_total: int | None) -> int:
    """RAM left to the OS and the user's programs: a quarter of it, 1.5 to 6 GiB."""
    if not ram_total:
        return HEADROOM_MIN
    return int(min(HEADROOM_MAX, max(HEADROOM_MIN, ram_total * HEADROOM_SHARE)))


@dataclass(frozen=True)
class PlanLine:
    """One named amount of memory and how it was counted."""

    name: str  # "weights", "drafter", "kv cache", "projector", "compute", "os headroom"
    bytes: int
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.bytes, "detail": self.detail}


@dataclass(frozen=True)
class PlanOptions:
    """How the model would be loaded. The defaults are the llama.cpp backend's:
    F16 K and V, flash attention (llama.cpp's auto: on for the CPU), a
    full-size SWA cache, 512-token batches."""

    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = True
    swa_full: bool = True
    n_ubatch: int = 512
    n_outputs: int = 1  # logits rows kept for reading (a verified draft of k tokens: k + 1)
    drafter: GGUFHeader | None = None  # a separate MTP drafter (it shares the target's context size)
    drafter_n_ubatch: int | None = None  # its context's batch; None: the target's. for_load: DRAFT_N_BATCH
    projector: GGUFHeader | None = None  # a media projector (mmproj-*.gguf)
    os_headroom: int | None = None  # None: os_headroom(RAM total)

    @classmethod
    def for_load(cls, extra: dict[str, Any], *, n_batch: int | None = None, mtp_model: str | None = None,
                 mmproj: str | None = None) -> "PlanOptions":
        """The options a llama.cpp load with ``LoadOptions.extra`` = ``extra`` uses
        (``kv_type``, ``flash_attn``, ``swa_full``; ``memory_plan`` may be a dict
        with ``mmproj``, ``os_headroom``, ``n_outputs``; its ``mmproj``, even None, is the
        projector the load uses and wins over ``mmproj``, the one found beside the
        file). Raises ModelLoadError for a drafter or projector file that cannot be read."""
        plan = extra.get("memory_plan") if isinstance(extra.get("memory_plan"), dict) else {}
        k, _, v = str(extra.get("kv_type") or "f16").partition("/")
        fa = extra.get("flash_attn")
        if "mmproj" in plan:  # the projector the load uses (a configured one), None: none
            mmproj = plan["mmproj"]
        return cls(type_k=k, type_v=v or k, flash_attn=True if fa is None else bool(fa),
                   swa_full=bool(extra.get("swa_full", True)), n_ubatch=int(n_batch or 512),
                   n_outputs=int(plan.get("n_outputs", 1)),
                   drafter=read_header(mtp_model) if mtp_model else None,
                   drafter_n_ubatch=DRAFT_N_BATCH if mtp_model else None,
                   projector=read_header(mmproj) if mmproj else None,
                   os_headroom=plan.get("os_headroom"))


@dataclass(frozen=True)
class MemoryPlan:
    """What loading a model at ``context`` tokens takes, against the machine's RAM.

    ``needed`` is every line but the OS headroom; the plan ``fits`` when
    ``needed`` is within ``limit``: the RAM less the headroom, and no more than
    the RAM available now (when known)."""

    context: int
    lines: tuple[PlanLine, ...]
    ram_total: int | None
    ram_available: int | None
    options: PlanOptions = field(repr=False, compare=False, default=PlanOptions())

    def line(self, name: str) -> PlanLine | None:
        return next((ln for ln in self.lines if ln.name == name), None)

    @property
    def headroom(self) -> int:
        h = self.line("os headroom")
        return h.bytes if h else 0

    @property
    def needed(self) -> int:
        return sum(ln.bytes for ln in self.lines) - self.headroom

    @property
    def total(self) -> int:
        return self.needed + self.headroom

    @property
    def limit(self) -> int | None:
        """The most the load may take: RAM total less the headroom, capped at the RAM available."""
        limits = [x for x in (self.ram_total - self.headroom if self.ram_total else None, self.ram_available)
                  if x is not None]
        return min(limits) if limits else None

    @property
    def fits(self) -> bool | None:
        """None when the machine's RAM is unknown."""
        return None if self.limit is None else self.needed <= self.limit

    def verdict(self) -> str:
        """One sentence: the total against the machine."""
        return f"{size(self.total)} {self.against_ram()}"

    def against_ram(self) -> str:
        """The total's verdict: "of 16.00 GiB RAM, ... available now: fits (the load may take ...)"."""
        if self.limit is None:
            return f"(of which {size(self.headroom)} for the OS); RAM size unknown"
        ram = f"of {size(self.ram_total)} RAM" if self.ram_total else "of RAM"
        now = f", {size(self.ram_available)} available now" if self.ram_available is not None else ""
        word = "fits" if self.fits else "does NOT fit"
        return f"{ram}{now}: {word} (the load may take {size(self.limit)})"

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "lines": [ln.to_dict() for ln in self.lines], "needed": self.needed,
                "total": self.total, "ram_total": self.ram_total, "ram_available": self.ram_available,
                "limit": self.limit, "fits": self.fits}


# -- the lines ------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionLayer:
    """One layer's KV cache row: whether it slides, and its K and V widths (values per cell)."""

    swa: bool
    k_width: int
    v_width: int
    has_kv: bool = True


def attention_layers(header: GGUFHeader) -> tuple[list[AttentionLayer], int] | None:
    """(per-layer KV rows, the sliding window or 0) from the metadata, as llama.cpp
    lays them out; None when the header lacks what is needed."""
    n_layer = _int(header.arch_key("block_count"))
    if not 0 < n_layer <= MAX_LAYERS:
        return None  # a damaged or hostile header: no plan rather than a huge loop
    try:
        n_embd = int(header.arch_key("embedding_length"))
        heads = _per_layer(header.arch_key("attention.head_count"), n_layer)
        kv_heads = _per_layer(header.arch_key("attention.head_count_kv", heads), n_layer)
        k_full = int(header.arch_key("attention.key_length", n_embd // max(1, heads[0])))
        v_full = int(header.arch_key("attention.value_length", n_embd // max(1, heads[0])))
        k_swa = int(header.arch_key("attention.key_length_swa", k_full) or k_full)
        v_swa = int(header.arch_key("attention.value_length_swa", v_full) or v_full)
    except (TypeError, ValueError, IndexError):
        return None
    if min(k_full, v_full, k_swa, v_swa, *kv_heads) < 0:
        return None
    window = _int(header.arch_key("attention.sliding_window"))
    swa = _swa_pattern(header, n_layer) if window > 0 else [False] * n_layer
    shared = _int(header.arch_key("attention.shared_kv_layers"))
    layers = []
    for i in range(n_layer):
        k, v = (k_swa, v_swa) if swa[i] else (k_full, v_full)
        layers.append(AttentionLayer(swa[i], kv_heads[i] * k, kv_heads[i] * v, has_kv=i < n_layer - shared))
    return layers, (window if any(swa) else 0)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _per_layer(value: Any, n: int) -> list[int]:
    """A per-layer count: an array of n, or one number for all."""
    if isinstance(value, list):
        if len(value) != n:
            raise ValueError("per-layer array of the wrong length")
        return [int(x) for x in value]
    return [int(value)] * n


def _swa_pattern(header: GGUFHeader, n: int) -> list[bool]:
    """Which layers slide: the file's pattern (a bool per layer, or a period), else the
    architecture's fixed period; an architecture not known here counts as all full."""
    pattern = header.arch_key("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n:
        return [bool(x) for x in pattern]
    period, dense_first = SWA_PERIODS.get(header.arch or "", (1, False))
    if isinstance(pattern, int) and not isinstance(pattern, bool):
        period = pattern
    if period <= 1:  # llama.cpp: period 0 = all sliding; 1 = none (and an unknown architecture)
        return [period == 0] * n
    if dense_first:
        return [i % period != 0 for i in range(n)]
    return [i % period < period - 1 for i in range(n)]


def _row_bytes(kv_type: str, width: int) -> int:
    per, size_ = KV_TYPES.get(kv_type, KV_TYPES["f16"])
    return -(-width // per) * size_


def kv_cells(n_ctx: int) -> int:
    """Cells of a full-attention cache: llama.cpp rounds the context up to a multiple of 256."""
    return -(-n_ctx // 256) * 256


def swa_cells(n_ctx: int, window: int, options: PlanOptions) -> int:
    """Cells of the sliding-window cache (llama_kv_cache_iswa): all of them with a full-size one."""
    if options.swa_full:
        return n_ctx
    return min(n_ctx, -(-(window + options.n_ubatch) // 256) * 256)


def kv_cache_line(header: GGUFHeader, n_ctx: int, options: PlanOptions) -> PlanLine | None:
    """The KV cache at ``n_ctx`` tokens; None when the header does not say enough."""
    found = attention_layers(header)
    if found is None:
        return None
    layers, window = found
    kv = [ly for ly in layers if ly.has_kv]
    base = kv_cells(n_ctx)
    v_max = max((ly.v_width for ly in kv), default=0)
    total, parts = 0, []
    for swa in (False, True):
        group = [ly for ly in kv if ly.swa == swa]
        if not group:
            continue
        cells = swa_cells(base, window, options) if swa else base
        row = sum(_row_bytes(options.type_k, ly.k_width)
                  + _row_bytes(options.type_v, ly.v_width if options.flash_attn else v_max) for ly in group)
        total += row * cells
        kind = f"sliding (window {window})" if swa else "full"
        parts.append(f"{len(group)} {kind} x {cells} cells")
    if len(kv) < len(layers):
        parts.append(f"{len(layers) - len(kv)} layers reuse others' KV")
    detail = f"{', '.join(parts) or 'no layer of its own'}; K {options.type_k}, V {options.type_v}"
    return PlanLine(f"kv cache @{n_ctx}", total, detail)


def compute_bytes(header: GGUFHeader, n_ctx: int, options: PlanOptions) -> int:
    """llama.cpp's CPU compute buffer for a batch of ``n_ubatch`` rows, plus the
    logits kept for reading (its output buffer)."""
    vocab = header.vocab_size or 0
    hidden = _int(header.arch_key("embedding_length"))
    rows = max(1, min(options.n_ubatch, n_ctx))
    found = attention_layers(header)
    window = found[1] if found else 0
    cells = kv_cells(n_ctx)
    mask_cells = cells + (swa_cells(cells, window, options) if window else 0)
    graph = rows * (vocab * 4 + _ACT_BYTES_PER_HIDDEN * hidden)
    if options.flash_attn:
        mask = mask_cells * rows * 2  # an F16 mask; the scores stay in per-thread tiles
    else:  # the scores of every head over the whole cache, and Q / the output rows beside them
        mask = mask_cells * rows * 4
        count = header.arch_key("attention.head_count", 1)
        heads = max(count) if isinstance(count, list) and count else _int(count) or 1
        head_dim = max(_int(header.arch_key("attention.key_length")), _int(header.arch_key("attention.key_length_swa")),
                       hidden // max(1, heads))
        graph = max(graph, rows * cells * heads * 4 + 5 * rows * heads * head_dim * 4)
    return graph + mask + vocab * 4 * max(1, options.n_outputs)


def _weights_detail(header: GGUFHeader) -> str:
    kinds = ", ".join(f"{k} {size(v)}" for k, v in list(header.bytes_by_type().items())[:4])
    unknown = f"; types not counted: {', '.join(header.unknown_types)}" if header.unknown_types else ""
    return f"{len(header.tensors)} tensors ({kinds}){unknown}"


def build_plan(header: GGUFHeader, machine: Any, context: int, options: PlanOptions = PlanOptions()) -> MemoryPlan:
    """The plan for loading the model of ``header`` at ``context`` tokens on
    ``machine`` (anything with MachineFigures' ``ram_total_bytes`` and
    ``ram_available_bytes``). A header whose KV layout cannot be read gets a
    KV line of 0 bytes that says so."""
    lines = [PlanLine("weights", header.tensor_bytes, _weights_detail(header))]
    compute = compute_bytes(header, context, options)
    compute_detail = f"{min(options.n_ubatch, context)}-token batches over a {header.vocab_size}-token vocabulary"
    if options.drafter is not None:
        d = options.drafter
        lines.append(PlanLine("drafter", d.tensor_bytes, f"{d.path.name}: {_weights_detail(d)}"))
        drafter_kv = kv_cache_line(d, context, options)
        if drafter_kv is not None and drafter_kv.bytes:
            lines.append(PlanLine("drafter kv cache", drafter_kv.bytes, drafter_kv.detail))
        d_options = options if options.drafter_n_ubatch is None else _with_ubatch(options, options.drafter_n_ubatch)
        extra = compute_bytes(d, context, d_options)
        compute += extra
        compute_detail += f"; the drafter's context {size(extra)} of it"
    kv = kv_cache_line(header, context, options)
    lines.append(kv or PlanLine(f"kv cache @{context}", 0, "unknown: the header lacks the attention shapes"))
    if options.projector is not None:
        p = options.projector
        lines.append(PlanLine("projector", p.tensor_bytes, f"{p.path.name}: {_weights_detail(p)}"))
    fa = "flash attention" if options.flash_attn else "no flash attention"
    lines.append(PlanLine("compute", compute, f"{compute_detail}, {fa}"))
    total = getattr(machine, "ram_total_bytes", None)
    headroom = options.os_headroom if options.os_headroom is not None else os_headroom(total)
    why = "set" if options.os_headroom is not None else f"{int(HEADROOM_SHARE * 100)}% of the RAM, 1.5 to 6 GiB"
    lines.append(PlanLine("os headroom", int(headroom), f"for the OS and your other programs ({why})"))
    return MemoryPlan(context, tuple(lines), total, getattr(machine, "ram_available_bytes", None), options)


def _with_ubatch(options: PlanOptions, n_ubatch: int) -> PlanOptions:
    from dataclasses import replace

    return replace(options, n_ubatch=n_ubatch)


def largest_context(header: GGUFHeader, machine: Any, options: PlanOptions, *, ceiling: int,
                    floor: int = MIN_CONTEXT) -> MemoryPlan:
    """The plan at the largest context in ``[floor, ceiling]`` (steps of 256, and
    ``ceiling`` itself) that fits; the plan at ``floor`` when none does, and at
    ``ceiling`` when the RAM is unknown. Plans grow with the context, so this
    is a binary search."""
    floor = min(floor, ceiling)
    top = build_plan(header, machine, ceiling, options)
    if top.fits is None or top.fits:
        return top
    lo, hi = -(-floor // CONTEXT_STEP), (ceiling - 1) // CONTEXT_STEP  # candidates k * 256 below the ceiling
    best = build_plan(header, machine, floor, options)
    if not best.fits:
        return best
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = build_plan(header, machine, max(floor, mid * CONTEXT_STEP), options)
        if plan.fits:
            best, lo = plan, mid + 1
        else:
            hi = mid - 1
    return best


PROJECTOR_GLOB = "mmproj-*.gguf"


def find_projector(model_path: str | os.PathLike, header: GGUFHeader | None = None) -> Path | None:
    """The first ``mmproj-*.gguf`` beside a model file that pairs with it (a ``clip``
    projector into the model's hidden size, ``backends.mmproj_pairing``: the one
    the llama.cpp backend loads when none is configured); None when there is none.
    Never raises: a file that cannot be read is not a projector."""
    from .mmproj_pairing import find_sibling

    found, _ = find_sibling(model_path, model_header=header)
    return Path(found) if found else None


def plan_for_load(path: str | os.PathLike, n_ctx: int, extra: dict[str, Any], *, n_batch: int | None = None,
                  mtp_model: str | None = None, machine: Any = None, mmproj: str | None = None) -> MemoryPlan | None:
    """The plan for loading the GGUF file at ``path`` at ``n_ctx`` tokens as the
    llama.cpp backend would with ``LoadOptions``' ``extra`` / ``n_batch`` /
    ``mtp_model`` (``mmproj``, a configured projector, else a ``mmproj-*.gguf`` beside
    it that pairs, counted too); None when a header cannot be read."""
    try:
        header = read_header(path)
        projector = mmproj or find_projector(path, header)
        options = PlanOptions.for_load(extra, n_batch=n_batch, mtp_model=mtp_model,
                                       mmproj=str(projector) if projector else None)
    except ModelLoadError:
        return None
    return build_plan(header, machine, n_ctx, options)


def needed_bytes(path: str | os.PathLike, n_ctx: int, extra: dict[str, Any], *, n_batch: int | None = None,
                 mtp_model: str | None = None) -> int | None:
    """What loading the GGUF file at ``path`` at ``n_ctx`` tokens takes (the plan
    less the OS headroom), None when a header cannot be read."""
    plan = plan_for_load(path, n_ctx, extra, n_batch=n_batch, mtp_model=mtp_model)
    return None if plan is None else plan.needed


def size(n: float | None) -> str:
    """Bytes as people read them (binary units)."""
    if n is None:
        return "?"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            break
    return f"{n:.2f} {unit}" if unit in ("GiB", "TiB") else f"{n:.0f} {unit}"
