"""Gemma 4 on mlx-lm: the parts of its model the MLX backend needs by hand.

mlx-lm 0.32 has Gemma 4 (``mlx_lm.models.gemma4``, which reads the full
multimodal ``gemma4`` config.json and keeps only the text model, and
``gemma4_text``). Three things about it matter to the backend:

- **KV-shared layers.** The last ``num_kv_shared_layers`` layers have no
  K/V projections of their own: they reuse the K/V of the last earlier layer
  of their kind (sliding-window or full attention). The model takes a cache
  only for the layers before them; a cache entry for a shared layer would be
  appended to twice. :func:`cache_layers` is how many entries it takes.
- **The output head** is the tied embedding (or ``lm_head``) followed by a
  soft cap (``final_logit_softcapping``): :func:`head` applies both, so the
  backend computes logits only for the rows asked for.
- **What the MTP assistant reads** (``backends.mlx_mtp``): the target's hidden
  state after the final norm (:func:`body` returns it) and, per kind of
  layer, the K/V of the layer the shared layers would read
  (:func:`shared_kv`), from the backend's own cache.
"""

from __future__ import annotations

from typing import Any

MODULES = ("mlx_lm.models.gemma4", "mlx_lm.models.gemma4_text")


def is_gemma4(model: Any) -> bool:
    """Whether ``model`` is mlx-lm's Gemma 4 (the multimodal wrapper or the text model)."""
    return type(model).__module__ in MODULES


def text_model(model: Any) -> Any:
    """The ``gemma4_text.Model`` (the wrapper keeps it as ``language_model``)."""
    return getattr(model, "language_model", model)


def body(model: Any) -> Any:
    """The transformer without the head: called as ``body(x, cache=...)`` it
    returns the hidden states after the final norm."""
    return text_model(model).model


def head(model: Any, h: Any) -> Any:
    """Logits of hidden rows ``h``: the (tied) output projection, then the soft cap."""
    import mlx.core as mx

    lm = text_model(model)
    logits = lm.model.embed_tokens.as_linear(h) if lm.tie_word_embeddings else lm.lm_head(h)
    cap = lm.final_logit_softcapping
    if cap is not None:
        logits = mx.tanh(logits / cap) * cap
    return logits


def args(model: Any) -> Any:
    """The text model's ``ModelArgs``."""
    return text_model(model).args


def cache_layers(model: Any) -> int:
    """How many cache entries the model takes: the layers before the KV-shared ones."""
    a = args(model)
    return a.num_hidden_layers - a.num_kv_shared_layers


def kv_sources(model: Any) -> dict[str, int]:
    """Layer kind ("sliding_attention", "full_attention") -> the index of the
    last layer of that kind with K/V of its own: the layer whose K/V the
    shared layers (and the MTP assistant's layers of that kind) read."""
    kinds = args(model).layer_types
    return {kinds[i]: i for i in range(cache_layers(model))}


def shared_kv(model: Any, cache: list[Any], n: int) -> dict[str, tuple[Any, Any]]:
    """Layer kind -> (keys, values) of the first ``n`` cached positions, as the
    MTP assistant reads them: (1, kv heads, n, head dim) each, after the
    target's K norm and RoPE, exactly what its own attention used."""
    out = {}
    for kind, i in kv_sources(model).items():
        c = cache[i]
        out[kind] = (c.keys[..., :n, :], c.values[..., :n, :])
    return out


def embed_width(model: Any) -> int:
    """The target's hidden size."""
    return int(args(model).hidden_size)
