"""GGUF files in MLX: ``mlx.core.load`` reads the tensors and metadata, so one
file serves both backends.

MLX reads Q4_0, Q4_1 and Q8_0 as its own 4/8-bit affine quantization (group
size 32) and F16/F32 as they are; files with any other tensor type (the
K-quants such as Q4_K_M, the IQ types...) are refused up front with the type
named (:func:`check_gguf`). The tensors are renamed onto mlx-lm's model
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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .base import ModelLoadError

# Tensor types mlx.core.load reads from GGUF (the rest it cannot, or only by
# expanding them to float16, which would multiply the memory used).
GGUF_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
GGUF_GROUP_SIZE = 32  # Q4_0, Q4_1 and Q8_0 blocks hold 32 weights

# GGUF architecture -> mlx-lm model module
GGUF_ARCHITECTURES = {"llama": "llama", "gemma3": "gemma3_text"}

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


def check_gguf(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
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
    """mlx-lm ModelArgs (as a dict) from the GGUF metadata of ``arch``."""
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


def _bits(mapped: dict[str, Any], weight_key: str) -> int | None:
    scales = mapped.get(weight_key[: -len(".weight")] + ".scales")
    if scales is None:
        return None
    return mapped[weight_key].shape[-1] * 32 // (scales.shape[-1] * GGUF_GROUP_SIZE)


def load_gguf(mx, nn, p: Path):
    """(model, architecture, training context, chat template or None,
    tokenizer, parameter count, quantization) of a GGUF file checked with
    :func:`check_gguf`: its tensors renamed onto mlx-lm's model class and
    its tokenizer rebuilt from its vocabulary (``backends.tokenizer``)."""
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
