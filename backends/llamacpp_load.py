"""Loading a GGUF file into llama.cpp: the checks on the file, the model and
context parameters, and the reason for each choice (``ModelInfo.choices``).

The backend (``backends.llamacpp``) checks the path with :func:`gguf_path`
(cheap: also what ``check_model`` runs) and calls :func:`open_model`, which
does the rest in order: :func:`load_model` (weights, mmapped),
:func:`plan_context` (threads, context size, batch, flash attention, KV cache
types, sliding window), :func:`create_context`, the batch, the MTP draft
context (``llamacpp_mtp``), the vocabulary (``llamacpp_vocab``) and the chat
template, and hands back a :class:`LoadedModel` that owns all of them.

A separate MTP drafter (``LoadOptions.mtp_model``: Gemma 4's
``gemma4-assistant``) is checked against the target's header
(``mtp_pairing``) and its weights loaded *before* the target's, so a drafter
that does not pair, is not a GGUF file or is truncated is refused before
anything of the target is loaded; its context (``llamacpp_mtp_assistant``)
is made once the target's exists.

A media projector (``LoadOptions.mmproj``, else a ``mmproj-*.gguf`` beside the
model that pairs with it: ``mmproj_pairing``) is checked against the model's
header before anything loads too: a configured one that does not belong to
the model is refused naming both files; one found beside it that does not is
passed over (``choices["media"]`` says why). Its libmtmd context
(``llamacpp_media``) is made once the model's context exists, and says which
media the model then reads (``ModelInfo.modalities``).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import chat_template, sizing
from .base import LoadOptions, ModelInfo, ModelLoadError
from .gguf import GGUF_MAGIC
from .llamacpp_media import MediaContext
from .llamacpp_mtp import MtpContext, open_mtp
from .llamacpp_mtp_assistant import AssistantContext, load_assistant_model
from .mmproj_pairing import check_projector, find_sibling
from .mtp_pairing import check_assistant
from .llamacpp_native import LOG_TAIL, explain_load_failure, llama_said
from .llamacpp_vocab import LlamaVocab

DEFAULT_N_BATCH = 512

# KV cache types a caller may ask for (extra={"kv_type": ...}): ggml_type ids.
KV_CACHE_TYPES = {"f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2}


# -- the file ------------------------------------------------------------------


def check_gguf_header(path: Path) -> None:
    """Fail early, with a message a person understands, on files that are not GGUF."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(24)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise ModelLoadError(f"model file {path} is empty (0 bytes); was the download interrupted?")
    magic = head[:4]
    if magic != GGUF_MAGIC:
        if magic in (b"lmgg", b"fmgg", b"tjgg", b"ggml", b"ggmf", b"ggjt"):
            raise ModelLoadError(
                f"{path} is an old GGML model file, not GGUF; llama.cpp only loads GGUF "
                "(convert it with llama.cpp's convert scripts)"
            )
        raise ModelLoadError(
            f"{path} is not a GGUF model file (a GGUF file starts with the bytes {GGUF_MAGIC!r})"
        )
    if len(head) < 24:
        raise ModelLoadError(f"model file {path} is truncated: only {size} bytes, the GGUF header alone needs 24")
    version = int.from_bytes(head[4:8], "little")
    if version not in (1, 2, 3):
        raise ModelLoadError(f"{path} is GGUF version {version}, which this llama.cpp does not know (expected 1-3)")


def gguf_path(path: str, *, folder_hint: str = "") -> Path:
    """``path`` (``~`` expanded) once it is known to be an existing GGUF file;
    ModelLoadError otherwise. ``folder_hint`` ends the message for a folder."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"model path {p} is a directory, not a GGUF file{folder_hint}")
    check_gguf_header(p)
    return p


def nextn_layers(path: Path) -> int:
    """``{arch}.nextn_predict_layers`` from the GGUF header (0 when absent)."""
    from .gguf import read_metadata

    try:
        meta = read_metadata(path)
    except ModelLoadError:
        return 0  # llama.cpp will say what is wrong with the file
    arch = meta.get("general.architecture")
    value = meta.get(f"{arch}.nextn_predict_layers", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# -- the model -----------------------------------------------------------------


def load_model(C, path: Path, extra: dict[str, Any]):
    """The llama_model (weights are mmapped: cheap until used); ModelLoadError
    saying what llama.cpp found wrong when it cannot load the file."""
    mparams = C.llama_model_default_params()
    if "n_gpu_layers" in extra:
        mparams.n_gpu_layers = int(extra["n_gpu_layers"])
    # Multi-token-prediction (NextN) layers are loaded only when asked for;
    # ask where the file has them, unless extra={"mtp": False}.
    if bool(extra.get("mtp", True)) and hasattr(mparams, "load_mtp") and nextn_layers(path) > 0:
        mparams.load_mtp = True
    LOG_TAIL.clear()
    model = C.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
    if not model:
        raise ModelLoadError(explain_load_failure(path))
    return model


def meta_str(C, model, key: str) -> str | None:
    """A GGUF metadata value of the loaded model as text (None when absent)."""
    buf = ctypes.create_string_buffer(256)
    n = C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    if n < 0:
        return None
    if n >= len(buf):
        buf = ctypes.create_string_buffer(n + 1)
        C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", "replace")


def ftype_name(C, ftype: int) -> str | None:
    """llama.cpp's name for a file type ("Q4_K - Medium"...), None where the binding has none."""
    try:
        name = C.llama_ftype_name(ftype)
    except AttributeError:
        return None
    return name.decode("utf-8", "replace") if name else None


# -- the context -----------------------------------------------------------------


@dataclass
class ContextPlan:
    """What the context is created with (``cparams``), and what the backend keeps of it."""

    cparams: Any  # llama_context_params
    n_threads: int
    n_batch: int
    n_swa: int  # the model's sliding window (0: none)
    swa_full: bool  # a full-size cache for the SWA layers (truncate exact at any point)


def plan_context(C, model, arch: str, path: Path, options: LoadOptions, extra: dict[str, Any],
                 choices: dict[str, str], projector: Path | None = None) -> ContextPlan:
    """The context parameters, from the options, else from the machine's
    figures; ``choices`` gets the reasons (threads, context, kv_cache)."""
    machine = options.machine or sizing.measure()
    if options.n_threads:
        n_threads = int(options.n_threads)
        choices["threads"] = f"{n_threads}: set in config"
    else:
        n_threads, choices["threads"] = sizing.pick_threads(machine)
    n_ctx, choices["context"] = _context_size(C, model, arch, path, options, machine, projector)
    n_batch = min(int(options.n_batch or DEFAULT_N_BATCH), n_ctx)

    cparams = C.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = n_batch
    cparams.n_ubatch = n_batch
    cparams.n_seq_max = 1
    cparams.n_threads = n_threads
    cparams.n_threads_batch = int(extra.get("n_threads_batch", n_threads))
    cparams.no_perf = True
    # Flash attention: llama.cpp's "auto" (on for CPU). extra={"flash_attn": False} turns it off.
    if extra.get("flash_attn") is not None:
        cparams.flash_attn_type = 1 if extra["flash_attn"] else 0
    kv_type = extra.get("kv_type")
    if kv_type is not None:
        cparams.type_k, cparams.type_v = kv_cache_types(kv_type)
        choices["kv_cache"] = f"{kv_type}: asked for by the caller"
    # Sliding-window models (Gemma 3) keep only the last n_swa positions
    # in their SWA layers, so truncate() could not go back more than a few
    # tokens. A full-size SWA cache makes truncate exact at any point;
    # extra={"swa_full": False} trades that for memory.
    n_swa = int(C.llama_model_n_swa(model)) if hasattr(C, "llama_model_n_swa") else 0
    swa_full = bool(extra.get("swa_full", True))
    cparams.swa_full = swa_full
    return ContextPlan(cparams, n_threads, n_batch, n_swa, swa_full)


def _context_size(C, model, arch: str, path: Path, options: LoadOptions, machine,
                  projector: Path | None = None) -> tuple[int, str]:
    """(context size, why): the config's, else what fits the machine beside the weights:
    the memory plan's largest context when ``extra["memory_plan"]`` (the daemon's
    loads; ``projector``, the one this load uses, counted), else the simple rule
    (file size + a full-layer KV per token)."""
    requested = int(options.n_ctx) if options.n_ctx else None
    if requested is not None and requested < 16:
        raise ModelLoadError(f"context size {requested} is too small (at least 16 tokens)")
    train_ctx = int(C.llama_model_n_ctx_train(model))
    extra = options.extra or {}
    if extra.get("memory_plan"):  # the daemon asks for it: weights, drafter, KV by layer kind, compute
        drafting = bool(extra.get("mtp", True))  # drafting off: the drafter is not loaded
        plan = extra["memory_plan"] if isinstance(extra["memory_plan"], dict) else {}
        extra = {**extra, "memory_plan": {**plan, "mmproj": str(projector) if projector else None}}
        return sizing.pick_context_for_load(machine, path, train_ctx=train_ctx, requested=requested, extra=extra,
                                            n_batch=options.n_batch,
                                            mtp_model=options.mtp_model if drafting else None)
    n_head = max(1, int(C.llama_model_n_head(model)))
    n_embd = int(C.llama_model_n_embd(model))
    head_k = int(meta_str(C, model, f"{arch}.attention.key_length") or n_embd // n_head)
    head_v = int(meta_str(C, model, f"{arch}.attention.value_length") or n_embd // n_head)
    n_layer = int(C.llama_model_n_layer(model))
    n_head_kv = int(C.llama_model_n_head_kv(model))
    kv_bytes_per_token = n_layer * n_head_kv * (head_k + head_v) * 2  # f16 K and V
    return sizing.pick_context(
        machine,
        train_ctx=train_ctx,
        model_bytes=path.stat().st_size,
        kv_bytes_per_token=kv_bytes_per_token,
        requested=requested,
    )


def kv_cache_types(kv_type: Any) -> tuple[int, int]:
    """(type_k, type_v) for extra={"kv_type": "TYPE" or "K/V"} (f16, bf16, q8_0, q4_0).

    f16 is llama.cpp's default. With f16 (or f32) K the CPU flash attention
    splits a one-token step's KV across threads once the cache passes 256
    tokens, so a batched verify row is never bit-identical to the one-token
    step; with any other K type it is. The daemon asks for "q8_0/f16" when
    speculative decoding is on: measured here (SmolLM2, 2 threads) plain
    decoding is as fast as with f16/f16 (+5%) and verify batches cost what
    f16's do (bf16 K/V: plain 10% slower; q8_0 V: batches 25% dearer). See
    assistant/inference/speculative/.
    """
    k_name, _, v_name = str(kv_type).partition("/")
    v_name = v_name or k_name
    if k_name not in KV_CACHE_TYPES or v_name not in KV_CACHE_TYPES:
        raise ModelLoadError(f"unknown KV cache type {kv_type!r}; expected TYPE or K/V with types "
                             f"{', '.join(KV_CACHE_TYPES)}")
    return KV_CACHE_TYPES[k_name], KV_CACHE_TYPES[v_name]


def create_context(C, model, plan: ContextPlan, path: Path):
    """The llama_context (the KV cache is allocated here); ModelLoadError when it cannot be made."""
    LOG_TAIL.clear()
    ctx = C.llama_init_from_model(model, plan.cparams)
    if not ctx:
        raise ModelLoadError(
            f"llama.cpp could not create a {plan.cparams.n_ctx}-token context for {path}: "
            + (llama_said() or "unknown error (out of memory?)")
        )
    return ctx


# -- all of it -------------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model llama.cpp loaded, with all that was made for it. The backend
    drives it; :meth:`free` frees it, and nothing of it may be used after."""

    C: Any  # the llama_cpp.llama_cpp module
    model: Any
    ctx: Any
    batch: Any  # a llama_batch of plan.n_batch rows, one sequence
    plan: ContextPlan
    vocab: LlamaVocab
    mtp: MtpContext | AssistantContext | None  # the MTP draft context: NextN layers or an assistant model
    mtp_why: str  # why there is one, or none
    template: Any  # the compiled chat template
    info: ModelInfo
    media: MediaContext | None = None  # the projector's libmtmd context (images, audio), if any

    def free(self) -> None:
        """Free the projector's context, the MTP context, the batch, the context and the model."""
        _free(self.C, self.mtp, self.batch, self.ctx, self.model, self.media)
        self.mtp = self.batch = self.ctx = self.model = self.media = None


def _one_sequence(batch, n_batch: int) -> None:
    """Every row of the batch in sequence 0, once: forward() sets only tokens, positions and logits flags."""
    for i in range(n_batch):
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0


def _free(C, mtp: MtpContext | AssistantContext | None, batch, ctx, model, media: MediaContext | None = None) -> None:
    """Free what was made, in the reverse order of making (None: not made)."""
    if media is not None:
        media.free()
    if mtp is not None:
        mtp.free()
    if batch is not None:
        C.llama_batch_free(batch)
    if ctx is not None:
        C.llama_free(ctx)
    if model is not None:
        C.llama_model_free(model)


def open_model(C, path: Path, options: LoadOptions, backend: str) -> LoadedModel:
    """Load the GGUF file at ``path`` (checked with :func:`gguf_path`) with its
    context, batch, MTP draft context, vocabulary and chat template; on any
    failure all that was made is freed again."""
    extra = dict(options.extra or {})
    projector, projector_why, configured = _projector_first(path, options, extra)
    drafter_path, drafter_model = _assistant_first(C, path, options, extra)
    try:
        model = load_model(C, path, extra)
    except BaseException:
        if drafter_model is not None:
            C.llama_model_free(drafter_model)
        raise
    ctx = batch = mtp = media = None
    try:
        vocab = LlamaVocab(C, model, path)
        arch = meta_str(C, model, "general.architecture") or "unknown"
        choices: dict[str, str] = {}
        plan = plan_context(C, model, arch, path, options, extra, choices, projector)
        ctx = create_context(C, model, plan, path)
        batch = C.llama_batch_init(plan.n_batch, 0, 1)
        _one_sequence(batch, plan.n_batch)
        if drafter_model is not None:
            mtp = AssistantContext(C, drafter_model, ctx, plan.cparams, drafter_path)
            drafter_model = None  # the context owns it now
            choices["mtp"] = mtp_why = mtp.describe()
        else:
            mtp, mtp_why = open_mtp(C, model, ctx, plan.cparams, arch, extra, choices)
            if options.mtp_model and mtp is None:
                choices["mtp"] = mtp_why = (f"MTP drafter {options.mtp_model} not loaded: the model was "
                                            "loaded with drafting off")
        media, choices["media"] = _open_media(C, model, plan, projector, projector_why, configured, extra)
        raw = C.llama_model_chat_template(model, None)
        own = raw.decode("utf-8", "replace") if raw else None
        template, compiled, source = chat_template.choose_template(
            own, arch, options.chat_template, choices, model=str(extra.get("name") or path.stem))
        info = ModelInfo(
            name=str(extra.get("name") or path.stem),
            path=str(path),
            backend=backend,
            architecture=arch,
            context_length=int(C.llama_n_ctx(ctx)),
            train_context_length=int(C.llama_model_n_ctx_train(model)),
            vocab_size=vocab.n_vocab,
            chat_template=template,
            template_source=source,
            bos_token_id=vocab.bos,
            eos_token_ids=vocab.eog_ids,
            size_bytes=path.stat().st_size,
            quantization=ftype_name(C, int(C.llama_model_ftype(model))),
            n_threads=plan.n_threads,
            n_params=int(C.llama_model_n_params(model)),
            choices=choices,
            modalities=["text"] + [k for k in ("image", "audio") if media is not None and k in media.kinds],
        )
    except BaseException:
        _free(C, mtp, batch, ctx, model, media)
        if drafter_model is not None:
            C.llama_model_free(drafter_model)
        raise
    return LoadedModel(C, model, ctx, batch, plan, vocab, mtp, mtp_why, compiled, info, media)


def _projector_first(path: Path, options: LoadOptions, extra: dict[str, Any]) -> tuple[Path | None, str, bool]:
    """(the projector to load, why, whether it was configured), decided from headers
    before anything is loaded: ``options.mmproj`` (ModelLoadError naming both files
    when it does not belong to the model), else the first ``mmproj-*.gguf`` beside
    the model that pairs with it; none with ``extra={"media": False}``."""
    if not extra.get("media", True):
        why = "off (loaded with media off)"
        return None, why + (f"; projector {options.mmproj} not loaded" if options.mmproj else ""), False
    if options.mmproj:
        projector = Path(os.path.expanduser(str(options.mmproj)))
        check_projector(path, projector)
        return projector, "configured (mmproj)", True
    found, lines = find_sibling(path)
    if found is not None:
        return Path(found), "found beside the model", False
    why = "text only: no projector configured (mmproj) and no mmproj-*.gguf beside the model that pairs with it"
    return None, why + (" (" + "; ".join(lines) + ")" if lines else ""), False


def _open_media(C, model, plan: ContextPlan, projector: Path | None, why: str, configured: bool,
                extra: dict[str, Any]) -> tuple[MediaContext | None, str]:
    """(the projector's libmtmd context or None, the ``media`` choice line). A
    configured projector libmtmd refuses fails the load; one found beside the
    model is passed over, saying why."""
    if projector is None:
        return None, why
    use_gpu = bool(C.llama_supports_gpu_offload()) and int(extra.get("n_gpu_layers", 1)) != 0
    try:
        media = MediaContext.open(model, projector, n_threads=plan.n_threads, use_gpu=use_gpu,
                                  flash_attn_type=getattr(plan.cparams, "flash_attn_type", None))
    except ModelLoadError as exc:
        if configured:
            raise
        return None, f"text only: {projector.name}, found beside the model, was not loaded: {exc}"
    return media, f"{media.describe()} ({why})"


def _assistant_first(C, path: Path, options: LoadOptions, extra: dict[str, Any]) -> tuple[Path | None, Any]:
    """(the drafter's path, its llama_model) for ``options.mtp_model``, checked
    against the target's header and loaded before the target; (None, None)
    when there is none or drafting is off. ModelLoadError naming what is wrong."""
    if not options.mtp_model or not extra.get("mtp", True):
        return None, None
    drafter = Path(os.path.expanduser(str(options.mtp_model)))
    check_assistant(path, drafter)  # missing, not GGUF, or not this target's: refused here
    return drafter, load_assistant_model(C, drafter, extra)
