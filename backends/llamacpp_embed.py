"""Embeddings with llama.cpp: a second context on the loaded model, made for them.

The generation context computes logits for one sequence and keeps its KV
cache across turns; embeddings need a context created with ``embeddings``
on and a pooling layer, so they get their own, made on the first
``embed`` and freed with the model. It shares the weights (one
``llama_model``), so it costs only its own small KV cache and compute
buffers: ``EMBED_CONTEXT`` tokens at most (or the generation context's
size, if smaller), which is also the longest text it embeds.

Pooling: a model that declares one (``{arch}.pooling_type``: embedding
models such as BERT, nomic-bert) keeps its own; a generative model has none,
so its token states are averaged (mean pooling, as llama-server and Ollama
do for such models). Vectors come back L2-normalised, as OpenAI's do.

Each text is one batch in sequence 0 with every token marked as an output
(as llama-cpp-python's ``Llama.embed`` does: llama.cpp wants all of them in
embedding mode), after which the context's memory is cleared.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .base import BackendError, ContextOverflowError
from .llamacpp_native import LOG_TAIL, llama_said

# The largest embedding context (tokens): one text per batch, so also the longest text.
EMBED_CONTEXT = 2048


class Embedder:
    """The embedding context of one loaded llama.cpp model (``LoadedModel``)."""

    def __init__(self, loaded: Any, n_ctx_limit: int):
        C, model = loaded.C, loaded.model
        self.C = C
        self.n_embd = int(C.llama_model_n_embd(model))
        n_ctx = max(16, min(EMBED_CONTEXT, int(n_ctx_limit)))
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx  # a pooled (or non-causal) sequence must fit one micro-batch
        cparams.n_seq_max = 1
        cparams.n_threads = loaded.plan.n_threads
        cparams.n_threads_batch = loaded.plan.cparams.n_threads_batch
        cparams.no_perf = True
        cparams.embeddings = True
        cparams.pooling_type = (C.LLAMA_POOLING_TYPE_UNSPECIFIED if _declared_pooling(C, model, loaded.info)
                                else C.LLAMA_POOLING_TYPE_MEAN)
        LOG_TAIL.clear()
        ctx = C.llama_init_from_model(model, cparams)
        if not ctx:
            raise BackendError(f"llama.cpp could not create a {n_ctx}-token embedding context: "
                               + (llama_said() or "unknown error (out of memory?)"))
        self.ctx = ctx
        self.n_ctx = n_ctx
        if C.llama_pooling_type(ctx) == C.LLAMA_POOLING_TYPE_NONE:  # cannot happen with MEAN asked; be sure
            self.free()
            raise BackendError("this model gives no pooled embeddings")
        self.batch = C.llama_batch_init(n_ctx, 0, 1)
        self._mem = C.llama_get_memory(ctx)

    def embed(self, token_lists: Sequence[Sequence[int]]) -> list[list[float]]:
        """One unit-length vector per token list (each already tokenized, BOS included)."""
        return [self._one(tokens) for tokens in token_lists]

    def _one(self, tokens: Sequence[int]) -> list[float]:
        C, batch, n = self.C, self.batch, len(tokens)
        if n == 0:
            raise ValueError("cannot embed an empty text")
        if n > self.n_ctx:
            raise ContextOverflowError(f"a text of {n} tokens is longer than the embedding context "
                                       f"({self.n_ctx} tokens)", needed=n, available=self.n_ctx)
        for i, tok in enumerate(tokens):
            batch.token[i] = int(tok)
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        if self._mem:
            C.llama_memory_clear(self._mem, True)
        LOG_TAIL.clear()
        rc = C.llama_decode(self.ctx, batch)
        if rc != 0:
            raise BackendError(f"llama_decode failed while embedding (code {rc})"
                               + (f": {llama_said()}" if llama_said() else ""))
        ptr = C.llama_get_embeddings_seq(self.ctx, 0)
        if not ptr:
            raise BackendError("llama.cpp returned no pooled embedding")
        return _normalized(np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).astype(np.float64))

    def free(self) -> None:
        """Free the batch and the context (the model belongs to the backend)."""
        if getattr(self, "batch", None) is not None:
            self.C.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.C.llama_free(self.ctx)
            self.ctx = None


def _declared_pooling(C, model, info) -> bool:
    """Whether the GGUF declares a pooling type other than none (an embedding model)."""
    from .llamacpp_load import meta_str

    value = meta_str(C, model, f"{info.architecture}.pooling_type")
    try:
        return value is not None and int(value) not in (C.LLAMA_POOLING_TYPE_NONE, C.LLAMA_POOLING_TYPE_UNSPECIFIED)
    except ValueError:
        return False


def _normalized(vector: np.ndarray) -> list[float]:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        raise BackendError("the model gave an embedding of zero (or non-finite) length")
    return (vector / norm).tolist()
