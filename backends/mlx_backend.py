"""The MLX backend: mlx + mlx-lm, for MLX model folders and for GGUF files.

On Apple Silicon MLX runs on the GPU (Metal) with unified memory; on Linux it
runs on ``mlx[cpu]``, which is slow (about 1.5 tokens/s for SmolLM2-135M on
2 cores) but runs the same code, so the backend is tested everywhere.
Install it with ``pip install 'local-assistant[mlx]'``. Nothing from mlx is
imported until the backend is asked whether it is available or to load a
model, so ``import backends.mlx_backend`` works without it.

Two kinds of model:

- **MLX model folders** (``config.json``, ``model*.safetensors``, tokenizer
  files), the format of the mlx-community models: loaded with mlx-lm's
  ``load_model`` (any architecture mlx-lm knows, quantized or not).
- **GGUF files**, read by ``mlx.core.load`` (tensors plus metadata), so one
  file serves both backends. MLX reads Q4_0, Q4_1 and Q8_0 as its own 4/8-bit
  affine quantization (group size 32) and F16/F32 as they are; files with any
  other tensor type (the K-quants such as Q4_K_M, the IQ types...) are refused
  up front with the type named. The tensors are renamed onto mlx-lm's model
  classes (``GGUF_ARCHITECTURES``: ``llama`` and ``gemma3``) and undone where
  llama.cpp's converter changed them:

  - llama: the converter permutes the rows of Q and K so llama.cpp can apply
    RoPE to interleaved pairs; mlx-lm (like Hugging Face) rotates halves, so
    the rows are permuted back (``_unpermute``, on packed weights, scales and
    biases alike: the permutation only moves whole rows);
  - gemma3: the converter adds 1 to every RMSNorm weight (llama.cpp multiplies
    by the weight, Gemma by 1 + weight), so 1 is subtracted again.

  The tokenizer is rebuilt from the file's own vocabulary with the
  ``tokenizers`` library (``backends.tokenizer``) and the chat template comes
  from ``tokenizer.chat_template``: no torch, no transformers models, no hub.

The KV cache is mlx-lm's ``KVCache``, one per layer, in full: for models with
sliding-window layers (Gemma 3) the window is applied by the attention mask
rather than by a rotating cache, so ``truncate`` can cut the cache back to any
point, as the speculative engine needs (like llama.cpp's ``swa_full``).
``forward`` runs the transformer once per chunk and applies the output
projection only to the rows asked for.

Numbers: on a CPU, float16 runs about 25 times slower than float32 in MLX
(measured here: 0.06 vs 1.6 tokens/s for SmolLM2), so on a CPU every floating
tensor, quantization scales included, is cast to float32; on a GPU they stay
as stored.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import chat_template, sizing
from .base import (
    Backend,
    BackendError,
    BackendUnavailable,
    ContextOverflowError,
    LoadOptions,
    ModelInfo,
    ModelLoadError,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'local-assistant[mlx]'"
GGUF_MAGIC = b"GGUF"
# Tensor types mlx.core.load reads from GGUF (the rest it cannot, or only by
# expanding them to float16, which would multiply the memory used).
GGUF_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
DEFAULT_N_BATCH = 512
GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1 and Q8_0 blocks hold 32 weights

# GGUF architecture -> mlx-lm model module
GGUF_ARCHITECTURES = {"llama": "llama", "gemma3": "gemma3_text"}

# mlx-lm model modules whose model.model(...) returns normalized hidden states
# and whose output projection is lm_head or the tied embedding: forward()
# applies the projection only to the rows asked for. Others run whole.
_SPLIT_HEAD_MODULES = ("mlx_lm.models.llama", "mlx_lm.models.gemma3_text")

_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA3_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


# ---------------------------------------------------------------------------
# Lazy imports


def _mlx():
    """(mlx.core, mlx.nn), or BackendUnavailable naming the extra to install."""
    try:
        import mlx.core as mx
        import mlx.nn as nn
    except ImportError as exc:
        raise BackendUnavailable(f"MLX is not installed ({exc}); install the extra: {INSTALL_HINT}") from exc
    except (OSError, RuntimeError) as exc:
        raise BackendUnavailable(f"mlx is installed but its native library failed to load: {exc}") from exc
    for module in ("mlx_lm", "tokenizers"):
        if importlib.util.find_spec(module) is None:
            raise BackendUnavailable(f"{module} is not installed; install the extra: {INSTALL_HINT}")
    return mx, nn


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _spec_found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---------------------------------------------------------------------------
# What is at a path (cheap checks, before anything is loaded)


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def folder_summary(folder: str | Path) -> dict[str, Any]:
    """What ``assistant doctor`` shows about an MLX model folder (only JSON is read).

    The same keys as ``backends.gguf.summary``; raises ModelLoadError when the
    folder is not a model folder."""
    from .tokenizer import read_json

    folder = Path(folder)
    config = _check_folder(folder)
    tc = _text_config(config)
    layers = tc.get("num_hidden_layers")
    heads = tc.get("num_attention_heads")
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or (tc["hidden_size"] // heads if heads and tc.get("hidden_size") else None)
    kv = layers * kv_heads * head_dim * 2 * 2 if layers and kv_heads and head_dim else None
    q = config.get("quantization") or {}
    tcfg = read_json(folder / "tokenizer_config.json")
    return {
        "architecture": config.get("model_type"),
        "name": folder.name,
        "context_length": tc.get("max_position_embeddings"),
        "quantization": f"{q['bits']}-bit MLX (group {q.get('group_size', '?')})" if "bits" in q else
                        str(config.get("torch_dtype") or config.get("dtype") or "unquantized"),
        "has_chat_template": bool(tcfg.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
        "kv_bytes_per_token": kv,
        "size_bytes": _folder_size(folder),
    }


def _arch_module(model_type: str) -> str | None:
    """The mlx-lm module name for a config.json model_type, or None if mlx-lm has none."""
    remap = {"mistral": "llama"}
    try:
        from mlx_lm.utils import MODEL_REMAPPING

        remap = MODEL_REMAPPING
    except Exception:  # noqa: BLE001 - older/newer mlx-lm: fall back to the name itself
        pass
    name = remap.get(model_type, model_type)
    if not name.replace("_", "").isalnum() or not _spec_found(f"mlx_lm.models.{name}"):
        return None
    return name


def _check_folder(folder: Path) -> dict[str, Any]:
    from .tokenizer import read_json

    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{folder} is not a model folder: it has no config.json (an MLX model folder holds config.json, "
            "model*.safetensors and tokenizer files; or give the path of a GGUF file)"
        )
    config = read_json(cfg_file)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelLoadError(f"{cfg_file} has no model_type, so the architecture is unknown")
    if not any(folder.glob("model*.safetensors")):
        raise ModelLoadError(f"{folder} has a config.json but no weights (model*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def _check_gguf(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metadata without arrays, tensor infos); ModelLoadError for files MLX cannot load."""
    from .gguf import FILE_TYPES, read_metadata, read_tensor_infos

    meta = read_metadata(path)
    arch = meta.get("general.architecture")
    infos = read_tensor_infos(path)
    bad: dict[str, list[str]] = {}
    for t in infos:
        if t["type"] not in GGUF_TENSOR_TYPES:
            bad.setdefault(t["type"], []).append(t["name"])
    if bad:
        ftype = meta.get("general.file_type")
        ftype_name = FILE_TYPES.get(ftype, f"type {ftype}") if ftype is not None else "unknown type"
        kinds = "; ".join(f"{len(v)} {k} tensor{'s' * (len(v) != 1)} (e.g. {v[0]})" for k, v in sorted(bad.items()))
        raise ModelLoadError(
            f"{path} is a {ftype_name} GGUF file, which the MLX backend cannot load: it has {kinds}. "
            f"MLX reads GGUF tensors of types {', '.join(GGUF_TENSOR_TYPES)} only. Use the llama.cpp backend "
            "for this file (backend: llama.cpp), or a Q4_0/Q4_1/Q8_0/F16 GGUF or an MLX model folder"
        )
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path} is a GGUF file of architecture {arch!r}, which the MLX backend cannot map onto mlx-lm "
            f"(GGUF architectures it maps: {', '.join(GGUF_ARCHITECTURES)}); use the llama.cpp backend for it"
        )
    return meta, infos


def inspect_model(path: str | Path) -> str:
    """"gguf" or "folder" when the MLX backend can try to load ``path``; ModelLoadError otherwise.

    Cheap: reads headers and JSON, not weights. The daemon calls it (through
    ``check_model``) before it unloads anything, so a bad load leaves the
    model it had in place."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ModelLoadError(f"model path not found: {p}")
    if p.is_dir():
        config = _check_folder(p)
        if _arch_module(str(config["model_type"])) is None:
            raise ModelLoadError(
                f"{p / 'config.json'} names architecture {config['model_type']!r}, which mlx-lm "
                f"{_version('mlx-lm')} does not support"
            )
        return "folder"
    try:
        with p.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{p} is neither a GGUF file (it starts with {magic!r}) nor an MLX model folder; "
            "the MLX backend loads GGUF files and folders with config.json + safetensors"
        )
    _check_gguf(p)
    return "gguf"


# ---------------------------------------------------------------------------
# GGUF -> mlx-lm


def _py(value: Any) -> Any:
    """mx.load's metadata values (mx.array scalars and vectors) as plain Python."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _unpermute(x, n_head: int):
    """Undo llama.cpp's convert permute of Q/K rows (interleaved RoPE -> rotate-halves)."""
    rows = x.shape[0]
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _rope_with_freqs(nn, mx, dims: int, base: float, factors):
    """RoPE with llama.cpp's per-dimension frequency factors (``rope_freqs.weight``, Llama 3.1+)."""

    class FreqsRoPE(nn.Module):
        def __init__(self):
            super().__init__()
            self._freqs = (base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)) * factors.astype(mx.float32)

        def __call__(self, x, offset: int = 0):
            return mx.fast.rope(x, dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)

    return FreqsRoPE()


def _gguf_args(arch: str, meta: dict[str, Any], weights: dict[str, Any], path: Path) -> dict[str, Any]:
    def get(key: str, default: Any = None, required: bool = True) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ModelLoadError(f"{path} lacks the metadata key {arch}.{key}")
        return value

    n_head = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_head)
    if isinstance(n_kv, list):
        raise ModelLoadError(f"{path}: per-layer key/value head counts are not supported by the MLX backend")
    embd = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", embd // n_head))
    scale = get("rope.scaling.factor", None, required=False) or get("rope.scale_linear", None, required=False)
    rope_scaling = {"type": "linear", "factor": float(scale)} if scale and float(scale) != 1.0 else None
    args = {
        "hidden_size": embd,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "vocab_size": int(weights["token_embd.weight"].shape[0]),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_scaling": rope_scaling,
    }
    if arch == "llama":
        rope_dims = int(get("rope.dimension_count", head_dim))
        if rope_dims != head_dim:
            raise ModelLoadError(f"{path}: partial rotary embeddings ({rope_dims} of {head_dim}) are not supported")
        args.update(model_type="llama", tie_word_embeddings="output.weight" not in weights,
                    attention_bias="blk.0.attn_q.bias" in weights, rope_traditional=False)
    elif arch == "gemma3":
        # llama.cpp: 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(n_embd/n_head)
        scalar = embd / n_head if args["num_hidden_layers"] == 62 else head_dim
        args.update(model_type="gemma3_text", rope_local_base_freq=10000.0, query_pre_attn_scalar=scalar,
                    sliding_window=int(get("attention.sliding_window", 512)), sliding_window_pattern=6)
    return args


def _gguf_weights(arch: str, weights: dict[str, Any], args: dict[str, Any], path: Path):
    """GGUF tensor names -> mlx-lm parameter names, with llama.cpp's changes undone."""
    block = _LLAMA_BLOCK if arch == "llama" else _GEMMA3_BLOCK
    out: dict[str, Any] = {}
    rope_freqs = None
    for name, value in weights.items():
        parts = name.split(".")
        base, suffix = ".".join(parts[:-1]), parts[-1]  # suffix: weight | bias | scales | biases
        if name == "rope_freqs.weight":
            rope_freqs = value
            continue
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in block:
            layer, kind = parts[1], parts[2]
            if arch == "llama" and kind in ("attn_q", "attn_k"):  # rows of weight, scales, biases, bias
                value = _unpermute(value, args["num_attention_heads"] if kind == "attn_q"
                                   else args["num_key_value_heads"])
            if arch == "gemma3" and kind.endswith("norm"):
                value = value - 1.0
            out[f"model.layers.{layer}.{block[kind]}.{suffix}"] = value
        elif base in _TOP:
            if arch == "gemma3" and base == "output_norm":
                value = value - 1.0
            out[f"{_TOP[base]}.{suffix}"] = value
        else:
            raise ModelLoadError(f"{path}: tensor {name!r} has no place in mlx-lm's {arch} model")
    return out, rope_freqs


# ---------------------------------------------------------------------------
# The backend


class MLXBackend(Backend):
    """A model in-process through MLX (one sequence, driven from one thread)."""

    name = "mlx"

    def __init__(self) -> None:
        self._model = None
        self._cache: list[Any] | None = None
        self._tok = None
        self._template = None
        self._info: ModelInfo | None = None
        self._tokens: list[int] = []
        self._split_head = False
        self._exact_cache = True

    # -- availability --------------------------------------------------------

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        missing = [name for name, mod in (("mlx", "mlx.core"), ("mlx-lm", "mlx_lm"), ("tokenizers", "tokenizers"))
                   if not _spec_found(mod)]
        if missing:
            return False, f"{' and '.join(missing)} not installed; install the extra: {INSTALL_HINT}"
        try:
            mx, _ = _mlx()
        except BackendUnavailable as exc:
            return False, str(exc)
        device = "GPU (Metal)" if _on_gpu(mx) else "CPU only, slow"
        return True, f"mlx {_version('mlx')} + mlx-lm {_version('mlx-lm')} ({device})"

    @classmethod
    def check_model(cls, path: str) -> None:
        """Raise ModelLoadError if this backend cannot load ``path`` (headers and JSON only)."""
        inspect_model(path)

    # -- loading -------------------------------------------------------------

    def load(self, path: str, options: LoadOptions | None = None) -> ModelInfo:
        options = options or LoadOptions()
        if self._model is not None:
            self.unload()
        mx, nn = _mlx()
        p = Path(os.path.expanduser(str(path)))
        kind = inspect_model(p)
        choices: dict[str, str] = {}
        extra = dict(options.extra or {})
        on_gpu = _on_gpu(mx)
        dtype_name = extra.get("dtype") or ("as stored" if on_gpu else "float32")
        try:
            if kind == "folder":
                model, arch, train_ctx, own_template, tok, n_params, quant = self._load_folder(p)
                size = _folder_size(p)
            else:
                model, arch, train_ctx, own_template, tok, n_params, quant = self._load_gguf(mx, nn, p)
                size = p.stat().st_size
            if dtype_name != "as stored":
                model.set_dtype(getattr(mx, dtype_name))
            mx.eval(model.parameters())
        except (ModelLoadError, BackendUnavailable):
            raise
        except MemoryError as exc:
            raise ModelLoadError(f"not enough memory to load {p} with MLX") from exc
        except Exception as exc:  # noqa: BLE001 - mlx/mlx-lm raise ValueError, RuntimeError, KeyError...
            raise ModelLoadError(f"MLX could not load {p}: {type(exc).__name__}: {exc}") from exc
        choices["dtype"] = (f"{dtype_name}: set in config" if extra.get("dtype") else
                            "as stored (GPU)" if on_gpu else
                            "float32 (MLX computes float16 about 25x slower on a CPU)")
        choices.update(tok.notes)

        # context: from the options, else from the machine's figures (as llama.cpp does)
        machine = options.machine or sizing.measure()
        cache_bytes = 2 if dtype_name in ("as stored", "float16", "bfloat16") else 4
        kv_per_token = _kv_bytes_per_token(model, cache_bytes)
        requested = int(options.n_ctx) if options.n_ctx else None
        if requested is not None and requested < 16:
            raise ModelLoadError(f"context size {requested} is too small (at least 16 tokens)")
        n_ctx, why = sizing.pick_context(machine, train_ctx=train_ctx, model_bytes=size,
                                           kv_bytes_per_token=kv_per_token, requested=requested)
        choices["context"] = why
        choices["threads"] = "MLX schedules its own threads (the threads setting applies to llama.cpp)"
        source_template, compiled, source = chat_template.choose_template(
            own_template, arch, options.chat_template, choices)

        self._model, self._tok, self._template = model, tok, compiled
        module = type(model).__module__
        self._split_head = module in _SPLIT_HEAD_MODULES
        self._exact_cache = module in _SPLIT_HEAD_MODULES
        self._n_ctx = n_ctx
        self._n_batch = max(1, int(options.n_batch or DEFAULT_N_BATCH))
        self._vocab = int(_vocab_size(model, tok))
        self._cache = self._new_cache()
        self._tokens = []
        self._info = ModelInfo(
            name=str(extra.get("name") or (p.name if p.is_dir() else p.stem)),
            path=str(p),
            backend=self.name,
            architecture=arch,
            context_length=n_ctx,
            train_context_length=train_ctx,
            vocab_size=self._vocab,
            chat_template=source_template,
            template_source=source,
            bos_token_id=tok.bos,
            eos_token_ids=sorted(tok.eog, key=lambda t: (t != tok.eos, t)),
            size_bytes=size,
            quantization=quant,
            n_threads=0,
            n_params=n_params,
            choices=choices,
        )
        return self._info

    def _load_gguf(self, mx, nn, p: Path):
        from mlx_lm.models import gemma3_text, llama

        from . import tokenizer
        from .gguf import FILE_TYPES

        weights, raw_meta = mx.load(str(p), return_metadata=True)
        meta = {k: _py(v) for k, v in raw_meta.items()}
        arch = str(meta.get("general.architecture"))
        if "token_embd.weight" not in weights:
            raise ModelLoadError(f"{p} has no token_embd.weight tensor")
        args = _gguf_args(arch, meta, weights, p)
        module = llama if arch == "llama" else gemma3_text
        model = module.Model(module.ModelArgs.from_dict(args))
        mapped, rope_freqs = _gguf_weights(arch, weights, args, p)
        if arch == "gemma3" and "lm_head.weight" not in mapped:
            model.sanitize(mapped)  # no output.weight: tied to the embedding (drops lm_head)

        def quantized(path_: str, module_: Any):
            scales = mapped.get(f"{path_}.scales")
            if scales is None or not hasattr(module_, "to_quantized"):
                return False
            in_dims = scales.shape[-1] * GGUF_GROUP_SIZE
            return {"group_size": GGUF_GROUP_SIZE, "bits": mapped[f"{path_}.weight"].shape[-1] * 32 // in_dims}

        nn.quantize(model, group_size=GGUF_GROUP_SIZE, bits=4, class_predicate=quantized)
        try:
            model.load_weights(list(mapped.items()), strict=True)
        except ValueError as exc:
            raise ModelLoadError(f"{p}: its tensors do not fit mlx-lm's {arch} model: {exc}") from None
        if rope_freqs is not None and arch == "llama":
            for layer in model.layers:
                layer.self_attn.rope = _rope_with_freqs(nn, mx, args["head_dim"], args["rope_theta"], rope_freqs)
        model.eval()
        tok = tokenizer.from_gguf_metadata(meta, source=str(p))
        ftype = meta.get("general.file_type")
        quant = FILE_TYPES.get(ftype, str(ftype)) if ftype is not None else None
        n_params = 0
        for k, v in mapped.items():
            if not k.endswith((".scales", ".biases")):
                bits = _bits(mapped, k) if k.endswith(".weight") else None
                n_params += math.prod(v.shape) * 32 // bits if bits else math.prod(v.shape)
        train_ctx = int(args["max_position_embeddings"])
        return model, arch, train_ctx, meta.get("tokenizer.chat_template"), tok, n_params, quant

    def _load_folder(self, p: Path):
        from mlx_lm.utils import get_total_parameters, load_model

        from . import tokenizer

        try:
            model, config = load_model(p, lazy=True, strict=True)
        except FileNotFoundError as exc:
            raise ModelLoadError(f"{p} is incomplete: {exc}") from None
        except ValueError as exc:
            raise ModelLoadError(f"mlx-lm cannot load {p}: {exc}") from None
        tk = None
        if not (p / "tokenizer.json").is_file():  # e.g. tokenizer.model only: let mlx-lm (transformers) convert it
            from mlx_lm.utils import load_tokenizer

            try:
                tk = load_tokenizer(p)._tokenizer.backend_tokenizer
            except Exception as exc:  # noqa: BLE001
                raise ModelLoadError(f"cannot read the tokenizer of {p}: {exc}") from None
        tok, template = tokenizer.from_hf_folder(p, config, tk)
        tc = _text_config(config)
        q = config.get("quantization") or {}
        quant = f"{q['bits']}-bit MLX (group {q.get('group_size', '?')})" if "bits" in q else \
            str(config.get("torch_dtype") or config.get("dtype") or "unquantized")
        train_ctx = int(tc.get("max_position_embeddings") or 0)
        return model, str(config.get("model_type")), train_ctx, template, tok, int(get_total_parameters(model)), quant

    def _new_cache(self) -> list[Any]:
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        if self._exact_cache:
            return [KVCache() for _ in self._model.layers]
        return make_prompt_cache(self._model)

    def unload(self) -> None:
        if self._model is None:
            return
        self._model = self._cache = self._tok = self._template = None
        self._info = None
        self._tokens = []
        try:
            import mlx.core as mx

            mx.clear_cache()
        except Exception:  # noqa: BLE001 - freeing is best effort
            pass

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise BackendError("no model is loaded")
        return self._info

    def _require(self) -> None:
        if self._model is None:
            raise BackendError("no model is loaded")

    # -- tokenizer -------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        self._require()
        return self._tok.tokenize(text, add_bos=add_bos, special=special)

    def token_bytes(self, token: int) -> bytes:
        self._require()
        if not 0 <= token < self._tok.vocab_size:
            raise BackendError(f"token id {token} is out of range (vocabulary of {self._tok.vocab_size})")
        return self._tok.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self._tok is not None and token in self._tok.eog

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        self._require()
        tok = self._tok
        return chat_template.render(self._template, messages, bos_token=tok.token_text(tok.bos),
                                    eos_token=tok.token_text(tok.eos),
                                    add_generation_prompt=add_generation_prompt, **kwargs)

    # -- forward / truncate ------------------------------------------------------

    @property
    def cached_tokens(self) -> list[int]:
        return list(self._tokens)

    def forward(self, tokens: Sequence[int], logits_at: Sequence[int] | None = None) -> np.ndarray:
        self._require()
        import mlx.core as mx

        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        n0 = len(self._tokens)
        if n0 + n > self._n_ctx:
            raise ContextOverflowError(
                f"{n0 + n} tokens do not fit the {self._n_ctx}-token context window ({n0} cached + {n} new)",
                needed=n0 + n, available=self._n_ctx)
        if logits_at is None:
            rows = [n - 1]
        else:
            rows = [int(i) + n if int(i) < 0 else int(i) for i in logits_at]
            for i, r in zip(logits_at, rows):
                if not 0 <= r < n:
                    raise IndexError(f"logits_at index {i} is outside the {n} tokens given")
        toks = [int(t) for t in tokens]
        for t in toks:
            if not 0 <= t < self._vocab:
                raise BackendError(f"token id {t} is out of range (vocabulary of {self._vocab})")
        wanted = sorted(set(rows))
        got: dict[int, np.ndarray] = {}
        model, cache = self._model, self._cache
        try:
            start = 0
            while start < n:
                m = min(self._n_batch, n - start)
                x = mx.array([toks[start:start + m]], dtype=mx.int32)
                here = [r - start for r in wanted if start <= r < start + m]
                if self._split_head:
                    h = model.model(x, cache=cache)
                    logits = self._head(h[0, mx.array(here)]) if here else None
                else:
                    full = model(x, cache=cache)
                    logits = full[0, mx.array(here)] if here else None
                if logits is not None:
                    logits = logits.astype(mx.float32)
                    mx.eval(logits, [c.state for c in cache])
                    arr = np.array(logits, copy=True)
                    for k, r in enumerate(here):
                        got[r + start] = arr[k]
                else:
                    mx.eval([c.state for c in cache])
                start += m
        except Exception as exc:
            self._rollback(n0)
            if isinstance(exc, (BackendError, ValueError, IndexError)):
                raise
            raise BackendError(f"MLX forward failed: {type(exc).__name__}: {exc}") from exc
        self._tokens.extend(toks)
        return np.stack([got[r] for r in rows]).astype(np.float32, copy=False)

    def _head(self, h):
        model = self._model
        if "lm_head" in model:
            return model.lm_head(h)
        return model.model.embed_tokens.as_linear(h)

    def _rollback(self, n0: int) -> None:
        """After a failed forward: the cache back to the n0 tokens it held before."""
        cache = self._cache or []
        try:
            if all(c.is_trimmable() for c in cache):
                for c in cache:
                    extra = c.offset - n0
                    if extra > 0:
                        c.trim(extra)
                del self._tokens[n0:]
                return
        except Exception:  # noqa: BLE001
            pass
        self._cache = self._new_cache()
        self._tokens = []

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` cached tokens. A cache that cannot be cut there
        (a rotating cache of an architecture without an exact one) is cleared:
        callers read ``cached_tokens`` afterwards to see what is left."""
        self._require()
        if n < 0:
            raise ValueError("truncate(n) needs n >= 0")
        k = len(self._tokens) - n
        if k <= 0:
            return
        if n > 0 and all(c.is_trimmable() for c in self._cache):
            for c in self._cache:
                c.trim(k)
            del self._tokens[n:]
        else:
            self._cache = self._new_cache()
            self._tokens = []


# ---------------------------------------------------------------------------
# helpers


def _on_gpu(mx) -> bool:
    try:
        return mx.default_device().type == mx.gpu
    except Exception:  # noqa: BLE001
        return False


def _bits(mapped: dict[str, Any], weight_key: str) -> int | None:
    scales = mapped.get(weight_key[: -len(".weight")] + ".scales")
    if scales is None:
        return None
    return mapped[weight_key].shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)


def _vocab_size(model, tok) -> int:
    try:
        emb = model.model.embed_tokens
        rows = emb.weight.shape[0]
        return max(rows, 1)
    except AttributeError:
        return tok.vocab_size


def _kv_bytes_per_token(model, bytes_per_value: int) -> int | None:
    try:
        total = 0
        for layer in model.layers:
            attn = layer.self_attn
            head_dim = getattr(attn, "head_dim", None) or attn.k_proj.weight.shape[0] // attn.n_kv_heads
            total += attn.n_kv_heads * head_dim * 2 * bytes_per_value
        return total or None
    except AttributeError:
        return None
