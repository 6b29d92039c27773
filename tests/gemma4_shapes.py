"""The real Gemma 4 12B shapes as sparse GGUF files: a header written in
full, then the file truncated to its full size (nothing allocated on disk,
no weights). For the memory plan's tests (tests/test_memory_plan.py).

Sources of the shapes (checked against each other):

- google/gemma-4-12B config.json (model_type gemma4_unified; quoted from the
  hub's resolve-cache in a public run log) and mlx-vlm 0.7.10's defaults in
  ``mlx_vlm/models/gemma4_unified/config.py``: hidden 3840, 48 layers, FFN
  15360, 16 heads, head_dim 256 (sliding) / global_head_dim 512 (full),
  8 KV heads (sliding) / num_global_key_value_heads 1 (full),
  attention_k_eq_v (full layers have no v_proj: V is K), no shared-KV layers,
  sliding window 1024 with 5 sliding layers then 1 full, vocabulary 262144,
  tied embeddings, 262144 positions.
- llama.cpp's conversion (vendored in llama-cpp-python 0.3.36,
  conversion/gemma.py ``Gemma4Model``): architecture ``gemma4``,
  ``key_length`` = the full layers' head dim, ``key_length_swa`` the sliding
  one, ``head_count_kv`` per layer, ``sliding_window_pattern`` a bool per layer.
- The drafter (google/gemma-4-12B-it-assistant as GGUF, the metadata listed on
  sjakek/gemma4-12b-mtp-assistant): hidden 1024, out 3840, 4 layers, FFN 8192,
  16 heads, KV heads [8, 8, 8, 1], shared_kv_layers 4, pattern
  [T, T, T, F]. Its Q8_0 file is 465,109,248 bytes and BF16 861,520,128.
- The Q4_K_M mix is llama.cpp's (src/llama-quant.cpp): Q4_K, the tied token
  embedding Q6_K, ``attn_v`` and ``ffn_down`` Q6_K in the "more bits" layers.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf_writer import spm_vocab

# ggml type ids and (values per block, bytes per block), ggml.h / ggml.c
TYPES = {"F32": (0, 1, 4), "F16": (1, 1, 2), "Q4_0": (2, 32, 18), "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144),
         "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210), "BF16": (30, 1, 2)}
FILE_TYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15, "BF16": 32, "F16": 1}


@dataclass(frozen=True)
class Gemma4Shape:
    """What sizes a Gemma 4 text model's tensors and KV cache."""

    hidden: int = 3840
    layers: int = 48
    ffn: int = 15360
    heads: int = 16
    kv_heads_swa: int = 8
    kv_heads_full: int = 1
    head_dim_swa: int = 256
    head_dim_full: int = 512
    window: int = 1024
    period: int = 6  # every 6th layer is full attention, the others slide
    vocab: int = 262144
    context: int = 262144
    k_eq_v: bool = True  # full layers have no attn_v (llama.cpp uses K as V)
    shared_kv_layers: int = 0

    def is_swa(self, i: int) -> bool:
        return i % self.period != self.period - 1


GEMMA4_12B = Gemma4Shape()
# The 12B's MTP drafter: its layers are Q-only (they read the target's KV cache).
GEMMA4_12B_ASSISTANT = Gemma4Shape(hidden=1024, layers=4, ffn=8192, period=4, context=131072, shared_kv_layers=4)


def _value(v) -> bytes:
    """A GGUF metadata value (with its type), bool arrays included."""
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        if v < 0:
            return struct.pack("<Ii", 5, v)
        return struct.pack("<II", 4, v) if v < 1 << 32 else struct.pack("<IQ", 10, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        b = v.encode()
        return struct.pack("<IQ", 8, len(b)) + b
    if all(isinstance(x, bool) for x in v):
        return struct.pack("<IIQ", 9, 7, len(v)) + bytes(int(x) for x in v)
    if all(isinstance(x, str) for x in v):
        return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(struct.pack("<Q", len(s.encode())) + s.encode() for s in v)
    if all(isinstance(x, float) for x in v):
        return struct.pack("<IIQ", 9, 6, len(v)) + struct.pack(f"<{len(v)}f", *v)
    return struct.pack("<IIQ", 9, 5, len(v)) + struct.pack(f"<{len(v)}i", *v)


def tensor_bytes(dims: list[int], kind: str) -> int:
    _, per, size = TYPES[kind]
    n = 1
    for d in dims:
        n *= d
    return n // per * size


def write_sparse_gguf(path: Path, meta: dict, tensors: list[tuple[str, list[int], str]]) -> Path:
    """A GGUF v3 file whose header is complete and whose data section is a hole:
    the file has its full size but no blocks. ``tensors``: (name, dims in GGUF
    order, innermost first, type name)."""
    align = 32
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for k, v in meta.items():
        out += [struct.pack("<Q", len(k.encode())), k.encode(), _value(v)]
    offset = 0
    for name, dims, kind in tensors:
        out += [struct.pack("<Q", len(name.encode())), name.encode(), struct.pack("<I", len(dims)),
                struct.pack(f"<{len(dims)}Q", *dims), struct.pack("<IQ", TYPES[kind][0], offset)]
        offset += -(-tensor_bytes(dims, kind) // align) * align
    header = b"".join(out)
    header += b"\0" * ((-len(header)) % align)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + offset)
    return path


def _more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the layers Q4_K_M gives Q6_K."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def target_tensors(s: Gemma4Shape = GEMMA4_12B, quant: str = "Q4_K_M") -> list[tuple[str, list[int], str]]:
    """Every tensor of a Gemma 4 target (llama.cpp names), typed as ``quant`` would
    type it: Q4_K_M (llama.cpp's mix), Q4_0 (Google's QAT file: Q6_K embedding), Q8_0."""
    body = {"Q4_K_M": "Q4_K", "Q4_0": "Q4_0", "Q8_0": "Q8_0"}[quant]
    embd = "Q8_0" if quant == "Q8_0" else "Q6_K"
    out = [("token_embd.weight", [s.hidden, s.vocab], embd), ("output_norm.weight", [s.hidden], "F32"),
           ("rope_freqs.weight", [s.head_dim_full // 2], "F32")]
    n_v = sum(1 for i in range(s.layers) if s.is_swa(i) or not s.k_eq_v)
    i_v = 0
    for i in range(s.layers):
        b, swa = f"blk.{i}.", s.is_swa(i)
        hd, kv = (s.head_dim_swa, s.kv_heads_swa) if swa else (s.head_dim_full, s.kv_heads_full)
        out += [(b + "attn_norm.weight", [s.hidden], "F32"), (b + "attn_q.weight", [s.hidden, s.heads * hd], body),
                (b + "attn_k.weight", [s.hidden, kv * hd], body)]
        if swa or not s.k_eq_v:
            v_type = "Q6_K" if quant == "Q4_K_M" and _more_bits(i_v, n_v) else body
            out.append((b + "attn_v.weight", [s.hidden, kv * hd], v_type))
            i_v += 1
        down = "Q6_K" if quant == "Q4_K_M" and _more_bits(i, s.layers) else body
        out += [(b + "attn_output.weight", [s.heads * hd, s.hidden], body),
                (b + "attn_q_norm.weight", [hd], "F32"), (b + "attn_k_norm.weight", [hd], "F32"),
                (b + "post_attention_norm.weight", [s.hidden], "F32"), (b + "ffn_norm.weight", [s.hidden], "F32"),
                (b + "ffn_gate.weight", [s.hidden, s.ffn], body), (b + "ffn_up.weight", [s.hidden, s.ffn], body),
                (b + "ffn_down.weight", [s.ffn, s.hidden], down), (b + "post_ffw_norm.weight", [s.hidden], "F32")]
    return out


def assistant_tensors(s: Gemma4Shape = GEMMA4_12B_ASSISTANT, *, target_hidden: int = 3840,
                      kind: str = "Q8_0") -> list[tuple[str, list[int], str]]:
    """The MTP drafter's tensors: its own embedding, the two projections that join
    it to the target's hidden state, and Q-only layers."""
    out = [("token_embd.weight", [s.hidden, s.vocab], kind), ("output_norm.weight", [s.hidden], "F32"),
           ("nextn.pre_projection.weight", [2 * target_hidden, s.hidden], kind),
           ("nextn.post_projection.weight", [s.hidden, target_hidden], kind),
           ("rope_freqs.weight", [s.head_dim_full // 2], "F32")]
    for i in range(s.layers):
        b = f"blk.{i}."
        hd = s.head_dim_swa if s.is_swa(i) else s.head_dim_full
        out += [(b + "attn_norm.weight", [s.hidden], "F32"), (b + "attn_q.weight", [s.hidden, s.heads * hd], kind),
                (b + "attn_output.weight", [s.heads * hd, s.hidden], kind), (b + "attn_q_norm.weight", [hd], "F32"),
                (b + "post_attention_norm.weight", [s.hidden], "F32"), (b + "ffn_norm.weight", [s.hidden], "F32"),
                (b + "ffn_gate.weight", [s.hidden, s.ffn], kind), (b + "ffn_up.weight", [s.hidden, s.ffn], kind),
                (b + "ffn_down.weight", [s.ffn, s.hidden], kind), (b + "post_ffw_norm.weight", [s.hidden], "F32"),
                (b + "layer_output_scale.weight", [1], "F32")]
    return out


def _meta(arch: str, s: Gemma4Shape, quant: str, vocab: bool) -> dict:
    a = arch
    meta = {"general.architecture": a, "general.name": f"{a}-12b-shapes", "general.file_type": FILE_TYPES[quant],
            f"{a}.context_length": s.context, f"{a}.embedding_length": s.hidden, f"{a}.block_count": s.layers,
            f"{a}.feed_forward_length": s.ffn, f"{a}.attention.head_count": s.heads,
            f"{a}.attention.head_count_kv": [s.kv_heads_swa if s.is_swa(i) else s.kv_heads_full
                                             for i in range(s.layers)],
            f"{a}.attention.key_length": s.head_dim_full, f"{a}.attention.value_length": s.head_dim_full,
            f"{a}.attention.key_length_swa": s.head_dim_swa, f"{a}.attention.value_length_swa": s.head_dim_swa,
            f"{a}.rope.dimension_count": s.head_dim_full, f"{a}.rope.dimension_count_swa": s.head_dim_swa,
            f"{a}.rope.freq_base": 1e6, f"{a}.rope.freq_base_swa": 1e4,
            f"{a}.attention.sliding_window": s.window,
            f"{a}.attention.sliding_window_pattern": [s.is_swa(i) for i in range(s.layers)],
            f"{a}.attention.layer_norm_rms_epsilon": 1e-6, f"{a}.embedding_length_per_layer_input": 0,
            f"{a}.final_logit_softcapping": 30.0, f"{a}.attention.shared_kv_layers": s.shared_kv_layers}
    if vocab:  # the full vocabulary: llama.cpp sizes token_embd from it
        base, n = spm_vocab()
        meta.update({k: v for k, v in base.items() if not isinstance(v, list)})
        fill = s.vocab - n
        meta["tokenizer.ggml.tokens"] = base["tokenizer.ggml.tokens"] + [f"<unused{i}>" for i in range(fill)]
        meta["tokenizer.ggml.token_type"] = base["tokenizer.ggml.token_type"] + [1] * fill
        meta["tokenizer.ggml.scores"] = base["tokenizer.ggml.scores"] + [0.0] * fill
    return meta


def write_gemma4_12b(path: Path, quant: str = "Q4_K_M", *, vocab: bool = True) -> Path:
    """The 12B target: a ~7 GB file of which only the header (~5 MB with the
    vocabulary) takes disk blocks."""
    return write_sparse_gguf(path, _meta("gemma4", GEMMA4_12B, quant, vocab), target_tensors(GEMMA4_12B, quant))


def write_gemma4_12b_assistant(path: Path, kind: str = "Q8_0", *, vocab: bool = False,
                               shape: Gemma4Shape = GEMMA4_12B_ASSISTANT) -> Path:
    """The 12B's MTP drafter (architecture gemma4-assistant); ``shape`` another
    drafter's sizes (one that does not pair)."""
    a, s = "gemma4-assistant", shape
    meta = _meta(a, s, kind, vocab)
    meta.update({f"{a}.embedding_length_out": GEMMA4_12B.hidden, f"{a}.nextn_predict_layers": s.layers})
    return write_sparse_gguf(path, meta, assistant_tensors(s, target_hidden=GEMMA4_12B.hidden, kind=kind))


def write_gemma4_12b_mmproj(path: Path) -> Path:
    """An encoder-free projector of the 12B's sizes (``clip``, gemma4uv + gemma4ua):
    48x48x3 patches into 3840, 2 x 1120 x 3840 positions, the projection into the
    model and the audio frames' (640 samples). The types are inferred: with the
    patch and position tables in F32 and the projections in F16 the tensors come
    to 174,981,120 bytes, 134 KB under the published 175,115,264-byte
    mmproj-gemma-4-12b-it-qat-q4_0.gguf (its header, biases and norms)."""
    meta = {"general.architecture": "clip", "clip.has_vision_encoder": True, "clip.has_audio_encoder": True,
            "clip.vision.projector_type": "gemma4uv", "clip.audio.projector_type": "gemma4ua",
            "clip.vision.projection_dim": 3840, "clip.vision.embedding_length": 3840, "clip.vision.block_count": 0}
    tensors = [("v.patch_embd.weight", [48 * 48 * 3, 3840], "F32"), ("v.patch_embd.bias", [3840], "F32"),
               ("v.position_embd.weight", [3840, 1120, 2], "F32"), ("mm.input_projection.weight", [3840, 3840], "F16"),
               ("mm.a.input_projection.weight", [640, 3840], "F16")]
    return write_sparse_gguf(path, meta, tensors)


def allocated_bytes(path: Path) -> int:
    """Disk blocks the file really takes (st_blocks counts 512-byte units)."""
    return os.stat(path).st_blocks * 512
