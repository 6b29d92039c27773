"""Multi-token prediction with a separate drafter model: Gemma 4's
``gemma4-assistant``, the way llama.cpp's ``--spec-type draft-mtp`` runs it
(common/speculative.cpp, the ``is_mem_shared`` mode).

:func:`load_assistant_model` loads the drafter's weights (before the target,
so a bad file costs nothing); :class:`AssistantContext` then makes its
context with ``ctx_type = MTP`` and ``ctx_other`` = the target's context,
and drafts. What is particular about it, compared with a model's own NextN
layers (``llamacpp_mtp.MtpContext``):

- its Q-only layers attend over the *target's* KV cache (llama.cpp maps its
  sliding-window layers onto the target's layer n-2 and its full layers onto
  n-1): it writes no KV of its own. So there is no catch-up decode of the
  text the target evaluated, no mirrored cache and no ``seq_rm`` on its
  memory (a view of the target's): a truncation of the target is all there
  is to it;
- each draft step feeds a token plus a hidden state of the target's width:
  the first step the target's token after its cache (``last``) with the
  target's hidden state after the final norm at the cache's last position,
  each further step its own guess with the drafter's own output state
  (``h_nextn``, projected back to the target's width). Every step of one
  proposal is at the same position, N (HF's Gemma4Assistant does the same);
- its layers are all used in every step, in one graph (llama.cpp runs all
  ``nextn_predict_layers`` = its block count together).

The target outputs its hidden state for the rows it outputs logits for
(``llama_set_embeddings_nextn`` masked); nothing is copied per step: a draft
reads the row it needs from the target's last decode.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from .base import BackendError, ModelLoadError
from .llamacpp_native import LOG_TAIL, explain_load_failure, llama_said

# The drafter context's batch (n_batch = n_ubatch): a draft step decodes one row.
# backends.memory_plan plans its compute buffer with this figure.
DRAFT_N_BATCH = 8


def load_assistant_model(C, path: Path, extra: dict[str, Any]):
    """The drafter's llama_model (mmapped); ModelLoadError naming the file as the
    MTP drafter when llama.cpp cannot load it (truncated, damaged, ...)."""
    mparams = C.llama_model_default_params()
    if "n_gpu_layers" in extra:
        mparams.n_gpu_layers = int(extra["n_gpu_layers"])
    LOG_TAIL.clear()
    model = C.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
    if not model:
        raise ModelLoadError(f"MTP drafter: {explain_load_failure(path)}")
    return model


class AssistantContext:
    """A ``gemma4-assistant`` drafter paired with the target's context. The
    backend calls :meth:`keep_hidden` after each target decode, :meth:`cut`
    after each truncation (nothing to do but forget hidden rows) and
    :meth:`draft`; :meth:`free` frees the context and the drafter model."""

    kind = "assistant"

    def __init__(self, C, model, target_ctx, cparams, path: Path):
        from llama_cpp import llama_cpp_ext as X

        if not hasattr(C, "LLAMA_CONTEXT_TYPE_MTP") or not hasattr(C, "llama_batch_ext_init"):
            raise ModelLoadError("this llama-cpp-python has no MTP context API (needs 0.3.36 or later)")
        self.C, self.X, self.model, self.path = C, X, model, path
        self.target = target_ctx
        self.ctx = self.batch = None
        target_model = C.llama_get_model(target_ctx)
        self.n_embd = int(C.llama_model_n_embd_out(model))
        if self.n_embd != int(C.llama_model_n_embd_out(target_model)):
            raise ModelLoadError(f"MTP drafter {path}: its rows are {self.n_embd} wide, the target's hidden "
                                 f"state {int(C.llama_model_n_embd_out(target_model))}")
        self.n_vocab = int(C.llama_vocab_n_tokens(C.llama_model_get_vocab(model)))
        self.n_layers = int(C.llama_model_n_layer_nextn(model))
        p = C.llama_context_default_params()
        for name in ("n_ctx", "n_threads", "n_threads_batch", "type_k", "type_v", "flash_attn_type", "no_perf",
                     "swa_full"):
            setattr(p, name, getattr(cparams, name))
        # One row a step: the target's 512-row batches would reserve compute and logits
        # for 512 rows (about 550 MiB for the 12B's drafter over 262,144 tokens). Its KV
        # cache is a view of the target's, whose size llama.cpp keeps whatever n_ubatch is.
        p.n_batch = p.n_ubatch = min(DRAFT_N_BATCH, int(cparams.n_batch))
        p.n_seq_max = 1
        p.ctx_type = C.LLAMA_CONTEXT_TYPE_MTP
        p.ctx_other = target_ctx
        LOG_TAIL.clear()
        self.ctx = C.llama_init_from_model(model, p)
        if not self.ctx:
            raise ModelLoadError(f"MTP drafter {path}: llama.cpp could not make its context: "
                                 + (llama_said() or "llama_init_from_model failed"))
        if X.llama_get_ctx_other(self.ctx) != target_ctx:
            self.free_context()
            raise ModelLoadError(f"MTP drafter {path}: its context is not paired with the target's "
                                 "(llama.cpp did not link ctx_other)")
        self.batch = C.llama_batch_ext_init(self.ctx)
        if not self.batch:
            self.free_context()
            raise ModelLoadError("llama_batch_ext_init failed for the MTP drafter")
        # Masked: the target keeps hidden states for its output rows only (a prompt's
        # last row, every row of a verify batch), so it computes nothing more than
        # plain decoding does; measured equal to the unmasked rows on this build.
        X.llama_set_embeddings_nextn(target_ctx, True, True)
        X.llama_set_embeddings_nextn(self.ctx, True, True)  # the drafter's own rows: the output ones
        self.last0 = self.last_end = 0  # the positions of the target's last decode...
        self.last_out: list[int] | None = None  # ...and its output rows (None: all)
        self.zeros = np.zeros(self.n_embd, dtype=np.float32)
        self._pos = C.llama_pos(0)
        self._get_h_ith = X.llama_get_embeddings_nextn_ith

    def describe(self) -> str:
        return f"assistant drafter {self.path.name} ({self.n_layers} layer(s), over the target's KV cache)"

    def free_context(self) -> None:
        """Free the batch and the context (not the model) and stop the target's hidden-state copies."""
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

    def free(self) -> None:
        """Free the context and the drafter model (call before freeing the target's context)."""
        self.free_context()
        if self.model:
            self.C.llama_model_free(self.model)
            self.model = None

    # the target's side

    def keep_hidden(self, pos0: int, m: int, outputs: list[int] | None = None) -> None:
        """After a target decode of ``m`` tokens at positions ``pos0``...: note
        which rows have a hidden state (``outputs``: their batch indices; None:
        all). Nothing is copied: a draft reads the one row it needs from the
        target's last decode, which is always where the engine's state is."""
        self.last0, self.last_end, self.last_out = pos0, pos0 + m, outputs

    def cut(self, n: int) -> None:
        """The target's cache was cut back to ``n`` tokens: rows past it are no
        longer text (the drafter's memory is the target's: nothing else to cut)."""
        if n < self.last_end:
            self.last_end = max(n, self.last0)

    def _hidden(self, pos: int) -> np.ndarray:
        """The target's hidden state after the final norm at ``pos``, from its last
        decode; zeros where that decode has none (a cut behind it): drafts may be
        worse there, never wrong, since the target verifies every drafted token."""
        i = pos - self.last0
        if 0 <= i and pos < self.last_end and (self.last_out is None or i in self.last_out):
            src = self._get_h_ith(self.target, i)
            if src:
                return np.ctypeslib.as_array(src, shape=(self.n_embd,)).copy()
        return self.zeros

    # the draft's side

    def _step(self, token: int, pos: int, h: np.ndarray) -> None:
        C = self.C
        C.llama_batch_ext_clear(self.batch)
        i = C.llama_batch_ext_add_token(self.batch, 0, token)
        if i < 0:
            raise BackendError(f"the MTP draft batch refused a row (code {i})")
        self._pos.value = pos
        C.llama_batch_ext_set_pos(self.batch, i, ctypes.byref(self._pos))
        embd = C.llama_embd(h.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
        if not C.llama_batch_ext_set_embd_token(self.batch, i, embd):
            raise BackendError("llama.cpp refused the hidden state of an MTP draft row")
        C.llama_batch_ext_set_output_logits(self.batch, i, True)
        rc = C.llama_process(self.ctx, C.LLAMA_PROCESS_TYPE_DECODE, self.batch)
        C.llama_batch_ext_clear(self.batch)
        if rc != 0:
            said = llama_said()
            raise BackendError(f"the MTP draft decode failed (code {rc})" + (f": {said}" if said else ""))

    def draft(self, cache: list[int], last: int, n: int) -> list[int]:
        """``cache`` is the target's text (positions 0..N-1), ``last`` the token at
        N (not evaluated by the target yet): up to ``n`` greedy guesses, every
        step at position N over the target's KV cache."""
        C = self.C
        N = len(cache)
        out: list[int] = []
        h = self._hidden(N - 1)
        tok = int(last)
        for i in range(n):
            self._step(tok, N, h)
            row = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            tok = int(row.argmax())
            out.append(tok)
            if i + 1 == n:
                break
            src = self._get_h_ith(self.ctx, -1)
            if not src:
                break
            h = np.ctypeslib.as_array(src, shape=(self.n_embd,)).copy()
        return out
