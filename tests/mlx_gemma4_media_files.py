"""A tiny random Gemma 4 MLX model folder that sees and hears, written by the tests.

:func:`write_media_target` writes a ``gemma4`` folder laid out as the
mlx-community multimodal ones are, in the names mlx-vlm 0.7.10's ``gemma4``
model loads (strictly, so mlx-vlm's own ``load_model`` serves as the
reference in tests/test_mlx_media.py):

- ``config.json``: the text model of tests/mlx_gemma4_files.py (five layers,
  two KV-shared, sliding window 8), with per-layer inputs (as Gemma 4
  E2B/E4B have) and ``use_bidirectional_attention: "vision"`` (as the real
  configs have: an image's soft tokens attend to each other both ways); a
  ``vision_config`` (patch 4 px, 2x2 pooling, two layers) and an
  ``audio_config`` (the Conformer: one layer, 8/4 subsampling channels), and
  the media token ids.
- ``model.safetensors``: the text weights as mlx-lm saves them, the vision
  and audio towers and their embedders as mlx-vlm holds them, all random
  (constant-initialised ones, norms and the patch position table, are
  perturbed so nothing is trivially the same for every input).
- the tokenizer of tests/mlx_gemma4_files.py plus Gemma 4's media tokens
  (``<|image>``, ``<image|>``, ``<|image|>``, ``<|audio>``, ``<audio|>``,
  ``<|audio|>``, ``<|video|>``), named in tokenizer_config.json as the real
  one names them, and ``processor_config.json``: images of at most 16 soft
  tokens (a 32x32 px budget), audio at 40 ms a token.

Random weights prove the plumbing (counts, placement, attention, caching),
not quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlx_gemma4_files import TURN_END, target_text_config, write_tokenizer

# Gemma 4's media tokens, in the order they are appended to the tiny vocabulary.
MEDIA_TOKENS = {"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
                "video_token": "<|video|>"}
IMAGE_SOFT_TOKENS = 16  # processor_config.json's max_soft_tokens: a 48x48 image becomes 32x32 px, 16 tokens

VISION_CONFIG = {"model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                 "global_head_dim": 16, "patch_size": 4, "position_embedding_size": 64,
                 "pooling_kernel_size": 2, "default_output_length": IMAGE_SOFT_TOKENS, "rms_norm_eps": 1e-6,
                 "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}, "standardize": False,
                 "use_clipped_linears": False}
AUDIO_CONFIG = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                "subsampling_conv_channels": [8, 4], "conv_kernel_size": 5, "attention_chunk_size": 12,
                "attention_context_left": 13, "attention_context_right": 0, "attention_logit_cap": 50.0,
                "output_proj_dims": 48, "rms_norm_eps": 1e-6, "use_clipped_linears": True}
PROCESSOR_CONFIG = {"image_processor": {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 4,
                                        "max_soft_tokens": IMAGE_SOFT_TOKENS, "pooling_kernel_size": 2,
                                        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
                                        "do_normalize": False},
                    "audio_seq_length": 750, "audio_ms_per_token": 40, "processor_class": "Gemma4Processor"}


def _add_media_tokens(folder: Path) -> int:
    """Append the media tokens to tokenizer.json as special tokens and name
    them in tokenizer_config.json; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer

    tk = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS.values()])
    tk.save(str(folder / "tokenizer.json"))
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update({k: v for k, v in MEDIA_TOKENS.items() if k != "video_token"})
    cfg["extra_special_tokens"] = [MEDIA_TOKENS["video_token"]]
    cfg_file.write_text(json.dumps(cfg))
    return tk.get_vocab_size(with_added_tokens=True)


def _perturbed(params: dict, rng: np.random.Generator) -> dict:
    """``params`` with every constant-initialised floating tensor (norm weights
    of ones, zero scales, the position table) made random around its value;
    the clip bounds of clippable linears (+-inf: no clipping) stay."""
    import mlx.core as mx

    out = {}
    for name, value in params.items():
        a = np.array(value)
        clip = name.rsplit(".", 1)[-1] in ("input_min", "input_max", "output_min", "output_max")
        if not clip and a.size > 1 and np.issubdtype(a.dtype, np.floating) and np.all(a == a.flat[0]):
            a = a + 0.1 * rng.standard_normal(a.shape).astype(a.dtype)
        out[name] = mx.array(a)
    return out


def media_config(n_vocab: int, *, bidirectional: bool = True, per_layer_input: int = 8) -> dict:
    """config.json of the tiny multimodal target."""
    ids = {k: n_vocab - len(MEDIA_TOKENS) + i for i, k in enumerate(MEDIA_TOKENS)}
    text = target_text_config(n_vocab, hidden_size_per_layer_input=per_layer_input, use_double_wide_mlp=False,
                              **({"use_bidirectional_attention": "vision"} if bidirectional else {}))
    return {"model_type": "gemma4", "text_config": text, "vision_config": dict(VISION_CONFIG),
            "audio_config": dict(AUDIO_CONFIG), "vocab_size": n_vocab, "bos_token_id": 2,
            "eos_token_id": [1, TURN_END], "pad_token_id": 0,
            "boi_token_id": ids["boi_token"], "eoi_token_id": ids["eoi_token"],
            "image_token_id": ids["image_token"], "boa_token_id": ids["boa_token"],
            "eoa_token_id": ids["eoa_token"], "audio_token_id": ids["audio_token"],
            "video_token_id": ids["video_token"], "vision_soft_tokens_per_image": IMAGE_SOFT_TOKENS,
            "audio_ms_per_token": 40}


def write_media_target(folder: Path, *, seed: int = 0, vision: bool = True, audio: bool = True,
                       bidirectional: bool = True, per_layer_input: int = 8,
                       quantize_towers: int | None = None) -> Path:
    """A tiny random Gemma 4 folder with a vision tower (``vision``) and an
    audio tower (``audio``); without them their config is null and their
    weights absent, as in the text-only quants mlx-community publishes.
    ``quantize_towers`` (a group size): the towers' linear layers whose width
    it divides stored 4-bit, as a quantized conversion stores them (the text
    model stays as it is), and ``quantization`` in config.json."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import gemma4
    from mlx_vlm.models.gemma4.audio import AudioEncoder
    from mlx_vlm.models.gemma4.config import AudioConfig, VisionConfig
    from mlx_vlm.models.gemma4.gemma4 import MultimodalEmbedder
    from mlx_vlm.models.gemma4.vision import VisionModel

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder)
    n_vocab = _add_media_tokens(folder)
    config = media_config(n_vocab, bidirectional=bidirectional, per_layer_input=per_layer_input)
    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    text = gemma4.Model(gemma4.ModelArgs.from_dict(config))
    weights = _perturbed(dict(tree_flatten(text.parameters())), rng)
    hidden = config["text_config"]["hidden_size"]

    def add(prefix: str, module) -> None:
        module.update(tree_unflatten(list(_perturbed(dict(tree_flatten(module.parameters())), rng).items())))
        if quantize_towers:
            g = quantize_towers
            # Not the audio attention's relative_k_proj: mlx-vlm 0.7.10 would keep using the float layer
            # it also holds privately (backends/mlx_media.py re-points it; mlx-vlm, the reference, does not).
            nn.quantize(module, group_size=g, bits=4,
                        class_predicate=lambda p, m: isinstance(m, nn.Linear) and m.weight.shape[-1] % g == 0
                        and not p.endswith("relative_k_proj"))
        weights.update({f"{prefix}.{k}": v for k, v in tree_flatten(module.parameters())})

    if vision:
        vc = VisionConfig.from_dict(config["vision_config"])
        add("vision_tower", VisionModel(vc))
        add("embed_vision", MultimodalEmbedder(vc.hidden_size, hidden, vc.rms_norm_eps))
    else:
        config["vision_config"] = None
    if audio:
        ac = AudioConfig.from_dict(config["audio_config"])
        add("audio_tower", AudioEncoder(ac))
        add("embed_audio", MultimodalEmbedder(ac.output_proj_dims, hidden, ac.rms_norm_eps))
    else:
        config["audio_config"] = None
    if quantize_towers:
        config["quantization"] = {"group_size": quantize_towers, "bits": 4}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "processor_config.json").write_text(json.dumps(PROCESSOR_CONFIG))
    return folder
