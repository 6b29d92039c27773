"""Tiny random-weight Gemma 4 GGUF files for tests: a ``gemma4`` target and
its separate ``gemma4-assistant`` MTP drafter, written with tests/gguf_writer.py.

The layout follows llama.cpp as vendored in llama-cpp-python 0.3.36
(src/models/gemma4.cpp, gemma4-assistant.cpp, conversion/gemma.py; see
shared/notes/gemma4-gguf-facts.md). Every function takes its sizes as
parameters (:class:`Gemma4Shape`, :class:`AssistantShape`), so the same
metadata and tensor-shape helpers describe a 12B-shaped header as well as
the tiny files tests load:

- :func:`target_metadata` / :func:`target_tensor_shapes` and
  :func:`assistant_metadata` / :func:`assistant_tensor_shapes`: the keys and
  the tensor shapes (numpy row-major order), nothing allocated;
- :func:`write_target` / :func:`write_assistant`: the tiny files, random
  weights (Q8_0 matrices, F32 norms);
- :func:`gemma4_vocab`: a small vocabulary of Gemma 4's kind (tokenizer model
  ``gemma4``: SentencePiece-style BPE with ``▁`` for spaces and byte fallback,
  ``<|turn>`` / ``<turn|>`` turn markers), and :data:`GEMMA4_CHAT_TEMPLATE`, a
  short template of Gemma 4's form (a system turn of its own when the first
  message is a system message, ``model`` for the assistant's role).

Head sizes are multiples of 32: the daemon asks for a Q8_0 K cache when it
drafts, and Q8_0 rows are 32 values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf_writer import random_weights, write_gguf

# Gemma 4's turn format (its real template, models/templates/google-gemma-4-31B-it.jinja,
# also handles tools and thinking): a leading system (or developer) message becomes a turn of
# its own, the assistant's role is written "model", the reply is prompted with "<|turn>model\n".
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set loop_messages = messages -%}"
    "{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}"
    "{{ '<|turn>system\\n' + messages[0]['content'] | trim + '<turn|>\\n' }}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for m in loop_messages -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<|turn>' + role + '\\n' + m['content'] | trim + '<turn|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\\n' }}{%- endif -%}"
)


@dataclass(frozen=True)
class Gemma4Shape:
    """The sizes of a ``gemma4`` target. The defaults are the tiny test model;
    ``swa_pattern`` is one bool per layer (True: sliding-window attention).
    llama.cpp's assistant reads the target's layer n-2 for its sliding-window
    layers and n-1 for full ones, so a target ends [..., True, False]."""

    n_embd: int = 64
    n_layer: int = 4
    n_head: int = 2
    n_head_kv: int = 1
    head_dim: int = 64  # full-attention layers
    head_dim_swa: int = 32  # sliding-window layers
    n_ff: int = 128
    sliding_window: int = 16
    swa_pattern: tuple[bool, ...] = (True, False, True, False)
    context_length: int = 2048
    shared_kv_layers: int = 0
    rope_base: float = 1_000_000.0
    rope_base_swa: float = 10_000.0

    def __post_init__(self):
        if len(self.swa_pattern) != self.n_layer:
            raise ValueError(f"swa_pattern has {len(self.swa_pattern)} entries for {self.n_layer} layers")


@dataclass(frozen=True)
class AssistantShape:
    """The sizes of a ``gemma4-assistant`` drafter for a target of hidden size
    ``target_embd``. Its layers are Q-only and read the target's KV, so their
    head sizes and KV head count are the target's."""

    target_embd: int = 64
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_head_kv: int = 1
    head_dim: int = 64
    head_dim_swa: int = 32
    n_ff: int = 64
    sliding_window: int = 16
    swa_pattern: tuple[bool, ...] = field(default=(True, False))
    context_length: int = 2048

    @classmethod
    def for_target(cls, target: Gemma4Shape, **overrides) -> "AssistantShape":
        """An assistant shaped to pair with ``target`` (``overrides`` change any size)."""
        base = dict(target_embd=target.n_embd, n_head_kv=target.n_head_kv, head_dim=target.head_dim,
                    head_dim_swa=target.head_dim_swa, sliding_window=target.sliding_window,
                    context_length=target.context_length)
        base.update(overrides)
        return cls(**base)


def gemma4_vocab(extra_pieces: int = 0) -> tuple[dict, int]:
    """(tokenizer metadata, vocabulary size): Gemma 4's tokenizer kind (``gemma4``:
    BPE over ``▁``-for-space text with byte fallback) in miniature. ``<turn|>``
    is end-of-generation by its text (llama.cpp's vocab), as in the real file.
    ``extra_pieces`` adds that many unused pieces (another vocabulary, same kind)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>"]
    types = [3, 3, 3, 2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    letters = list("abcdefghijklmnopqrstuvwxyz")
    pieces = ["▁"] + letters + ["▁t", "he", "▁the", "▁a", "is", "▁is", "in", "▁in", "er", "an", "on", "\n"]
    pieces += [f"▁x{i}" for i in range(extra_pieces)]
    merges = ["▁ t", "h e", "▁t he", "▁ a", "i s", "▁ is", "i n", "▁ in", "e r", "a n", "o n"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    meta = {"tokenizer.ggml.model": "gemma4", "tokenizer.ggml.pre": "gemma4", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False}
    return meta, len(tokens)


def _attention_meta(a: str, s: Gemma4Shape | AssistantShape) -> dict:
    return {
        f"{a}.context_length": s.context_length, f"{a}.embedding_length": s.n_embd,
        f"{a}.block_count": s.n_layer, f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_head, f"{a}.attention.head_count_kv": s.n_head_kv,
        f"{a}.attention.key_length": s.head_dim, f"{a}.attention.value_length": s.head_dim,
        f"{a}.attention.key_length_swa": s.head_dim_swa, f"{a}.attention.value_length_swa": s.head_dim_swa,
        f"{a}.rope.dimension_count": s.head_dim, f"{a}.rope.dimension_count_swa": s.head_dim_swa,
        f"{a}.rope.freq_base": 1_000_000.0, f"{a}.rope.freq_base_swa": 10_000.0,
        f"{a}.attention.sliding_window": s.sliding_window,
        f"{a}.attention.sliding_window_pattern": list(s.swa_pattern),
        f"{a}.attention.layer_norm_rms_epsilon": 1e-6,
    }


def target_metadata(shape: Gemma4Shape, vocab_meta: dict, *, name: str = "tiny-gemma4",
                    file_type: int = 7, chat_template: str | None = GEMMA4_CHAT_TEMPLATE) -> dict:
    """The GGUF metadata of a ``gemma4`` target (``file_type`` 7: Q8_0)."""
    a = "gemma4"
    meta = {"general.architecture": a, "general.name": name, "general.file_type": file_type}
    meta.update(_attention_meta(a, shape))
    meta.update({f"{a}.rope.freq_base": shape.rope_base, f"{a}.rope.freq_base_swa": shape.rope_base_swa,
                 f"{a}.embedding_length_per_layer_input": 0, f"{a}.final_logit_softcapping": 30.0})
    if shape.shared_kv_layers:
        meta[f"{a}.attention.shared_kv_layers"] = shape.shared_kv_layers
    meta.update(vocab_meta)
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def _layer_shapes(s: Gemma4Shape | AssistantShape, i: int, *, kv: bool) -> dict[str, tuple[int, ...]]:
    hd = s.head_dim_swa if s.swa_pattern[i] else s.head_dim
    b, E = f"blk.{i}.", s.n_embd
    t = {b + "attn_norm.weight": (E,), b + "attn_q.weight": (s.n_head * hd, E),
         b + "attn_output.weight": (E, s.n_head * hd), b + "attn_q_norm.weight": (hd,),
         b + "post_attention_norm.weight": (E,), b + "layer_output_scale.weight": (1,),
         b + "ffn_norm.weight": (E,), b + "ffn_gate.weight": (s.n_ff, E), b + "ffn_up.weight": (s.n_ff, E),
         b + "ffn_down.weight": (E, s.n_ff), b + "post_ffw_norm.weight": (E,)}
    if kv:
        t.update({b + "attn_k.weight": (s.n_head_kv * hd, E), b + "attn_v.weight": (s.n_head_kv * hd, E),
                  b + "attn_k_norm.weight": (hd,)})
    return t


def target_tensor_shapes(shape: Gemma4Shape, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape (numpy row-major order) of a ``gemma4`` target."""
    t = {"token_embd.weight": (n_vocab, shape.n_embd), "output_norm.weight": (shape.n_embd,),
         "rope_freqs.weight": (shape.head_dim // 2,)}
    for i in range(shape.n_layer):
        t.update(_layer_shapes(shape, i, kv=True))
    return t


def assistant_metadata(shape: AssistantShape, vocab_meta: dict, *, name: str = "tiny-gemma4-assistant",
                       file_type: int = 7) -> dict:
    """The GGUF metadata of a ``gemma4-assistant`` drafter: its own width,
    ``embedding_length_out`` = the target's, ``nextn_predict_layers`` = its layers."""
    a = "gemma4-assistant"
    meta = {"general.architecture": a, "general.name": name, "general.file_type": file_type}
    meta.update(_attention_meta(a, shape))
    meta.update({f"{a}.embedding_length_out": shape.target_embd, f"{a}.nextn_predict_layers": shape.n_layer,
                 f"{a}.embedding_length_per_layer_input": 0})
    meta.update(vocab_meta)
    return meta


def assistant_tensor_shapes(shape: AssistantShape, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a ``gemma4-assistant``: Q-only layers (no K/V of
    its own), the projections in from (token embedding ++ target hidden state)
    and back out to the target's width."""
    E, TE = shape.n_embd, shape.target_embd
    t = {"token_embd.weight": (n_vocab, E), "output_norm.weight": (E,),
         "nextn.pre_projection.weight": (E, 2 * TE), "nextn.post_projection.weight": (TE, E),
         "rope_freqs.weight": (shape.head_dim // 2,)}
    for i in range(shape.n_layer):
        t.update(_layer_shapes(shape, i, kv=False))
    return t


def _random_tensors(shapes: dict[str, tuple[int, ...]], seed: int, kind: str, embd_name: str = "token_embd.weight"):
    rng = np.random.default_rng(seed)
    w, norm = random_weights(rng)
    out = {}
    for name, shp in shapes.items():
        if name.endswith("layer_output_scale.weight"):
            out[name] = (np.ones(shp, np.float32), "F32")
        elif name == "rope_freqs.weight":
            out[name] = (np.ones(shp, np.float32), "F32")
        elif len(shp) == 1:
            out[name] = (norm(shp[0]), "F32")
        elif name == embd_name:
            out[name] = (w(*shp, scale=1.0 / np.sqrt(shp[1])), kind)
        else:
            out[name] = (w(*shp), kind)
    return out


def write_target(path: Path, shape: Gemma4Shape | None = None, *, seed: int = 0, kind: str = "Q8_0",
                 vocab: tuple[dict, int] | None = None, chat_template: str | None = GEMMA4_CHAT_TEMPLATE,
                 name: str = "tiny-gemma4") -> Path:
    """A tiny random ``gemma4`` target GGUF at ``path``."""
    shape = shape or Gemma4Shape()
    vocab_meta, n_vocab = vocab or gemma4_vocab()
    meta = target_metadata(shape, vocab_meta, name=name, chat_template=chat_template,
                           file_type={"Q8_0": 7, "F32": 0, "F16": 1}[kind])
    return write_gguf(path, meta, _random_tensors(target_tensor_shapes(shape, n_vocab), seed, kind))


def write_assistant(path: Path, shape: AssistantShape | None = None, *, seed: int = 1, kind: str = "Q8_0",
                    vocab: tuple[dict, int] | None = None, name: str = "tiny-gemma4-assistant",
                    meta_overrides: dict | None = None) -> Path:
    """A tiny random ``gemma4-assistant`` drafter GGUF at ``path`` (random
    weights: it drafts, and the target accepts almost none of it).
    ``meta_overrides`` replaces metadata keys (a drafter that must not pair)."""
    shape = shape or AssistantShape()
    vocab_meta, n_vocab = vocab or gemma4_vocab()
    meta = assistant_metadata(shape, vocab_meta, name=name, file_type={"Q8_0": 7, "F32": 0, "F16": 1}[kind])
    meta.update(meta_overrides or {})
    return write_gguf(path, meta, _random_tensors(assistant_tensor_shapes(shape, n_vocab), seed, kind))
