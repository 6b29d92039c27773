"""MLX model folders (``config.json``, ``model*.safetensors``, tokenizer
files), the format of the mlx-community models: the checks on a folder,
what ``assistant doctor`` shows about one, and loading it with mlx-lm's
``load_model`` (any architecture mlx-lm knows, quantized or not)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ModelLoadError
from .mlx_native import spec_found


def folder_size(folder: Path) -> int:
    """The bytes of the files in ``folder`` (not below)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: ``text_config`` merged over the top level (multimodal configs nest them)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def quantization(config: dict[str, Any]) -> str:
    """How the weights are stored, as shown to people ("4-bit MLX (group 64)", "bfloat16"...)."""
    q = config.get("quantization") or {}
    if "bits" in q:
        return f"{q['bits']}-bit MLX (group {q.get('group_size', '?')})"
    return str(config.get("torch_dtype") or config.get("dtype") or "unquantized")


def folder_summary(folder: str | Path) -> dict[str, Any]:
    """What ``assistant doctor`` shows about an MLX model folder (only JSON is read).

    The same keys as ``backends.gguf.summary``; raises ModelLoadError when the
    folder is not a model folder."""
    from .tokenizer import read_json

    folder = Path(folder)
    config = check_folder(folder)
    tc = text_config(config)
    tcfg = read_json(folder / "tokenizer_config.json")
    return {
        "architecture": config.get("model_type"),
        "name": folder.name,
        "context_length": tc.get("max_position_embeddings"),
        "quantization": quantization(config),
        "has_chat_template": bool(tcfg.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
        "kv_bytes_per_token": kv_bytes_per_token(tc),
        "size_bytes": folder_size(folder),
    }


def kv_bytes_per_token(tc: dict[str, Any], bytes_per_value: int = 2) -> int | None:
    """KV cache bytes per token of context under a text config, None where it
    does not say. Layers that keep no cache of their own (Gemma 4's KV-shared
    layers) are not counted; full-attention layers with their own head size
    (Gemma 4's ``global_head_dim``) are. Sliding-window layers count in full:
    the MLX backend keeps every layer's cache whole, so that it can be cut
    back anywhere (see ``backends.mlx_backend``)."""
    layers, heads = tc.get("num_hidden_layers"), tc.get("num_attention_heads")
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or (tc["hidden_size"] // heads if heads and tc.get("hidden_size") else None)
    if not (isinstance(layers, int) and kv_heads and head_dim):
        return None
    kinds = tc.get("layer_types") if isinstance(tc.get("layer_types"), list) else []
    own = layers - int(tc.get("num_kv_shared_layers") or 0)
    total = 0
    for i in range(max(own, 0)):
        full = i < len(kinds) and kinds[i] == "full_attention"
        hd = tc.get("global_head_dim") if full and tc.get("global_head_dim") else head_dim
        kv = tc["num_global_key_value_heads"] if full and tc.get("attention_k_eq_v") and \
            tc.get("num_global_key_value_heads") else kv_heads
        total += int(kv) * int(hd) * 2 * bytes_per_value
    return total or None


def arch_module(model_type: str) -> str | None:
    """The mlx-lm module name for a config.json model_type, or None if mlx-lm has none."""
    remap = {"mistral": "llama"}
    try:
        from mlx_lm.utils import MODEL_REMAPPING

        remap = MODEL_REMAPPING
    except Exception:  # noqa: BLE001 - older/newer mlx-lm: fall back to the name itself
        pass
    name = remap.get(model_type, model_type)
    if not name.replace("_", "").isalnum() or not spec_found(f"mlx_lm.models.{name}"):
        return None
    return name


def check_folder(folder: Path) -> dict[str, Any]:
    """The folder's config.json, once the folder has weights and a tokenizer; ModelLoadError otherwise."""
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
    weights = list(folder.glob("model*.safetensors"))
    if not weights:
        raise ModelLoadError(f"{folder} has a config.json but no weights (model*.safetensors)")
    odd = [w.name for w in weights if not w.is_file()]  # a FIFO or a folder: reading it would block or fail
    if odd:
        raise ModelLoadError(f"{folder}: {', '.join(odd)} is not a regular file")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    return config


def _with_generation_eos(p: Path, config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with generation_config.json's end-of-generation ids where it
    has more (Gemma's end-of-turn token is often listed only there)."""
    from .tokenizer import read_json

    gen = read_json(p / "generation_config.json").get("eos_token_id")
    have = config.get("eos_token_id")
    have = have if isinstance(have, list) else [have] if have is not None else []
    extra = [e for e in (gen if isinstance(gen, list) else [gen]) if isinstance(e, int) and e not in have]
    return {**config, "eos_token_id": have + extra} if extra else config


def load_folder(p: Path):
    """(model, architecture, training context, chat template or None,
    tokenizer, parameter count, quantization) of an MLX model folder,
    through mlx-lm's ``load_model`` (weights lazy until evaluated)."""
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
    tok, template = tokenizer.from_hf_folder(p, _with_generation_eos(p, config), tk)
    train_ctx = int(text_config(config).get("max_position_embeddings") or 0)
    return (model, str(config.get("model_type")), train_ctx, template, tok, int(get_total_parameters(model)),
            quantization(config))
