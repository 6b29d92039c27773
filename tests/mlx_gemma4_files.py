"""Tiny random-weight Gemma 4 models in MLX format, written by the tests.

- :func:`write_target`: a ``gemma4`` model folder as mlx-community publishes
  them (config.json with the text model's settings under ``text_config``,
  ``model.safetensors`` named as mlx-lm saves it, tokenizer.json +
  tokenizer_config.json with Gemma 4's chat template). Five layers: sliding,
  sliding, full, then two KV-shared layers (a sliding and a full one that
  reuse layers 1 and 2's K/V), a sliding window of 8, the full-attention
  layers with a wider head and partial rotary embeddings, as Gemma 4 has.
- :func:`write_assistant`: its ``gemma4_assistant`` MTP drafter (what
  ``google/gemma-4-*-assistant`` checkpoints hold, in the names mlx-vlm
  loads): two Q-only layers (a sliding and a full one) that read the target's
  K/V, the projection in from (token embedding ++ target hidden state) and
  back out to the target's width. Written with numpy, so tests that only
  read its config.json (the pairing refusals) need no mlx-vlm.

The vocabulary and the chat template are the GGUF tests' (tests/gemma4_files.py):
the same tokens, so both backends see the same ids. Random weights prove the
plumbing, not quality: the target accepts almost none of the drafter's tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gemma4_files import GEMMA4_CHAT_TEMPLATE, gemma4_vocab

ROPE = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0, "rope_type": "proportional"},
        "sliding_attention": {"partial_rotary_factor": 1.0, "rope_theta": 10_000.0, "rope_type": "default"}}
LAYERS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TURN_END = 5  # "<turn|>" in gemma4_vocab(): ends a turn, as id 106 does in the real vocabulary


def target_text_config(n_vocab: int, **overrides) -> dict:
    """The ``text_config`` of the tiny target (``overrides`` change any key)."""
    cfg = {"model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": len(LAYERS),
           "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
           "global_head_dim": 64, "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 0,
           "vocab_size": n_vocab, "vocab_size_per_layer_input": n_vocab, "sliding_window": 8,
           "layer_types": list(LAYERS), "max_position_embeddings": 4096, "rope_parameters": ROPE,
           "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    cfg.update(overrides)
    return cfg


def write_tokenizer(folder: Path) -> int:
    """tokenizer.json (Gemma's kind: BPE over ``▁``-for-space text with byte
    fallback) and tokenizer_config.json with the chat template; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    meta, n_vocab = gemma4_vocab()
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, byte_fallback=True,
                              unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Replace(" ", "▁")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, kind in zip(tokens, types) if kind == 3])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "add_bos_token": True,
         "chat_template": GEMMA4_CHAT_TEMPLATE}))
    return n_vocab


def write_target(folder: Path, *, seed: int = 0, model_type: str = "gemma4", **text_overrides) -> Path:
    """A tiny random Gemma 4 model folder (``model_type`` "gemma4": the
    multimodal config layout; "gemma4_text": the text model's alone)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma4, gemma4_text

    folder.mkdir(parents=True, exist_ok=True)
    n_vocab = write_tokenizer(folder)
    text = target_text_config(n_vocab, **text_overrides)
    mx.random.seed(seed)
    if model_type == "gemma4":
        config = {"model_type": "gemma4", "text_config": text, "vocab_size": n_vocab,
                  "bos_token_id": 2, "eos_token_id": [1, TURN_END]}
        model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    else:
        config = {**text, "bos_token_id": 2, "eos_token_id": [1, TURN_END]}
        model = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assistant_config(n_vocab: int, *, backbone: int = 64, **text_overrides) -> dict:
    """config.json of the tiny assistant for a target of hidden size ``backbone``."""
    text = {"model_type": "gemma4_text", "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64,
            "num_kv_shared_layers": 2, "hidden_size_per_layer_input": 0, "vocab_size": n_vocab,
            "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": ROPE, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6}
    text.update(text_overrides)
    return {"model_type": "gemma4_assistant", "backbone_hidden_size": backbone, "tie_word_embeddings": True,
            "use_ordered_embeddings": False, "block_size": 4, "text_config": text}


def assistant_tensors(config: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights for ``config``, named as mlx-vlm's Gemma4AssistantDraftModel holds them."""
    text, TE = config["text_config"], config["backbone_hidden_size"]
    E, FF, H, V = text["hidden_size"], text["intermediate_size"], text["num_attention_heads"], text["vocab_size"]

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.uniform(-1, 1, (out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"model.embed_tokens.weight": (rng.standard_normal((V, E)) / np.sqrt(E)).astype(np.float32),
         "model.norm.weight": norm(E), "pre_projection.weight": lin(E, 2 * TE), "post_projection.weight": lin(TE, E)}
    for i, kind in enumerate(text["layer_types"]):
        hd = text["global_head_dim"] if kind == "full_attention" else text["head_dim"]
        b = f"model.layers.{i}."
        t.update({b + "self_attn.q_proj.weight": lin(H * hd, E), b + "self_attn.o_proj.weight": lin(E, H * hd),
                  b + "self_attn.q_norm.weight": norm(hd), b + "mlp.gate_proj.weight": lin(FF, E),
                  b + "mlp.up_proj.weight": lin(FF, E), b + "mlp.down_proj.weight": lin(E, FF),
                  b + "layer_scalar": np.ones(1, np.float32)})
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            t[b + n + ".weight"] = norm(E)
    return t


def write_assistant(folder: Path, *, seed: int = 1, backbone: int = 64, config: dict | None = None,
                    **text_overrides) -> Path:
    """A tiny random ``gemma4_assistant`` drafter folder (config.json + model.safetensors)."""
    from safetensors.numpy import save_file

    _, n_vocab = gemma4_vocab()
    config = config or assistant_config(n_vocab, backbone=backbone, **text_overrides)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(assistant_tensors(config, np.random.default_rng(seed)), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder
