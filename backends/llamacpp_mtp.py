"""Multi-token prediction: a model's own NextN layers as a drafter.

:class:`MtpContext` is the second llama.cpp context that runs them, beside
the target's; :func:`open_mtp` makes one where the model has such layers and
says why not where it has none or cannot run them. The backend keeps the
context in step with its own cache (``keep_hidden`` after each decode, ``cut``
after each truncation) and drafts through ``LlamaCppBackend.mtp_draft``.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from .base import BackendError
from .llamacpp_native import LOG_TAIL, llama_said


class MtpContext:
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
        LOG_TAIL.clear()
        self.ctx = C.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError(llama_said() or "llama_init_from_model failed for the MTP context")
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
        """Free the MTP context and stop the target outputting hidden states."""
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
            said = llama_said()
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


def open_mtp(C, model, ctx, cparams, arch: str, extra: dict[str, Any],
             choices: dict[str, str]) -> tuple[MtpContext | None, str]:
    """(the MTP draft context or None, why): a context where the model has
    NextN layers. Never fatal: a failure is the reason, and is shown in the
    model's ``choices`` (as is a context made)."""
    n_nextn = int(C.llama_model_n_layer_nextn(model)) if hasattr(C, "llama_model_n_layer_nextn") else 0
    if n_nextn <= 0:
        return None, (f"the model has no multi-token-prediction (NextN) layers "
                      f"(architecture {arch}, nextn_predict_layers absent or 0)")
    if not extra.get("mtp", True):
        why = "its MTP layers were not loaded (the model was loaded with drafting off)"
        choices["mtp"] = why
        return None, why
    try:
        mtp = MtpContext(C, model, ctx, cparams, n_nextn)
    except Exception as exc:  # noqa: BLE001 - an old binding, an arch without an MTP graph, ...
        why = f"the model has {n_nextn} NextN layer(s) but llama.cpp cannot run them: {exc}"
        choices["mtp"] = why
        return None, why
    choices["mtp"] = f"draft context over {n_nextn} NextN layer(s) ({arch})"
    return mtp, f"{n_nextn} NextN layer(s)"
