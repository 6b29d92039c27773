"""A loaded llama.cpp model's vocabulary: text <-> token ids, the bytes each
token stands for, and its special tokens (BOS, EOS, end-of-generation)."""

from __future__ import annotations

import ctypes
from pathlib import Path

from .base import BackendError, ModelLoadError


class LlamaVocab:
    """Tokenizer of one loaded model, over llama.cpp's ``llama_vocab``.

    Valid while the model is loaded: the backend drops it on unload."""

    def __init__(self, C, model, path: Path):
        vocab = C.llama_model_get_vocab(model)
        if not vocab:
            raise ModelLoadError(f"{path} has no vocabulary; it is not a text generation model")
        self._C, self._vocab = C, vocab
        self.n_vocab = int(C.llama_vocab_n_tokens(vocab))
        bos = int(C.llama_vocab_bos(vocab))
        self.eos = int(C.llama_vocab_eos(vocab))
        self.bos: int | None = bos if bos >= 0 else None
        self.add_bos = bool(C.llama_vocab_get_add_bos(vocab))
        is_eog = C.llama_vocab_is_eog
        eog = [t for t in range(self.n_vocab) if is_eog(vocab, t)]
        eog.sort(key=lambda t: (t != self.eos, t))
        self.eog_ids = eog  # EOS first
        self.eog = frozenset(eog)
        self._pieces: dict[int, bytes] = {}

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Text to ids. ``add_bos`` adds BOS only where the model wants one
        (``tokenizer.ggml.add_bos_token``); a text that already starts with the
        BOS token (chat templates often write ``{{ bos_token }}``) does not get
        a second one."""
        C = self._C
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
        bos = self.bos
        if add_bos and n >= 2 and bos is not None and tokens[0] == bos and tokens[1] == bos:
            del tokens[0]
        return tokens

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token as it appears in output text (cached). Control
        tokens (``<|im_end|>``, ``<end_of_turn>``, BOS...) give b""."""
        piece = self._pieces.get(token)
        if piece is not None:
            return piece
        if not 0 <= token < self.n_vocab:
            raise BackendError(f"token id {token} is out of range (vocabulary of {self.n_vocab})")
        C = self._C
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        piece = buf.raw[: max(n, 0)]
        self._pieces[token] = piece
        return piece

    def special_text(self, token: int | None) -> str:
        """A special token's text as templates write it (``<|im_start|>``, ``<bos>``); "" for none."""
        if token is None or token < 0:
            return ""
        text = self._C.llama_vocab_get_text(self._vocab, token)
        return text.decode("utf-8", "replace") if text else ""
