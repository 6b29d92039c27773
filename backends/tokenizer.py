"""Tokenizers built with the Hugging Face ``tokenizers`` library (no torch, no transformers).

Two sources:

- :func:`from_gguf_metadata`: the vocabulary a GGUF file carries
  (``tokenizer.ggml.*``), rebuilt the way llama.cpp reads it:

  - ``gpt2`` vocabularies (byte-level BPE: SmolLM2, Llama 3, Qwen...): a BPE
    model over the tokens and merges, with the pre-tokenizer split that
    llama.cpp uses for the file's ``tokenizer.ggml.pre`` (see ``_PRE_SPLITS``);
  - ``llama`` vocabularies (SentencePiece BPE with scores: Llama 2, Gemma...):
    SentencePiece merges the adjacent pair whose merged piece scores highest,
    which is BPE with merges ranked by the score of their result, so the merges
    are derived from the scores; ``▁`` stands for a space and ``<0xNN>`` pieces
    are the byte fallback.

- :func:`from_hf_folder`: ``tokenizer.json`` (+ ``tokenizer_config.json``) of a
  Hugging Face / MLX model folder.

Control tokens (``tokenizer.ggml.token_type`` 3, or special added tokens) are
parsed from text only when asked (``special=True``), user-defined ones
always, and both detokenize to nothing, as in llama.cpp. End-of-generation
tokens follow llama.cpp too: EOS, EOT, EOM and the usual end-of-turn texts.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from .base import ModelLoadError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Token texts that end a turn (llama.cpp's list in llama-vocab.cpp), plus the
# fill-in-the-middle pad/repo/file-separator tokens, which llama.cpp also
# counts as end-of-generation.
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>", "<｜end▁of▁sentence｜>",
    "<|fim_pad|>", "<fim-pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>", "</s>",
    "<eos>", "<turn|>", "<|tool_response>",  # Gemma 4: end of text, of a turn, and a tool call awaiting its answer
})

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> (regexes applied in turn; "DIGITS" = each digit alone, ignore_merges)
_PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "default": ((_GPT2_SPLIT,), False),
    "gpt-2": ((_GPT2_SPLIT,), False),
    "gpt2": ((_GPT2_SPLIT,), False),
    **{name: (("DIGITS", _GPT2_SPLIT), False)
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")},
    **{name: ((_LLAMA3_SPLIT,), True)
       for name in ("llama-bpe", "llama3", "llama-v3", "dbrx", "smaug-bpe", "falcon3", "pixtral")},
    **{name: ((_QWEN2_SPLIT,), False)
       for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez")},
}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_level_bytes(text: str) -> bytes:
    dec = _byte_decoder()
    try:
        return bytes(dec[ch] for ch in text)
    except KeyError:  # not a byte-level piece (an added token written as plain text)
        return text.encode("utf-8")


def _spm_bytes(text: str) -> bytes:
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
        try:
            return bytes([int(text[3:5], 16)])
        except ValueError:
            pass
    return text.replace("\u2581", " ").encode("utf-8")


class TextTokenizer:
    """Token ids <-> text for one model: what a backend's tokenizer methods need."""

    def __init__(self, tk: Any, pieces: list[bytes], *, bos: int | None, eos: int | None, eog: Sequence[int],
                 add_bos: bool, kind: str, notes: dict[str, str] | None = None):
        self.tk = tk  # a tokenizers.Tokenizer
        self.pieces = pieces  # id -> the bytes it stands for in output text (b"" for control tokens)
        self.bos = bos
        self.eos = eos
        self.eog = frozenset(eog)
        self.add_bos = add_bos
        self.kind = kind  # "gpt2" | "spm" | "hf"
        self.notes = notes or {}

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def token_text(self, token: int | None) -> str:
        """The token's text as written in templates (``<|im_start|>``, ``<bos>``), "" for none."""
        if token is None or not 0 <= token < len(self.pieces):
            return ""
        return self.tk.id_to_token(token) or ""

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self.tk.encode_special_tokens = not special
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        return ids

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token]


def _eog_ids(token_to_id: dict[str, int], *explicit: int | None) -> list[int]:
    ids = {t for t in explicit if t is not None and t >= 0}
    ids.update(i for text, i in token_to_id.items() if text in EOG_TEXTS)
    first = explicit[0] if explicit and explicit[0] is not None else None
    return sorted(ids, key=lambda t: (t != first, t))


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def from_gguf_metadata(meta: dict[str, Any], *, source: str = "the GGUF file") -> TextTokenizer:
    """A tokenizer from GGUF metadata (plain Python values: lists, ints, strings)."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelLoadError(f"{source} has no vocabulary (tokenizer.ggml.tokens)")
    n = len(tokens)
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * n)
    if len(types) != n:
        raise ModelLoadError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    token_to_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        token_to_id.setdefault(t, i)
    notes: dict[str, str] = {}

    if kind == "gpt2":
        tk, text_bytes = _gguf_byte_level_bpe(meta, token_to_id, notes)
    elif kind == "llama":
        tk, text_bytes = _gguf_sentencepiece(meta, tokens, types, token_to_id, notes, source)
    else:
        raise ModelLoadError(
            f"{source} has a {kind!r} tokenizer; only 'gpt2' (byte-level BPE) and 'llama' (SentencePiece) "
            "vocabularies can be rebuilt from GGUF metadata"
        )

    # Control tokens are special (parsed from text only when asked); user-defined ones always.
    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == CONTROL or ty == USER_DEFINED:
            added.append(AddedToken(t, special=(ty == CONTROL), normalized=False))
    if added:
        tk.add_tokens(added)
    pieces = _gguf_pieces(tokens, types, kind, text_bytes)

    bos = _int_or_none(meta.get("tokenizer.ggml.bos_token_id"))
    eos = _int_or_none(meta.get("tokenizer.ggml.eos_token_id"))
    eot = _int_or_none(meta.get("tokenizer.ggml.eot_token_id"))
    eom = _int_or_none(meta.get("tokenizer.ggml.eom_token_id"))
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    eog = _eog_ids(token_to_id, eos, eot, eom)
    for i in eog:  # llama.cpp treats end-of-generation tokens as control tokens: no text
        if 0 <= i < n:
            pieces[i] = b""
    return TextTokenizer(tk, pieces, bos=bos, eos=eos, eog=eog,
                         add_bos=add_bos, kind="gpt2" if kind == "gpt2" else "spm", notes=notes)


def _gguf_byte_level_bpe(meta: dict[str, Any], token_to_id: dict[str, int], notes: dict[str, str]):
    """(tokenizer, piece -> bytes) for a ``gpt2`` vocabulary: BPE over the
    tokens and merges, split first the way llama.cpp does for the file's
    ``tokenizer.ggml.pre``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges_raw = meta.get("tokenizer.ggml.merges") or []
    merges = [tuple(m.split(" ", 1)) for m in merges_raw if " " in m]
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    splits, ignore_merges = _PRE_SPLITS.get(pre, _PRE_SPLITS["default"])
    if pre not in _PRE_SPLITS:
        notes["tokenizer"] = f"byte-level BPE; pre-tokenizer {pre!r} unknown here, using GPT-2's split"
    else:
        notes["tokenizer"] = f"byte-level BPE from the GGUF vocabulary (pre-tokenizer {pre!r})"
    tk = Tokenizer(models.BPE(vocab=dict(token_to_id), merges=merges, ignore_merges=ignore_merges))
    steps = []
    for s in splits:
        if s == "DIGITS":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(s), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    return tk, _byte_level_bytes


def _gguf_sentencepiece(meta: dict[str, Any], tokens: list[str], types: list[int], token_to_id: dict[str, int],
                        notes: dict[str, str], source: str):
    """(tokenizer, piece -> bytes) for a ``llama`` (SentencePiece) vocabulary:
    BPE whose merges are ranked by the score of the piece they make, which is
    what SentencePiece's highest-scoring-pair rule amounts to."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    n = len(tokens)
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * n)
    if len(scores) != n:
        raise ModelLoadError(f"{source}: tokenizer.ggml.scores has {len(scores)} entries for {n} tokens")
    mergeable = {t: i for t, i in token_to_id.items() if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
    ranked = []
    for text, i in mergeable.items():
        for k in range(1, len(text)):
            left, right = text[:k], text[k:]
            if left in token_to_id and right in token_to_id:
                ranked.append((-float(scores[i]), i, k, left, right))
    ranked.sort()
    merges = [(left, right) for _, _, _, left, right in ranked]
    unk = _int_or_none(meta.get("tokenizer.ggml.unknown_token_id"))
    unk_text = tokens[unk] if unk is not None and 0 <= unk < n else None
    tk = Tokenizer(models.BPE(vocab=dict(token_to_id), merges=merges, unk_token=unk_text,
                              byte_fallback=True, fuse_unk=True))
    norm = [normalizers.Replace(" ", "\u2581")]
    if bool(meta.get("tokenizer.ggml.add_space_prefix", True)):
        norm.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(norm)
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    notes["tokenizer"] = "SentencePiece BPE from the GGUF vocabulary (merges ranked by score)"
    return tk, _spm_bytes


def _gguf_pieces(tokens: list[str], types: list[int], kind: str, text_bytes) -> list[bytes]:
    """id -> the bytes the token stands for in output text, as llama.cpp detokenizes it."""
    pieces: list[bytes] = []
    for t, ty in zip(tokens, types):
        if ty == CONTROL or ty == UNUSED:
            pieces.append(b"")
        elif ty == USER_DEFINED:
            pieces.append(t.encode("utf-8"))
        elif ty == BYTE and kind == "llama":
            pieces.append(_spm_bytes(t))
        elif ty == UNKNOWN:
            pieces.append("\u2585".encode("utf-8") if kind == "llama" else b"")
        else:
            pieces.append(text_bytes(t))
    return pieces


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} should hold a JSON object")
    return data


def from_hf_folder(folder: Path, config: dict[str, Any], tk: Any = None) -> tuple[TextTokenizer, str | None]:
    """(tokenizer, chat template or None) from a model folder's tokenizer files.

    ``tk`` is a ``tokenizers.Tokenizer`` already made (for folders without a
    ``tokenizer.json``); otherwise ``tokenizer.json`` is read.
    """
    from tokenizers import Tokenizer

    if tk is None:
        file = folder / "tokenizer.json"
        try:
            tk = Tokenizer.from_file(str(file))
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exceptions
            raise ModelLoadError(f"cannot read the tokenizer {file}: {exc}") from None
    tcfg = read_json(folder / "tokenizer_config.json")
    pieces, byte_level = _hf_pieces(tk)
    token_to_id = tk.get_vocab(with_added_tokens=True)

    def tid(value: Any) -> int | None:
        text = _token_content(value)
        return token_to_id.get(text) if text is not None else None

    bos = tid(tcfg.get("bos_token"))
    if bos is None:
        bos = _int_or_none(config.get("bos_token_id"))
    eos = tid(tcfg.get("eos_token"))
    cfg_eos = config.get("eos_token_id")
    cfg_eos = cfg_eos if isinstance(cfg_eos, list) else [cfg_eos]
    if eos is None and cfg_eos and cfg_eos[0] is not None:
        eos = _int_or_none(cfg_eos[0])
    eog = _eog_ids(token_to_id, eos, *(_int_or_none(e) for e in cfg_eos))
    if "add_bos_token" in tcfg:
        add_bos = bool(tcfg["add_bos_token"])
    else:  # whatever the tokenizer's own post-processor does
        probe = tk.encode("a", add_special_tokens=True).ids
        add_bos = bos is not None and bool(probe) and probe[0] == bos
    notes = {"tokenizer": f"{'byte-level' if byte_level else 'SentencePiece-style'} tokenizer from the folder"}
    return (TextTokenizer(tk, pieces, bos=bos, eos=eos, eog=eog, add_bos=add_bos, kind="hf", notes=notes),
            _hf_template(folder, tcfg))


def _hf_pieces(tk: Any) -> tuple[list[bytes], bool]:
    """(id -> the bytes it stands for in output text, whether the tokenizer is byte-level)."""
    spec = json.loads(tk.to_str())
    decoder = json.dumps(spec.get("decoder") or {})
    model = spec.get("model") or {}
    byte_level = "ByteLevel" in decoder or ("ByteLevel" in json.dumps(spec.get("pre_tokenizer") or {})
                                            and "ByteFallback" not in decoder)
    text_bytes = _byte_level_bytes if byte_level else _spm_bytes
    n = tk.get_vocab_size(with_added_tokens=True)
    special = {a["id"] for a in spec.get("added_tokens") or [] if a.get("special")}
    added = {a["id"] for a in spec.get("added_tokens") or [] if not a.get("special")}
    pieces = []
    for i in range(n):
        t = tk.id_to_token(i)
        if t is None or i in special:  # control tokens: no text, as in llama.cpp
            pieces.append(b"")
        elif i in added:  # added tokens are plain text, not byte-level pieces
            pieces.append(t.encode("utf-8"))
        elif model.get("byte_fallback") and len(t) == 6 and t.startswith("<0x"):
            pieces.append(_spm_bytes(t))
        else:
            pieces.append(text_bytes(t))
    return pieces, byte_level


def _hf_template(folder: Path, tcfg: dict[str, Any]) -> str | None:
    """The folder's chat template: ``chat_template.jinja``, else tokenizer_config.json's
    (the "default" one where it holds several)."""
    template = tcfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None
