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
    layers = tc.get("num_hidden_layers")
    heads = tc.get("num_attention_heads")
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or (tc["hidden_size"] // heads if heads and tc.get("hidden_size") else None)
    kv = layers * kv_heads * head_dim * 2 * 2 if layers and kv_heads and head_dim else None
    tcfg = read_json(folder / "tokenizer_config.json")
    return {
        "architecture": config.get("model_type"),
        "name": folder.name,
        "context_length": tc.get("max_position_embeddings"),
        "quantization": quantization(config),
        "has_chat_template": bool(tcfg.get("chat_template")) or (folder / "chat_template.jinja").is_file(),
        "kv_bytes_per_token": kv,
        "size_bytes": folder_size(folder),
    }


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
    if not any(folder.glob("model*.safetensors")):
        raise ModelLoadError(f"{folder} has a config.json but no weights (model*.safetensors)")
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
        raise ModelLoadError(f"{folder} has no tokenizer (tokenizer.json or tokenizer.model)")
    return config


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
    tok, template = tokenizer.from_hf_folder(p, config, tk)
    train_ctx = int(text_config(config).get("max_position_embeddings") or 0)
    return (model, str(config.get("model_type")), train_ctx, template, tok, int(get_total_parameters(model)),
            quantization(config))
