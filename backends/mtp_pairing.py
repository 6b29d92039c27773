"""Whether a separate MTP drafter model (Gemma 4's ``gemma4-assistant``) pairs
with a target GGUF, from the two headers alone (nothing is loaded), and which
``mtp-*.gguf`` beside a model file pairs with it (:func:`find_sibling`).

A drafter pairs when (``assistant_pairing``):

- its architecture is one whose drafter runs over the target's KV cache
  (:data:`ASSISTANT_ARCHS`: ``gemma4-assistant`` for a ``gemma4`` target);
- its ``embedding_length_out`` is the target's hidden size (it reads the
  target's hidden state and writes one of that width);
- its attention reads the target's cache: the target's last two layers are a
  sliding-window one and a full one, and llama.cpp maps the drafter's
  sliding-window layers onto the target's layer n-2, its full ones onto n-1,
  so each drafter layer has the KV head count and K/V head sizes of the
  target layer it reads (keys written per layer, as Gemma 4's conversion
  writes ``head_count_kv``, are compared layer against layer);
- its vocabulary is the target's: the same tokenizer kind, token count and
  token texts (a digest of the token list as stored), and BOS/EOS ids.

Every difference is named in :class:`~backends.base.MtpPairing.differences`.
A file that is missing, not a regular file or not a GGUF file raises
``ModelLoadError`` saying so; a truncated one is named by llama.cpp when it
is loaded, which happens before the target is (``llamacpp_load``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from . import siblings
from .base import ModelLoadError, MtpPairing
from .gguf import GGUF_MAGIC, _Reader

# drafter architecture -> the target architectures it drafts for
ASSISTANT_ARCHS = {"gemma4-assistant": ("gemma4",)}

SIBLING_GLOB = "mtp-*.gguf"

_SMALL_ARRAY = 4096  # arrays up to this many items are kept (per-layer patterns), longer ones summarised
_TOKENS_KEY = "tokenizer.ggml.tokens"


def read_header(path: str | os.PathLike, *, what: str = "model") -> dict[str, Any]:
    """The metadata of the GGUF file at ``path``: small arrays kept as lists,
    long ones summarised, and ``"vocab.digest"`` (a sha256 of the token list
    as stored). ModelLoadError naming ``what`` for a file that is missing, not a
    regular file (a folder, a pipe), not GGUF, or whose header is damaged."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ModelLoadError(f"{what} {p} does not exist")
    if not p.is_file():  # a FIFO would block the open; a folder is not a model
        raise ModelLoadError(f"{what} {p} is not a regular file")
    try:
        with open(p, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{what} {p} is not a GGUF file (a GGUF file starts with the bytes b'GGUF')")
            r = _Reader(f, p)
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelLoadError(f"{what} {p}: unsupported GGUF version {version}")
            r.unpack("<Q")
            n_kv = r.unpack("<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = _value(r, f, key, meta)
            return meta
    except OSError as exc:
        raise ModelLoadError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    except ModelLoadError as exc:
        if str(exc).startswith(what):
            raise
        raise ModelLoadError(f"{what}: {exc}") from None


def _value(r: _Reader, f, key: str, meta: dict[str, Any]) -> Any:
    vtype = r.unpack("<I")
    if vtype != 9:
        return r.value(vtype, False)
    start = f.tell()
    etype, count = r.unpack("<I"), r.unpack("<Q")
    if count <= _SMALL_ARRAY and etype != 9:
        f.seek(start)
        return r.value(9, True)
    f.seek(start)
    summary = r.value(9, False)
    if key == _TOKENS_KEY:  # hash the stored bytes: a 262k vocabulary is a few MB
        end = f.tell()
        f.seek(start)
        digest = hashlib.sha256()
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        meta["vocab.digest"] = digest.hexdigest()
        meta["vocab.count"] = count
    return summary


def _tokens(meta: dict[str, Any]) -> int | None:
    v = meta.get(_TOKENS_KEY)
    if isinstance(v, list):
        return len(v)
    return meta.get("vocab.count")


def _digest(meta: dict[str, Any]) -> str | None:
    if "vocab.digest" in meta:
        return meta["vocab.digest"]
    v = meta.get(_TOKENS_KEY)
    if isinstance(v, list):
        return hashlib.sha256("\0".join(map(str, v)).encode()).hexdigest()
    return None


def _differences(target: dict[str, Any], drafter: dict[str, Any]) -> list[str]:
    t_arch, d_arch = target.get("general.architecture"), drafter.get("general.architecture")
    if d_arch not in ASSISTANT_ARCHS:
        known = ", ".join(sorted(ASSISTANT_ARCHS))
        return [f"its architecture is {d_arch!r}, not a separate MTP drafter ({known})"]
    diffs = []
    if t_arch not in ASSISTANT_ARCHS[d_arch]:
        diffs.append(f"a {d_arch} drafter drafts for {', '.join(ASSISTANT_ARCHS[d_arch])}, "
                     f"the target's architecture is {t_arch!r}")
    t_embd = target.get(f"{t_arch}.embedding_length")
    d_out = drafter.get(f"{d_arch}.embedding_length_out")
    if d_out != t_embd:
        diffs.append(f"hidden size: the drafter's embedding_length_out is {d_out}, the target's "
                     f"embedding_length is {t_embd}")
    pattern = target.get(f"{t_arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) >= 2 and [bool(x) for x in pattern[-2:]] != [True, False]:
        diffs.append("the target's last two layers are not a sliding-window layer followed by a full one "
                     "(the drafter reads the KV cache of those two)")
    else:
        diffs += _attention_differences(target, t_arch, drafter, d_arch)
    diffs += _vocab_differences(target, drafter)
    return diffs


def _at(meta: dict[str, Any], key: str, layer: int) -> Any:
    """``key``'s value for one layer: Gemma 4's conversion writes some attention
    keys (``head_count_kv``, possibly the head sizes) as one entry per layer."""
    v = meta.get(key)
    if isinstance(v, list):
        return v[layer] if 0 <= layer < len(v) else None
    return v


def _is_swa(meta: dict[str, Any], arch: str, layer: int, default: bool) -> bool:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list) and 0 <= layer < len(pattern):
        return bool(pattern[layer])
    return default


def _attention_differences(target: dict[str, Any], t_arch: str, drafter: dict[str, Any], d_arch: str) -> list[str]:
    """Whether each drafter layer can read the target layer llama.cpp gives it
    (src/llama-model.cpp, gemma4-assistant: a sliding-window layer reads the
    target's layer n-2, a full one n-1): the same KV head count and K/V head
    sizes. One line per kind of layer and key, naming the target's layer."""
    n_target = target.get(f"{t_arch}.block_count")
    t_pattern = target.get(f"{t_arch}.attention.sliding_window_pattern")
    if not isinstance(n_target, int):
        n_target = len(t_pattern) if isinstance(t_pattern, list) else None
    d_pattern = drafter.get(f"{d_arch}.attention.sliding_window_pattern")
    if not isinstance(d_pattern, list):
        return [f"the drafter has no {d_arch}.attention.sliding_window_pattern (llama.cpp needs it to know "
                "which of the target's layers each of its layers reads)"]
    if n_target is None or n_target < 2:
        return [f"the target's layer count ({t_arch}.block_count) is {n_target!r}: the drafter reads its last two"]
    diffs: list[str] = []
    for swa, kind in ((True, "sliding-window"), (False, "full-attention")):
        layers = [i for i, x in enumerate(d_pattern) if bool(x) == swa]
        t_layer = n_target - 2 if swa else n_target - 1
        t_swa = _is_swa(target, t_arch, t_layer, swa)
        for key, label in (("attention.head_count_kv", "KV heads"), ("attention.key_length", "K head size"),
                           ("attention.value_length", "V head size")):
            t_key = f"{key}_swa" if t_swa and key != "attention.head_count_kv" else key
            d_key = f"{key}_swa" if swa and key != "attention.head_count_kv" else key
            tv = _at(target, f"{t_arch}.{t_key}", t_layer)
            dvs = sorted({v for i in layers if (v := _at(drafter, f"{d_arch}.{d_key}", i)) is not None})
            if tv is None or not dvs or dvs == [tv]:
                continue
            shown = ", ".join(map(str, dvs))
            diffs.append(f"{label} of its {kind} layers ({d_key}): drafter {shown}, "
                         f"the target's layer {t_layer} (which they read) has {tv}")
    return diffs


def _vocab_differences(target: dict[str, Any], drafter: dict[str, Any]) -> list[str]:
    diffs = []
    tm, dm = target.get("tokenizer.ggml.model"), drafter.get("tokenizer.ggml.model")
    if tm != dm:
        diffs.append(f"vocabulary: tokenizer {dm!r}, the target's is {tm!r}")
    tn, dn = _tokens(target), _tokens(drafter)
    if tn != dn:
        diffs.append(f"vocabulary: {dn} tokens, the target has {tn}")
    elif _digest(target) != _digest(drafter):
        diffs.append(f"vocabulary: the same size ({tn} tokens) but different token texts")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        tv, dv = target.get(key), drafter.get(key)
        if tv != dv:
            diffs.append(f"vocabulary: {key.rsplit('.', 1)[1]} {dv}, the target's is {tv}")
    return diffs


def assistant_pairing(target_path: str | os.PathLike, drafter_path: str | os.PathLike, *,
                      target_meta: dict[str, Any] | None = None) -> MtpPairing:
    """How the drafter at ``drafter_path`` pairs with the target at ``target_path``
    (headers only). ModelLoadError when either file cannot be read as GGUF."""
    target = target_meta if target_meta is not None else read_header(target_path, what="model file")
    drafter = read_header(drafter_path, what="MTP drafter")
    return MtpPairing(drafter=str(drafter_path), target=str(target_path),
                      differences=tuple(_differences(target, drafter)))


def check_assistant(target_path: str | os.PathLike, drafter_path: str | os.PathLike) -> MtpPairing:
    """The pairing when it pairs; ModelLoadError naming every difference when it
    does not (or when a file cannot be read)."""
    pairing = assistant_pairing(target_path, drafter_path)
    if not pairing.ok:
        raise ModelLoadError(f"MTP drafter {pairing.why()}")
    return pairing


def find_sibling(target_path: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(the first ``mtp-*.gguf`` beside ``target_path`` that pairs with it, or None;
    one line per candidate saying why it was taken or not). Never raises for
    a candidate: a sibling that does not pair, or cannot be read, is a line
    (``siblings.find_sibling``)."""
    return siblings.find_sibling(
        target_path, SIBLING_GLOB,
        read_model=lambda target: read_header(target, what="model file"),
        pair=lambda meta, cand: assistant_pairing(Path(os.path.expanduser(str(target_path))), cand, target_meta=meta),
        why=lambda _pairing: "architecture, hidden size, vocabulary")
