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

    A model with several NextN layers (MiMo-V2, Step-3.5: one trained head per
    future token) uses each of them (``chain``, llama.cpp's ``chain_heads``):
    the catch-up runs once per head (``llama_set_nextn_layer_offset``; the
    KV cache is per layer), and draft step i runs head i over the whole draft
    so far (the token at N and the i guesses before, with the hidden states
    that made them), so a proposal has at most as many tokens as there are
    heads. ``extra={"mtp_heads": 1}`` (``open_mtp``) uses only the first head
    for every step instead, as a single-head model does.
    """

    kind = "nextn"

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
        self.n_heads = max(1, int(n_nextn))
        self.chain = self.n_heads > 1  # one head per draft step (see the class doc)
        self._set_head = getattr(X, "llama_set_nextn_layer_offset", None)
        if self.chain and self._set_head is None:
            self.chain = False  # a binding without it: the first head for every step
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

    def keep_hidden(self, pos0: int, m: int, outputs: list[int] | None = None) -> None:
        """After a target decode of ``m`` tokens at positions ``pos0``...: keep their
        hidden rows (all of them, unmasked: ``outputs`` does not matter here)."""
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

    def describe(self, arch: str) -> str:
        heads = f"{self.n_heads} NextN layer(s)"
        if self.chain:
            heads += ", one head per draft step"
        elif self.n_heads > 1:
            heads += ", the first one for every draft step"
        return f"draft context over {heads} ({arch})"

    def _catch_up(self, cache: list[int], N: int) -> None:
        """Evaluate the text the target evaluated since the last draft, under every
        head in turn (chain) or the first. Not in the same batch as a draft row:
        in a batch that mixes rows without output and an output row, the NextN
        hidden state llama.cpp returns for the output row is not that row's (its
        logits are right; measured on this build), and the next draft step needs it."""
        C = self.C
        for head in range(self.n_heads if self.chain else 1):
            if self.chain:
                C.llama_memory_seq_rm(self.mem, 0, self.mirrored, -1)  # this head's layer, afresh
                self._set_head(self.ctx, head)
            C.llama_batch_ext_clear(self.batch)
            rows = 0
            for p in range(self.mirrored, N):
                self._add(cache[p], p, self._hidden(p - 1), False)
                rows += 1
                if rows == self.n_batch or p == N - 1:
                    self._process()
                    rows = 0
        self.mirrored = N

    def _guess(self, i: int = -1) -> tuple[int, np.ndarray | None]:
        """The greedy token and the hidden state of output row ``i`` of the last draft decode."""
        C = self.C
        row = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,))
        src = self._get_h_ith(self.ctx, i)
        h = np.ctypeslib.as_array(src, shape=(self.n_embd,)).copy() if src else None
        return int(row.argmax()), h

    def _draft_one_head(self, last: int, N: int, n: int) -> list[int]:
        """One head (the first) for every step: each guess fed back at the next position."""
        out: list[int] = []
        self._add(last, N, self._hidden(N - 1), True)
        self._process()
        for i in range(n):
            tok, h = self._guess()
            out.append(tok)
            if i + 1 == n or h is None:
                break
            self._add(tok, N + 1 + i, h, True)
            self._process()
        return out

    def _draft_chain(self, last: int, N: int, n: int) -> list[int]:
        """Head i for step i, over the whole draft so far (rebuilt from position N:
        the KV of head i's layer has nothing there yet). Every row outputs (see
        ``_catch_up`` on mixed batches); the last row's guess is this step's."""
        C = self.C
        toks, hs = [int(last)], [self._hidden(N - 1)]
        out: list[int] = []
        for i in range(min(n, self.n_heads)):
            if i:
                C.llama_memory_seq_rm(self.mem, 0, N, -1)
            self._set_head(self.ctx, i)
            for t, (tok, h) in enumerate(zip(toks, hs)):
                self._add(tok, N + t, h, True)
            self._process()
            tok, h = self._guess(len(toks) - 1)
            out.append(tok)
            if h is None:
                break
            toks.append(tok)
            hs.append(h)
        return out

    def draft(self, cache: list[int], last: int, n: int) -> list[int]:
        """``cache`` is the target's text (positions 0..N-1), ``last`` the token
        at N (not evaluated by the target yet): up to ``n`` greedy guesses (at
        most one per head where each step has its own)."""
        C = self.C
        N = len(cache)
        try:
            self._catch_up(cache, N)
            if self.chain:
                return self._draft_chain(last, N, n)
            return self._draft_one_head(last, N, n)
        finally:
            C.llama_batch_ext_clear(self.batch)
            if self.chain:
                self._set_head(self.ctx, 0)  # the default for anything else
            # the draft rows are not part of the text: the MTP cache mirrors [0, N)
            if C.llama_memory_seq_pos_max(self.mem, 0) >= N:
                C.llama_memory_seq_rm(self.mem, 0, min(self.mirrored, N), -1)
            # only h_{N-1} on is needed from now on
            if self.h0 < N - 1 < self.h_end:
                k = self.h_end - (N - 1)
                self.h[:k] = self.h[N - 1 - self.h0 : self.h_end - self.h0]
                self.h0 = N - 1


def open_mtp(C, model, ctx, cparams, arch: str, extra: dict[str, Any],
             choices: dict[str, str]) -> tuple[MtpContext | None, str]:
    """(the MTP draft context or None, why): a context where the model has
    NextN layers. Never fatal: a failure is the reason, and is shown in the
    model's ``choices`` (as is a context made)."""
    n_nextn = int(C.llama_model_n_layer_nextn(model)) if hasattr(C, "llama_model_n_layer_nextn") else 0
    if n_nextn <= 0:
        return None, (f"the model has no multi-token-prediction (NextN) layers "
                      f"(architecture {arch}, nextn_predict_layers absent or 0) and no separate MTP drafter "
                      "was given (speculative.mtp_model, or an mtp-*.gguf beside the model file that pairs)")
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
    if int(extra.get("mtp_heads", n_nextn)) <= 1:
        mtp.chain = False  # asked for: the first head for every step
    choices["mtp"] = mtp.describe(arch)
    return mtp, f"{n_nextn} NextN layer(s)" + (", one head per draft step" if mtp.chain else "")
