"""Gemma 4's MTP assistant on MLX: pairing it with a target and drafting with it.

Gemma 4 ships its multi-token-prediction drafter as a separate model
(``gemma4_assistant``, e.g. ``google/gemma-4-*-it-assistant`` and their
mlx-community conversions): a few Q-only transformer layers that read the
target's K/V, fed the target's token embedding of the last token concatenated
with the target's hidden state after its final norm. mlx-lm has no such
model; mlx-vlm 0.7 has (``mlx_vlm.speculative.drafters.gemma4_assistant``),
so this module loads it with mlx-vlm's ``load_drafter`` and runs its
``draft_block`` over state taken from the MLX backend's own cache, the way
mlx-vlm's round loop does (``mlx_vlm/speculative/mtp.py``):

- the drafter's K/V for each kind of layer is the target's cache of the last
  layer of that kind with K/V of its own (``mlx_gemma4.shared_kv``), all N
  cached positions; it writes no K/V of its own, so nothing is kept in step
  and nothing needs cutting back when the target's cache is;
- its first input is the pending token (the one after the cache, not yet
  evaluated) with the target's hidden state at position N-1; every draft
  step of one proposal uses position N-1, each feeding its own projected
  hidden state and token to the next.

:func:`pair_assistant` checks a drafter against a target from their
config.json files alone (nothing loaded), naming every difference, so a
drafter that does not pair is refused before anything loads. mlx-vlm is an
optional extra (``VLM_HINT``); only this module imports it, and only when a
drafter is configured.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from . import mlx_gemma4
from .base import MtpPairing, ModelLoadError
from .mlx_folder import check_folder, text_config
from .mlx_native import installed_version, spec_found

VLM_HINT = "pip install 'local-assistant[vlm]'"
ASSISTANT_TYPES = ("gemma4_assistant",)
TARGET_TYPES = ("gemma4", "gemma4_text")
_MAX_HEADER = 100 * 1024 * 1024  # a safetensors JSON header larger than this is not one


def vlm_status() -> tuple[bool, str]:
    """(True, "mlx-vlm VERSION") when mlx-vlm's Gemma 4 assistant imports here, else (False, why, naming the extra)."""
    if not spec_found("mlx_vlm"):
        return False, f"the Gemma 4 MTP assistant on MLX needs mlx-vlm, which is not installed; install: {VLM_HINT}"
    try:
        from mlx_vlm.speculative.drafters import load_drafter  # noqa: F401
        from mlx_vlm.speculative.drafters.gemma4_assistant import Model  # noqa: F401
    except ImportError as exc:  # mlx-vlm installed without a package it imports (PIL, requests...)
        return False, (f"mlx-vlm {installed_version('mlx-vlm')} is installed but cannot be imported ({exc}); "
                       f"install: {VLM_HINT}")
    return True, f"mlx-vlm {installed_version('mlx-vlm')}"


def read_assistant_config(path: Path) -> dict[str, Any]:
    """The drafter folder's config.json, once the folder holds complete weights; ModelLoadError otherwise."""
    from .tokenizer import read_json

    if not path.exists():
        raise ModelLoadError(f"MTP drafter not found: {path}")
    if not path.is_dir():
        magic = b""
        if path.is_file():  # never open anything else: a FIFO would block
            with path.open("rb") as f:
                magic = f.read(4)
        if magic == b"GGUF":
            raise ModelLoadError(
                f"MTP drafter {path} is a GGUF file, which is llama.cpp's format: the MLX backend takes an MLX "
                "assistant folder (config.json + model*.safetensors), e.g. an mlx-community *-assistant conversion")
        raise ModelLoadError(f"MTP drafter {path} is not a model folder (config.json + model*.safetensors)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(f"MTP drafter {path} is not a model folder: it has no config.json")
    config = read_json(cfg_file)
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise ModelLoadError(f"MTP drafter {path} has a config.json but no weights (model*.safetensors)")
    for w in weights:
        check_safetensors(w)
    return config


def check_safetensors(file: Path) -> None:
    """ModelLoadError when ``file`` is not a complete safetensors file (header
    unreadable, or shorter than its header says): cheap, reads the header only."""
    if not file.is_file():
        raise ModelLoadError(f"{file} is not a regular file")
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            n = struct.unpack("<Q", head)[0]
            if n > min(_MAX_HEADER, size - 8):
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        ends = [int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"]
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{file} is not a valid safetensors file ({exc})") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise ModelLoadError(f"{file} is truncated: {size} bytes, its header describes {need}")


def _target_vocab(config: dict[str, Any]) -> Any:
    # mlx-lm's gemma4 wrapper gives the text model the top level's vocab_size.
    return config.get("vocab_size") if config.get("model_type") == "gemma4" else text_config(config).get("vocab_size")


def _attention(tc: dict[str, Any], kind: str) -> tuple[Any, Any]:
    """(head size, KV heads) of a layer kind under a (text) config."""
    full = kind == "full_attention"
    hd = tc.get("global_head_dim") if full and tc.get("global_head_dim") else tc.get("head_dim")
    kv = tc.get("num_key_value_heads")
    if full and tc.get("attention_k_eq_v") and tc.get("num_global_key_value_heads"):
        kv = tc["num_global_key_value_heads"]
    return hd, kv


def _attention_differences(target: dict[str, Any], text: dict[str, Any]) -> list[str]:
    tc = text_config(target)
    n_kv = int(tc.get("num_hidden_layers") or 0) - int(tc.get("num_kv_shared_layers") or 0)
    target_kinds = set((tc.get("layer_types") or [])[:max(n_kv, 0)])
    out = []
    for kind in sorted(set(text.get("layer_types") or [])):
        if kind not in target_kinds:
            out.append(f"its {kind} layers have no {kind} layer of the target to read")
            continue
        (dh, dkv), (th, tkv) = _attention(text, kind), _attention(tc, kind)
        if dh != th:
            out.append(f"{kind} head size {dh}, the target's {th}")
        if dkv != tkv:
            out.append(f"{kind} KV heads {dkv}, the target's {tkv}")
    return out


def pair_assistant(target: Path, target_config: dict[str, Any], drafter: Path,
                   drafter_config: dict[str, Any]) -> MtpPairing:
    """Whether the assistant at ``drafter`` pairs with the target at ``target``,
    from their config.json files: architecture, the drafter's output width
    (``backbone_hidden_size``) against the target's hidden size, vocabulary,
    and the head size and KV heads of each kind of layer it reads."""
    diffs: list[str] = []
    d_type, t_type = drafter_config.get("model_type"), target_config.get("model_type")
    if d_type not in ASSISTANT_TYPES:
        diffs.append(f"architecture {d_type}, expected {' or '.join(ASSISTANT_TYPES)}")
    if t_type not in TARGET_TYPES:
        diffs.append(f"the target's architecture is {t_type}; a Gemma 4 assistant pairs with "
                     f"{' or '.join(TARGET_TYPES)}")
    text = drafter_config.get("text_config") if isinstance(drafter_config.get("text_config"), dict) else {}
    if not diffs:
        t_hidden = text_config(target_config).get("hidden_size")
        if drafter_config.get("backbone_hidden_size") != t_hidden:
            diffs.append(f"output width (backbone_hidden_size) {drafter_config.get('backbone_hidden_size')}, "
                         f"the target's hidden size {t_hidden}")
        d_vocab, t_vocab = text.get("vocab_size"), _target_vocab(target_config)
        if d_vocab != t_vocab:
            diffs.append(f"vocabulary of {d_vocab} tokens, the target's {t_vocab}")
        diffs += _attention_differences(target_config, text)
    return MtpPairing(drafter=str(drafter), target=str(target), differences=tuple(diffs), kind="assistant")


def pair_folders(target: str | Path, drafter: str | Path) -> MtpPairing:
    """:func:`pair_assistant` for two folders (what ``doctor`` and the daemon's
    pre-flight check can call); ModelLoadError when either is not a complete model folder."""
    t, d = Path(target).expanduser(), Path(drafter).expanduser()
    return pair_assistant(t, check_folder(t), d, read_assistant_config(d))


def check_pairing(target: Path, target_config: dict[str, Any], drafter: str) -> dict[str, Any]:
    """The drafter's config once it is a complete folder that pairs with the
    target and mlx-vlm can run it; ModelLoadError naming each difference otherwise."""
    path = Path(drafter).expanduser()
    config = read_assistant_config(path)
    pairing = pair_assistant(target, target_config, path, config)
    if not pairing.ok:
        raise ModelLoadError(pairing.why())
    ok, why = vlm_status()
    if not ok:
        raise ModelLoadError(f"cannot use the MTP drafter {path}: {why}")
    return config


class MlxAssistant:
    """A loaded Gemma 4 assistant bound to one loaded target (see the module doc)."""

    kind = "assistant"

    def __init__(self, model: Any, path: Path, n_layers: int):
        self.model = model
        self.path = path
        self.n_layers = n_layers
        self.hidden: Any = None  # the target's final hidden rows of its last forward...
        self.hidden_end = 0  # ... at positions [hidden_end - len(hidden), hidden_end)

    def keep_hidden(self, rows: Any, end: int) -> Any:
        """After a target forward: keep its last hidden ``rows`` (ending at
        position ``end``); returns them, for the caller to evaluate with the rest."""
        self.hidden, self.hidden_end = rows, end
        return rows

    def forget(self) -> None:
        """The target's cache was rebuilt: no hidden row is known any more."""
        self.hidden, self.hidden_end = None, 0

    def _hidden_row(self, target: Any, cache: list[Any], pos: int) -> Any:
        """The target's hidden state at ``pos``; zeros where it was not kept (a
        cut behind the last forward, which the engine never makes between
        steps): drafts are then worse, never wrong, as the target verifies them."""
        import mlx.core as mx

        h, end = self.hidden, self.hidden_end
        if h is not None and end - h.shape[0] <= pos < end:
            return h[pos - (end - h.shape[0])]
        return mx.zeros((mlx_gemma4.embed_width(target),), dtype=cache[0].keys.dtype)

    @classmethod
    def load(cls, path: str, target: Any, dtype: Any | None) -> "MlxAssistant":
        """Load the (already checked) drafter at ``path`` with mlx-vlm, cast to
        ``dtype`` (None: as stored), and bind it to ``target``'s token embedding."""
        import mlx.core as mx
        from mlx_vlm.speculative.drafters import load_drafter

        p = Path(path).expanduser()
        try:
            model, kind = load_drafter(str(p), kind="mtp")
            if kind != "mtp" or not hasattr(model, "draft_block"):
                raise ValueError(f"mlx-vlm loaded it as a {kind!r} drafter, not an MTP assistant")
            if dtype is not None:
                model.set_dtype(dtype)
            mx.eval(model.parameters())
            model.bind(target)
        except MemoryError as exc:
            raise ModelLoadError(f"not enough memory to load the MTP drafter {p}") from exc
        except Exception as exc:  # noqa: BLE001 - mlx-vlm raises ValueError, KeyError, FileNotFoundError...
            raise ModelLoadError(f"mlx-vlm could not load the MTP drafter {p}: {type(exc).__name__}: {exc}") from exc
        return cls(model, p, len(model.model.layers))

    def describe(self) -> str:
        """What ``ModelInfo.choices["mtp"]`` says about it."""
        return (f"assistant drafter {self.path.name} ({self.n_layers} layers, gemma4_assistant, "
                f"through mlx-vlm {installed_version('mlx-vlm')})")

    def draft(self, target: Any, cache: list[Any], n_cached: int, token: int, n: int) -> list[int]:
        """Up to ``n`` greedy guesses of the tokens after ``token``, the pending
        token at position ``n_cached``; ``cache`` is the target's (``n_cached`` > 0)."""
        import mlx.core as mx

        m = self.model
        hidden = self._hidden_row(target, cache, n_cached - 1)
        m.set_shared_kv(mlx_gemma4.shared_kv(target, cache, n_cached), n_cached,
                        position=n_cached - 1, kv_valid_len=n_cached)
        try:
            out = m.draft_block(int(token), hidden.reshape(1, 1, -1), None, n + 1,
                                lambda logits: mx.argmax(logits, axis=-1), greedy=True)
            mx.eval(out)
            return [int(t) for t in out.reshape(-1).tolist()]
        finally:
            m.set_shared_kv({}, 0)  # keep no view of the target's cache between drafts

    def free(self) -> None:
        """Drop the drafter's weights."""
        self.model = self.hidden = None
