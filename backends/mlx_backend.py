"""The MLX backend: mlx + mlx-lm, for MLX model folders and for GGUF files.

On Apple Silicon MLX runs on the GPU (Metal) with unified memory; on Linux it
runs on ``mlx[cpu]``, which is slow (about 1.5 tokens/s for SmolLM2-135M on
2 cores) but runs the same code, so the backend is tested everywhere.
Install it with ``pip install 'local-assistant[mlx]'``. Nothing from mlx is
imported until the backend is asked whether it is available or to load a
model, so ``import backends.mlx_backend`` works without it.

Two kinds of model:

- **MLX model folders** (``config.json``, ``model*.safetensors``, tokenizer
  files), the format of the mlx-community models: loaded with mlx-lm's
  ``load_model`` (any architecture mlx-lm knows, quantized or not;
  ``backends.mlx_folder``).
- **GGUF files**, read by ``mlx.core.load`` (tensors plus metadata), so one
  file serves both backends: Q4_0, Q4_1, Q8_0, F16 and F32 tensors of the
  ``llama`` and ``gemma3`` architectures, renamed onto mlx-lm's model classes
  with llama.cpp's conversion changes undone (``backends.mlx_gguf``); the
  tokenizer is rebuilt from the file's own vocabulary (``backends.tokenizer``)
  and the chat template comes from ``tokenizer.chat_template``: no torch, no
  transformers models, no hub.

The KV cache is mlx-lm's ``KVCache``, one per layer, in full: for models with
sliding-window layers (Gemma 3) the window is applied by the attention mask
rather than by a rotating cache, so ``truncate`` can cut the cache back to any
point, as the speculative engine needs (like llama.cpp's ``swa_full``).
``forward`` runs the transformer once per chunk and applies the output
projection only to the rows asked for.

Gemma 4 (``gemma4`` folders, the layout mlx-community publishes, and
``gemma4_text``) loads through mlx-lm; ``backends.mlx_gemma4`` has what is
particular to it (KV-shared layers, the soft-capped head). Its MTP drafter,
a separate ``gemma4_assistant`` model (``LoadOptions.mtp_model``), runs
through mlx-vlm (the ``[vlm]`` extra) over this backend's cache and hidden
states (``backends.mlx_mtp``): ``mtp_support``, ``mtp_kind`` and
``mtp_draft``, as on llama.cpp.

Gemma 4 folders that hold its vision and audio towers (the mlx-community
multimodal conversions) read images and audio natively: the towers load
through mlx-vlm beside mlx-lm's text model, and each medium's soft tokens run
through the text model on this backend's cache (``backends.mlx_media``):
``media_support``, ``tokenize_media`` and ``forward_media``, as on llama.cpp.

The pieces: ``mlx_native`` (the lazy import, what is installed),
``mlx_folder`` and ``mlx_gguf`` (checking and loading each kind of model);
this module holds :func:`inspect_model` and the backend: choices at load
time, the tokenizer, ``forward`` and ``truncate``.

Numbers: on a CPU, float16 runs about 25 times slower than float32 in MLX
(measured here: 0.06 vs 1.6 tokens/s for SmolLM2), so on a CPU every floating
tensor, quantization scales included, is cast to float32; on a GPU they stay
as stored.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import chat_template, mlx_gemma4, mlx_media, mlx_mtp, sizing
from .base import (
    Backend,
    BackendError,
    BackendUnavailable,
    LoadOptions,
    MediaError,
    ModelInfo,
    ModelLoadError,
)
from .forward_args import logit_rows, overflow_error
from .gguf import GGUF_MAGIC
from .media import CachedMedia, MediaInput, MediaPrompt, MediaSpan
from .mlx_folder import arch_module, check_folder, folder_size, folder_summary, load_folder
from .mlx_gguf import GGUF_ARCHITECTURES, GGUF_TENSOR_TYPES, check_gguf, load_gguf
from .mlx_native import INSTALL_HINT, import_mlx, installed_version, runs_on_gpu, spec_found

__all__ = ["MLXBackend", "inspect_model", "folder_summary", "GGUF_ARCHITECTURES", "GGUF_TENSOR_TYPES", "INSTALL_HINT"]

log = logging.getLogger(__name__)

DEFAULT_N_BATCH = 512

# mlx-lm model modules whose model.model(...) returns normalized hidden states
# and whose output projection is lm_head or the tied embedding (Gemma 4: see
# ``mlx_gemma4``): forward() applies the projection only to the rows asked
# for, and keeps each layer's cache in full. Others run whole.
_SPLIT_HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.gemma3_text", *mlx_gemma4.MODULES)
# Hidden rows kept after a forward for the MTP assistant: a verify batch's worth.
_HIDDEN_ROWS = 80
# Soft-token embeddings kept by content hash, so a medium seen again (the next turn after its
# cache was cut, the same image twice) is not encoded again: at most this many bytes.
_EMBED_CACHE_BYTES = 64 * 1024 * 1024


def inspect_model(path: str | Path) -> str:
    """"gguf" or "folder" when the MLX backend can try to load ``path``; ModelLoadError otherwise.

    Cheap: reads headers and JSON, not weights. The daemon calls it (through
    ``check_model``) before it unloads anything, so a bad load leaves the
    model it had in place."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ModelLoadError(f"model path not found: {p}")
    if p.is_dir():
        config = check_folder(p)
        if arch_module(str(config["model_type"])) is None:
            raise ModelLoadError(
                f"{p / 'config.json'} names architecture {config['model_type']!r}, which mlx-lm "
                f"{installed_version('mlx-lm')} does not support"
            )
        return "folder"
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{p} is neither a GGUF file (one starts with the bytes b'GGUF') nor an MLX model folder; "
            "the MLX backend loads GGUF files and folders with config.json + safetensors"
        )
    check_gguf(p)
    return "gguf"


# ---------------------------------------------------------------------------
# The backend


class MLXBackend(Backend):
    """A model in-process through MLX (one sequence, driven from one thread)."""

    name = "mlx"

    def __init__(self) -> None:
        self._model = None
        self._cache: list[Any] | None = None
        self._tok = None
        self._template = None
        self._info: ModelInfo | None = None
        self._tokens: list[int] = []
        self._split_head = False
        self._exact_cache = True
        self._mtp: mlx_mtp.MlxAssistant | None = None  # Gemma 4's assistant drafter, when one is loaded
        self._mtp_why = "no model is loaded"
        self._towers: mlx_media.Towers | None = None  # Gemma 4's vision/audio towers, when the folder has them
        self._spans = CachedMedia()  # where the media in the cache are: never cut inside one
        self._embeds: OrderedDict[str, Any] = OrderedDict()  # sha256 -> soft-token embeddings (_EMBED_CACHE_BYTES)

    # -- availability --------------------------------------------------------

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(True, "mlx VERSION + mlx-lm VERSION (device); Gemma 4 MTP assistant: mlx-vlm VERSION
        or the extra to install"), or (False, why not, naming the extra)."""
        missing = [name for name, mod in (("mlx", "mlx.core"), ("mlx-lm", "mlx_lm"), ("tokenizers", "tokenizers"))
                   if not spec_found(mod)]
        if missing:
            return False, f"{' and '.join(missing)} not installed; install the extra: {INSTALL_HINT}"
        try:
            mx, _ = import_mlx()
        except BackendUnavailable as exc:
            return False, str(exc)
        device = "GPU (Metal)" if runs_on_gpu(mx) else "CPU only, slow"
        # Said without importing mlx-vlm (slow: it imports transformers); loading a drafter checks it.
        vlm = (f"mlx-vlm {installed_version('mlx-vlm')}" if spec_found("mlx_vlm") else
               f"no mlx-vlm: {mlx_mtp.VLM_HINT}")
        return True, (f"mlx {installed_version('mlx')} + mlx-lm {installed_version('mlx-lm')} ({device}); "
                      f"Gemma 4 MTP assistant: {vlm}")

    @classmethod
    def check_model(cls, path: str) -> None:
        """Raise ModelLoadError if this backend cannot load ``path`` (headers and JSON only)."""
        inspect_model(path)

    # -- loading -------------------------------------------------------------

    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        """Load an MLX model folder or a GGUF file, replacing the model loaded before.

        ``options.extra`` may hold ``dtype`` (an mlx dtype name; default:
        float32 on a CPU, as stored on a GPU) and ``name``; every choice made,
        and why, is in ``ModelInfo.choices``. ``options.mtp_model``: a Gemma 4
        assistant folder to draft with (``backends.mlx_mtp``), checked against
        the model before anything is loaded or unloaded."""
        options = options or LoadOptions()
        mx, nn = import_mlx()
        p = Path(os.path.expanduser(str(path)))
        kind = inspect_model(p)
        if options.mmproj:
            raise ModelLoadError(
                f"mmproj ({options.mmproj}) names a llama.cpp projector; the MLX backend reads Gemma 4's vision "
                f"and audio towers from the model folder itself: remove mmproj from this model's settings")
        mtp_bytes = _check_mtp(p, kind, options.mtp_model) if options.mtp_model else 0
        if self._model is not None:
            self.unload()
        extra = dict(options.extra or {})
        on_gpu = runs_on_gpu(mx)
        dtype_name = extra.get("dtype") or ("as stored" if on_gpu else "float32")
        (model, arch, train_ctx, own_template, tok, n_params, quant), size = _read_model(mx, nn, p, kind, dtype_name)
        choices: dict[str, str] = {
            "dtype": (f"{dtype_name}: set in config" if extra.get("dtype") else
                      "as stored (GPU)" if on_gpu else
                      "float32 (MLX computes float16 about 25x slower on a CPU)"),
            **tok.notes,
        }
        n_ctx, choices["context"] = _context_size(model, dtype_name, train_ctx, size + mtp_bytes, options)
        choices["threads"] = "MLX schedules its own threads (the threads setting applies to llama.cpp)"
        source_template, compiled, source = chat_template.choose_template(
            own_template, arch, options.chat_template, choices,
            model=str(options.extra.get("name") or (p.name if p.is_dir() else p.stem)))

        self._model, self._tok, self._template = model, tok, compiled
        self._split_head = self._exact_cache = type(model).__module__ in _SPLIT_HEAD_MODULES
        self._n_ctx = n_ctx
        self._n_batch = max(1, int(options.n_batch or DEFAULT_N_BATCH))
        self._vocab = int(_vocab_size(model, tok))
        self._cache = self._new_cache()
        self._tokens = []
        self._spans.clear()
        self._towers, choices["media"] = _load_towers(p, kind, model, dtype_name)
        try:
            self._mtp, self._mtp_why = _load_assistant(model, options.mtp_model, dtype_name, choices)
        except ModelLoadError:  # a load gives both or neither
            self.unload()
            raise
        self._info = ModelInfo(
            name=str(extra.get("name") or (p.name if p.is_dir() else p.stem)),
            path=str(p), backend=self.name, architecture=arch,
            context_length=n_ctx, train_context_length=train_ctx, vocab_size=self._vocab,
            chat_template=source_template, template_source=source,
            bos_token_id=tok.bos, eos_token_ids=sorted(tok.eog, key=lambda t: (t != tok.eos, t)),
            size_bytes=size, quantization=quant, n_threads=0, n_params=n_params, choices=choices,
        )
        return self._info

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        if self._exact_cache:  # one full cache per layer that takes one (not Gemma 4's KV-shared layers)
            n = mlx_gemma4.cache_layers(self._model) if mlx_gemma4.is_gemma4(self._model) else len(self._model.layers)
            return [KVCache() for _ in range(n)]
        return make_prompt_cache(self._model)

    def unload(self) -> None:
        """Drop the model and its cache, and give MLX's buffer cache back (nothing happens when none is loaded)."""
        if self._model is None:
            return
        if self._mtp is not None:
            self._mtp.free()
        self._model = self._cache = self._tok = self._template = self._mtp = self._towers = None
        self._mtp_why = "no model is loaded"
        self._info = None
        self._tokens = []
        self._spans.clear()
        self._embeds.clear()
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # noqa: BLE001 - freeing is best effort
            pass

    def _require(self) -> None:
        if self._model is None:
            raise BackendError("no model is loaded")

    # -- tokenizer -------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to ids (``backends.tokenizer``); BOS only where the model wants one, never twice."""
        self._require()
        return self._tok.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as it appears in output text (b"" for control tokens)."""
        self._require()
        if not 0 <= token < self._tok.vocab_size:
            raise BackendError(f"token id {token} is out of range (vocabulary of {self._tok.vocab_size})")
        return self._tok.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn...)."""
        return self._tok is not None and token in self._tok.eog

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render with the config's template, the model's own or the fallback
        (``chat_template.choose_template``); extra keyword arguments are template variables."""
        self._require()
        tok = self._tok
        return chat_template.render(self._template, messages, bos_token=tok.token_text(tok.bos),
                                    eos_token=tok.token_text(tok.eos),
                                    add_generation_prompt=add_generation_prompt, **kwargs)

    # -- multi-token prediction: Gemma 4's assistant (``mlx_mtp``) ----------------

    def mtp_kind(self) -> str | None:
        """"assistant" while a Gemma 4 assistant drafter is loaded, else None."""
        return self._mtp.kind if self._mtp is not None else None

    def mtp_support(self) -> tuple[bool, str]:
        """(whether ``mtp_draft`` can draft, what drafts or why nothing can)."""
        return self._mtp is not None, self._mtp_why

    def mtp_draft(self, tokens: Sequence[int], n: int) -> list[int]:
        """Up to ``n`` greedy guesses from the assistant drafter; ``tokens`` is
        the cache plus the pending token ([] for any other state). The cache is
        left as it was: the assistant reads it and writes nothing."""
        self._require()
        if self._mtp is None:
            raise BackendError(f"model {self.info.name!r} cannot draft with MTP: {self._mtp_why}")
        N = len(self._tokens)
        if N == 0 or len(tokens) != N + 1 or tokens[N - 1] != self._tokens[-1]:
            return []
        n = min(int(n), self._n_ctx - N - 1)
        token = int(tokens[N])
        if n <= 0 or not 0 <= token < self._vocab:
            return []
        return self._mtp.draft(self._model, self._cache, N, token, n)

    # -- media: Gemma 4's vision and audio towers (``mlx_media``) -----------------

    def media_support(self) -> frozenset[str]:
        """The kinds ("image", "audio") whose tower the loaded folder holds and
        mlx-vlm could load (``ModelInfo.choices["media"]`` says why not, where not)."""
        return self._towers.kinds if self._towers is not None else frozenset()

    def media_marker(self) -> str:
        """Where a medium goes in the rendered text (the same marker as llama.cpp's mtmd)."""
        return "<__media__>"

    def tokenize_media(self, text: str, media: Sequence[MediaInput]) -> MediaPrompt:
        """The prompt ``text`` with one :meth:`media_marker` per medium: each
        medium becomes its begin token, its soft tokens (the span, as many as
        mlx-vlm's processor counts) and its end token. Every medium is decoded
        and preprocessed here (not yet encoded), so a bad file fails before the
        cache changes; one encoded before (by content hash) is not decoded again."""
        self._require()
        marker = self.media_marker()
        pieces = text.split(marker)
        if len(pieces) - 1 != len(media):
            raise MediaError(f"the prompt has {len(pieces) - 1} media markers for {len(media)} media")
        towers = self._towers
        for m in media:
            if m.kind not in self.media_support():
                raise MediaError(f"model {self.info.name!r} reads no {m.kind} natively: "
                                 f"{self.info.choices.get('media') or 'no media support'}")
        tokens = self.tokenize(pieces[0], add_bos=True)
        spans = []
        for m, piece in zip(media, pieces[1:]):
            known = self._embeds.get(m.sha256)
            if known is not None:
                self._embeds.move_to_end(m.sha256)
                medium = _Medium(m.kind, known.shape[0], None, known)
            else:
                p = towers.prepare(m.kind, m.path, _media_name(m))
                medium = _Medium(m.kind, p.n_tokens, p, None)
            begin, end = towers.tokens.around(m.kind)
            tokens.append(begin)
            span = MediaSpan(media=m, start=len(tokens), length=medium.n_tokens, n_tokens=medium.n_tokens,
                             handle=medium)
            tokens.extend([span.placeholder] * span.length)
            tokens.append(end)
            tokens.extend(self.tokenize(piece, add_bos=False))
            spans.append(span)
        return MediaPrompt(tokens=tokens, spans=spans)

    def forward_media(self, span: MediaSpan) -> None:
        """Encode the span's medium (once: the embeddings stay on ``span.handle``
        and, by content hash, on the backend) and run its soft tokens through the
        text model at the cache's end; ``span.encode_ms`` is the tower's time
        (0 when the embeddings were known). A failure rolls the cache back."""
        self._require()
        import mlx.core as mx

        medium = span.handle
        if not isinstance(medium, _Medium) or self._towers is None:
            raise MediaError("forward_media needs a span of this backend's tokenize_media")
        n0, n = len(self._tokens), span.length
        if n0 + n > self._n_ctx:
            raise overflow_error(n0, n, self._n_ctx)
        emb_dtype = mlx_gemma4.body(self._model).embed_tokens.weight.dtype
        span.encode_ms = 0.0
        if medium.embeddings is None:
            t0 = time.perf_counter()
            try:
                medium.embeddings = self._towers.encode(medium.prepared, emb_dtype)
            except MemoryError as exc:
                raise MediaError(f"not enough memory to encode {_media_name(span.media)}") from exc
            except Exception as exc:  # noqa: BLE001 - mlx raises ValueError/RuntimeError on shape or memory trouble
                raise MediaError(f"the {span.media.kind} tower failed on {_media_name(span.media)}: "
                                 f"{type(exc).__name__}: {exc}") from exc
            span.encode_ms = (time.perf_counter() - t0) * 1000.0
            medium.prepared = None
            self._remember(span.media.sha256, medium.embeddings)
        bidirectional = span.media.kind == "image" and self._towers.bidirectional
        try:
            h = mlx_media.forward_embeddings(self._model, self._cache, medium.embeddings[None], n0, bidirectional)
            keep = [c.state for c in self._cache]
            if self._mtp is not None:  # the drafter drafts from the last hidden row, a soft token's too
                keep.append(self._mtp.keep_hidden(h[0, -_HIDDEN_ROWS:], n0 + n))
            mx.eval(keep)
        except Exception as exc:
            self._rollback(n0)
            raise BackendError(f"MLX forward of {_media_name(span.media)} failed: {type(exc).__name__}: {exc}") \
                from exc
        self._tokens.extend([span.placeholder] * n)
        self._spans.add(n0, n0 + n)

    def _remember(self, sha256: str, embeddings: Any) -> None:
        """Keep ``embeddings`` by content hash, the least recently used dropped past _EMBED_CACHE_BYTES."""
        self._embeds[sha256] = embeddings
        self._embeds.move_to_end(sha256)
        while len(self._embeds) > 1 and sum(e.nbytes for e in self._embeds.values()) > _EMBED_CACHE_BYTES:
            self._embeds.popitem(last=False)

    # -- forward / truncate ------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens in the KV cache, in order (a copy)."""
        return list(self._tokens)

    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        """Append ``tokens`` to the cache; float32 logits of the rows in
        ``logits_at`` (default: the last). A failure rolls the cache back."""
        self._require()
        import mlx.core as mx

        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        n0 = len(self._tokens)
        if n0 + n > self._n_ctx:
            raise overflow_error(n0, n, self._n_ctx)
        rows = logit_rows(n, logits_at)
        toks = [int(t) for t in tokens]
        for t in toks:
            if not 0 <= t < self._vocab:
                raise BackendError(f"token id {t} is out of range (vocabulary of {self._vocab})")
        wanted = sorted(set(rows))
        got: dict[int, np.ndarray] = {}
        try:
            start = 0
            while start < n:
                m = min(self._n_batch, n - start)
                here = [r - start for r in wanted if start <= r < start + m]
                arr = self._chunk(mx.array([toks[start:start + m]], dtype=mx.int32), here, n0 + start)
                for k, r in enumerate(here):
                    got[r + start] = arr[k]
                start += m
        except Exception as exc:
            self._rollback(n0)
            if isinstance(exc, (BackendError, ValueError, IndexError)):
                raise
            raise BackendError(f"MLX forward failed: {type(exc).__name__}: {exc}") from exc
        self._tokens.extend(toks)
        return np.stack([got[r] for r in rows]).astype(np.float32, copy=False)

    def _chunk(self, x, here: list[int], pos0: int) -> np.ndarray:
        """Run the tokens ``x`` (one batch, at positions from ``pos0``) through
        the model, appending to the cache; float32 logits of the rows ``here``."""
        import mlx.core as mx

        model, cache = self._model, self._cache
        keep = []
        if self._split_head:
            body = mlx_gemma4.body(model) if mlx_gemma4.is_gemma4(model) else model.model
            h = body(x, cache=cache)
            logits = _head(model, h[0, mx.array(here)]) if here else None
            if self._mtp is not None:  # what the assistant drafts from: the rows up to the last one
                keep.append(self._mtp.keep_hidden(h[0, -_HIDDEN_ROWS:], pos0 + x.shape[1]))
        else:
            full = model(x, cache=cache)
            logits = full[0, mx.array(here)] if here else None
        keep += [c.state for c in cache]
        if logits is None:
            mx.eval(keep)
            return np.zeros((0, self._vocab), dtype=np.float32)
        logits = logits.astype(mx.float32)
        mx.eval(logits, keep)
        return np.array(logits, copy=True)

    def _rollback(self, n0: int) -> None:
        """After a failed forward: the cache back to the n0 tokens it held before."""
        if self._mtp is not None:
            self._mtp.forget()
        cache = self._cache or []
        try:
            if all(c.is_trimmable() for c in cache):
                for c in cache:
                    extra = c.offset - n0
                    if extra > 0:
                        c.trim(extra)
                del self._tokens[n0:]
                self._spans.keep(n0)
                return
        except Exception:  # noqa: BLE001
            pass
        self._cache = self._new_cache()
        self._tokens = []
        self._spans.clear()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens. A cut inside a medium keeps none
        of it (the cache is cut at its start), and a cache that cannot be cut
        there (a rotating cache of an architecture without an exact one) is
        cleared: callers read ``cached_tokens`` afterwards to see what is left."""
        self._require()
        if n < 0:
            raise ValueError("truncate(n) needs n >= 0")
        n = self._spans.cut_point(n)
        k = len(self._tokens) - n
        if k <= 0:
            return
        if n > 0 and all(c.is_trimmable() for c in self._cache):
            for c in self._cache:
                c.trim(k)
            del self._tokens[n:]
            self._spans.keep(n)
        else:
            self._cache = self._new_cache()
            self._tokens = []
            self._spans.clear()


# ---------------------------------------------------------------------------
# helpers


def _read_model(mx, nn, p: Path, kind: str, dtype_name: str):
    """((model, architecture, training context, chat template, tokenizer,
    parameter count, quantization), size in bytes): the weights loaded, cast
    to ``dtype_name`` unless it is "as stored", and evaluated."""
    try:
        if kind == "folder":
            loaded, size = load_folder(p), folder_size(p)
        else:
            loaded, size = load_gguf(mx, nn, p), p.stat().st_size
        model = loaded[0]
        if dtype_name != "as stored":
            model.set_dtype(getattr(mx, dtype_name))
        mx.eval(model.parameters())
    except (ModelLoadError, BackendUnavailable):
        raise
    except MemoryError as exc:
        raise ModelLoadError(f"not enough memory to load {p} with MLX") from exc
    except Exception as exc:  # noqa: BLE001 - mlx/mlx-lm raise ValueError, RuntimeError, KeyError...
        raise ModelLoadError(f"MLX could not load {p}: {type(exc).__name__}: {exc}") from exc
    return loaded, size


def _context_size(model, dtype_name: str, train_ctx: int, size: int, options: LoadOptions) -> tuple[int, str]:
    """(context size, why): from the options, else from the machine's figures (as llama.cpp does)."""
    machine = options.machine or sizing.measure()
    cache_bytes = 2 if dtype_name in ("as stored", "float16", "bfloat16") else 4
    kv_per_token = _kv_bytes_per_token(model, cache_bytes)
    requested = int(options.n_ctx) if options.n_ctx else None
    if requested is not None and requested < 16:
        raise ModelLoadError(f"context size {requested} is too small (at least 16 tokens)")
    return sizing.pick_context(machine, train_ctx=train_ctx, model_bytes=size,
                               kv_bytes_per_token=kv_per_token, requested=requested)


def _head(model, h):
    """Logits of the hidden rows ``h`` of a model in ``_SPLIT_HEAD_MODULES``."""
    if mlx_gemma4.is_gemma4(model):
        return mlx_gemma4.head(model, h)
    if "lm_head" in model:
        return model.lm_head(h)
    return model.model.embed_tokens.as_linear(h)


def _load_assistant(model, mtp_model: str | None, dtype_name: str,
                    choices: dict[str, str]) -> tuple[mlx_mtp.MlxAssistant | None, str]:
    """(the checked assistant drafter loaded beside ``model``, or None; what
    ``mtp_support`` says), noted in ``choices``; ModelLoadError when it fails."""
    if not mtp_model:
        return None, _no_mtp_why(model)
    import mlx.core as mx

    mtp = mlx_mtp.MlxAssistant.load(mtp_model, model, None if dtype_name == "as stored" else getattr(mx, dtype_name))
    choices["mtp"] = mtp.describe()
    return mtp, choices["mtp"]


class _Medium:
    """A span's handle: the medium preprocessed (until encoded), then its embeddings."""

    __slots__ = ("kind", "n_tokens", "prepared", "embeddings")

    def __init__(self, kind: str, n_tokens: int, prepared: Any, embeddings: Any):
        self.kind, self.n_tokens, self.prepared, self.embeddings = kind, n_tokens, prepared, embeddings


def _media_name(m: MediaInput) -> str:
    """How errors name a medium: its kind and the start of its hash (never a path a client named)."""
    return f"{m.kind} {m.sha256[:12]}"


def _load_towers(p: Path, kind: str, model, dtype_name: str) -> tuple[mlx_media.Towers | None, str]:
    """(Gemma 4's vision/audio towers from the folder, or None; what
    ``ModelInfo.choices["media"]`` says). Never fails the load: a model whose
    towers cannot load still serves text, and the choice says why."""
    if kind != "folder" or not mlx_gemma4.is_gemma4(model):
        return None, "none: the MLX backend reads images and audio natively only from Gemma 4 model folders"
    config = check_folder(p)
    kinds, why = mlx_media.probe(p, config)
    if not kinds:
        return None, f"none: {why}"
    missing = mlx_media.vlm_missing()
    if missing:
        return None, f"none: {missing}"
    import mlx.core as mx

    try:
        towers = mlx_media.Towers.load(p, config, kinds, None if dtype_name == "as stored" else getattr(mx, dtype_name))
    except MemoryError:
        return None, "none: not enough memory for the vision/audio towers"
    except Exception as exc:  # noqa: BLE001 - mlx-vlm raises ValueError, KeyError... on a broken tower
        log.warning("%s: the vision/audio towers did not load: %s", p, exc)
        return None, f"none: the towers in {p.name} did not load ({type(exc).__name__}: {exc})"
    return towers, towers.describe()


def _check_mtp(p: Path, kind: str, mtp_model: str) -> int:
    """The drafter's size in bytes; ModelLoadError unless ``mtp_model`` is a
    Gemma 4 assistant that pairs with the model at ``p``."""
    if kind != "folder":
        raise ModelLoadError(
            f"the MLX backend drafts with a Gemma 4 assistant only beside an MLX-format Gemma 4 model folder; "
            f"{p} is a GGUF file (the llama.cpp backend runs GGUF drafters such as mtp-*.gguf)")
    mlx_mtp.check_pairing(p, check_folder(p), mtp_model)
    return folder_size(Path(mtp_model).expanduser())


def _no_mtp_why(model) -> str:
    if mlx_gemma4.is_gemma4(model):
        return ("Gemma 4 has no NextN layers of its own: set speculative.mtp_model to its assistant "
                "(an MLX gemma4_assistant folder) to draft with MTP")
    return ("the MLX backend drafts with MTP only through a Gemma 4 assistant model (speculative.mtp_model), "
            f"and this model is {type(model).__module__.rsplit('.', 1)[-1]}")


def _vocab_size(model, tok) -> int:
    try:
        emb = mlx_gemma4.body(model).embed_tokens if mlx_gemma4.is_gemma4(model) else model.model.embed_tokens
        rows = emb.weight.shape[0]
        return max(rows, 1)
    except AttributeError:
        return tok.vocab_size


def _kv_bytes_per_token(model, bytes_per_value: int) -> int | None:
    try:
        total = 0
        for layer in model.layers:
            attn = layer.self_attn
            if not getattr(attn, "has_kv", True):  # Gemma 4's KV-shared layers keep no cache
                continue
            head_dim = getattr(attn, "head_dim", None) or attn.k_proj.weight.shape[0] // attn.n_kv_heads
            total += attn.n_kv_heads * head_dim * 2 * bytes_per_value
        return total or None
    except AttributeError:
        return None
