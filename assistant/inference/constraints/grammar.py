"""A reply's grammar state over the model's vocabulary (llguidance).

:func:`constraint_for` builds a :class:`Constraint` for one reply from a
checked :class:`ResponseFormat` and the backend that generates it. It needs
only the ``Backend`` interface: every token's bytes (``token_bytes``), the
end-of-generation tokens and ``tokenize``, so it works the same on every
backend (llama.cpp, MLX, a plugin's). The vocabulary llguidance works from
is built once per loaded model (about 0.2 s for SmolLM2's 49,152 tokens)
and kept while that model stays loaded.

Why llguidance and not llama.cpp's grammar sampler: measured on SmolLM2-135M
on this 2-core machine over a schema with enums, a nested object, an array
and required keys (bench/structured_output.py), llguidance computes a
token's mask in 0.13-0.15 ms and checks one token in 0.04 ms, where
llama.cpp's sampler takes 7.9 ms per token over the full vocabulary (65% of
a 12 ms decode step); and llama.cpp's needs a llama.cpp vocabulary, which
an MLX model does not have.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import numpy as np

from backends.base import Backend, BackendError

from assistant.inference.constraints.response_format import ConstraintError, ResponseFormat

# backend -> (the ModelInfo it was built for, the llguidance tokenizer): rebuilt when the
# backend loads another model (its info changes).
_TOKENIZERS: "weakref.WeakKeyDictionary[Backend, tuple[Any, Any]]" = weakref.WeakKeyDictionary()


class _Vocabulary:
    """What llguidance's ``TokenizerWrapper`` reads from a tokenizer, taken from a backend.

    Tokens with no bytes (control tokens: ``<|im_end|>``, BOS...) are marked
    special with llguidance's 0xFF prefix, so no grammar of text ever allows
    them; the end-of-generation ones are allowed where the grammar is done.
    The backend is held weakly: the tokenizer lives in a cache keyed by it."""

    def __init__(self, backend: Backend):
        info = backend.info
        self.eos_token_id = info.eos_token_ids[0] if info.eos_token_ids else None
        self.bos_token_id = info.bos_token_id
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for token in range(info.vocab_size):
            try:
                piece = backend.token_bytes(token)
            except (BackendError, IndexError, KeyError):  # padding rows past the tokenizer's own size
                piece = b""
            if not piece:
                piece = b"\xff<[%d]>" % token
                self.special_token_ids.append(token)
            self.tokens.append(piece)
        self._backend = weakref.ref(backend)

    def __call__(self, text: bytes | str) -> list[int]:
        """Text to tokens, as the model's own tokenizer splits it (llguidance asks rarely)."""
        backend = self._backend()
        if backend is None:
            raise BackendError("the model was unloaded")
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return backend.tokenize(text, add_bos=False, special=False)


def tokenizer_for(backend: Backend) -> Any:
    """The llguidance tokenizer of the backend's loaded model (built once per model)."""
    import llguidance

    info = backend.info
    cached = _TOKENIZERS.get(backend)
    if cached is not None and cached[0] is info:
        return cached[1]
    vocab = _Vocabulary(backend)
    if vocab.eos_token_id is None:
        raise ConstraintError(f"model {info.name!r} has no end-of-generation token: a constrained reply "
                              "could never end")
    tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocab), n_vocab=info.vocab_size,
                                       eos_token=list(info.eos_token_ids))
    _TOKENIZERS[backend] = (info, tokenizer)
    return tokenizer


def constraint_for(fmt: ResponseFormat, backend: Backend) -> "Constraint":
    """A fresh grammar state for one reply of ``backend`` under ``fmt``."""
    import llguidance

    matcher = llguidance.LLMatcher(tokenizer_for(backend), fmt.grammar, log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the grammar cannot be used: {matcher.get_error()}")
    return Constraint(matcher, backend.info.vocab_size)


class Constraint:
    """The grammar state of one reply: which tokens may come next, and the
    tokens taken so far. The sampler masks with it and tells it every token
    it picks (``take``); the speculative engine cuts drafts with
    ``valid_prefix``, which changes nothing."""

    def __init__(self, matcher: Any, n_vocab: int):
        self._m = matcher
        self.n_vocab = n_vocab
        self._bits = np.full((n_vocab + 31) // 32, -1, dtype=np.int32)
        self.taken = 0

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next (cheap: no mask is computed)."""
        return self._m.validate_tokens([int(token)]) == 1

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of ``tokens`` may come next, in order; the state does not change."""
        return int(self._m.validate_tokens([int(t) for t in tokens])) if tokens else 0

    def allowed(self) -> np.ndarray:
        """A boolean row over the vocabulary: the tokens that may come next."""
        self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        self._check()
        return np.unpackbits(self._bits.view(np.uint8), count=self.n_vocab, bitorder="little").view(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every token the grammar forbids at -inf (rows wider
        than the vocabulary, as some models pad theirs, lose the extra columns too)."""
        allowed = self.allowed()
        width = logits.shape[-1]
        if width != self.n_vocab:
            allowed = np.concatenate([allowed, np.zeros(max(0, width - self.n_vocab), bool)])[:width]
        return np.where(allowed, logits, np.float32(-np.inf))

    def take(self, token: int) -> None:
        """Advance the grammar by ``token`` (one the mask allowed)."""
        if not self._m.consume_token(int(token)):
            raise ConstraintError(f"the grammar refused token {int(token)}: {self._m.get_error() or 'not allowed'}")
        self.taken += 1

    @property
    def complete(self) -> bool:
        """Whether the text so far is a whole reply of the grammar (it may end here)."""
        return bool(self._m.is_accepting())

    def _check(self) -> None:
        if self._m.is_error():
            raise ConstraintError(f"structured output stopped: {self._m.get_error()}")
