"""Tiny GGUF files for tests: a GGUF v3 writer (spec: ggml/docs/gguf.md) and
two small tokenizer vocabularies, enough for random-weight test models that
llama.cpp (and MLX) load. Used by test_mlx_backend.py (tiny llama / gemma3)
and test_speculative.py (a tiny glm4moe with a NextN layer for ``mtp``)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# --------------------------------------------------------------------------
# A small GGUF writer (spec: ggml/docs/gguf.md), enough for test models.

_GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q5_0": 6}
_FTYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8}


def _kv_value(value) -> bytes:
    if isinstance(value, bool):
        return struct.pack("<I?", 7, value)
    if isinstance(value, int):
        return struct.pack("<Ii", 5, value) if value < 0 else struct.pack("<II", 4, value)
    if isinstance(value, float):
        return struct.pack("<If", 6, value)
    if isinstance(value, str):
        b = value.encode()
        return struct.pack("<IQ", 8, len(b)) + b
    if isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            out = struct.pack("<IIQ", 9, 8, len(value))
            for v in value:
                b = v.encode()
                out += struct.pack("<Q", len(b)) + b
            return out
        if all(isinstance(v, float) for v in value):
            return struct.pack("<IIQ", 9, 6, len(value)) + np.asarray(value, "<f4").tobytes()
        return struct.pack("<IIQ", 9, 5, len(value)) + np.asarray(value, "<i4").tobytes()
    raise TypeError(value)


def _quantize(x: np.ndarray, kind: str) -> bytes:
    """Rows of x into llama.cpp's block formats (the reference quantizers)."""
    if kind == "F32":
        return x.astype("<f4").tobytes()
    if kind == "F16":
        return x.astype("<f2").tobytes()
    blocks = x.astype(np.float32).reshape(-1, 32)
    if kind == "Q8_0":
        d = np.abs(blocks).max(axis=1) / 127
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
        q = np.round(blocks * inv[:, None]).astype(np.int8)
        out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("q", "i1", 32)])
        out["d"], out["q"] = d, q
        return out.tobytes()
    if kind == "Q4_0":
        idx = np.abs(blocks).argmax(axis=1)
        mx = blocks[np.arange(len(blocks)), idx]
        d = mx / -8
        inv = np.where(d != 0, 1 / np.where(d != 0, d, 1), 0)
        q = np.clip(np.trunc(blocks * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
        out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("q", "u1", 16)])
        out["d"], out["q"] = d, q[:, :16] | (q[:, 16:] << 4)
        return out.tobytes()
    if kind == "Q4_1":
        lo, hi = blocks.min(axis=1), blocks.max(axis=1)
        d = (hi - lo) / 15
        inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
        q = np.clip(np.trunc((blocks - lo[:, None]) * inv[:, None] + 0.5), 0, 15).astype(np.uint8)
        out = np.zeros(len(blocks), dtype=[("d", "<f2"), ("m", "<f2"), ("q", "u1", 16)])
        out["d"], out["m"], out["q"] = d, lo, q[:, :16] | (q[:, 16:] << 4)
        return out.tobytes()
    if kind == "Q5_0":  # only to be refused: the bytes need not be meaningful
        return np.zeros(len(blocks) * 22, np.uint8).tobytes()
    raise ValueError(kind)


def write_gguf(path: Path, meta: dict, tensors: dict[str, tuple[np.ndarray, str]]) -> Path:
    """A GGUF v3 file; tensors: name -> (array in numpy row-major order, type name)."""
    align = 32
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        kb = k.encode()
        head += struct.pack("<Q", len(kb)) + kb + _kv_value(v)
    infos, blobs, offset = b"", [], 0
    for name, (arr, kind) in tensors.items():
        data = _quantize(arr, kind)
        nb = name.encode()
        dims = list(reversed(arr.shape))
        infos += struct.pack("<Q", len(nb)) + nb + struct.pack("<I", len(dims))
        infos += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", _GGML[kind], offset)
        pad = (-len(data)) % align
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    header = head + infos
    header += b"\0" * ((-len(header)) % align)
    path.write_bytes(header + b"".join(blobs))
    return path


def _byte_level_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def gpt2_vocab():
    """A byte-level BPE vocabulary: 3 control tokens, the 256 bytes, a few merges."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_level_alphabet()
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a"]
    tokens += ["Ġt", "he", "Ġthe", "is", "Ġa"]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHATML}, len(tokens)


def spm_vocab():
    """A SentencePiece vocabulary like Gemma's: controls, <unk>, byte fallback, scored pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 2] + [6] * 256
    pieces = ["▁", "e", "t", "a", "o", "h", "s", "▁t", "he", "▁the", "▁a", "is", "▁is", "n", "i", "r"]
    tokens += pieces + ["<start_of_turn>", "<end_of_turn>"]
    types += [1] * len(pieces) + [3, 3]
    scores = [0.0] * 260 + [-float(i) for i in range(len(pieces))] + [0.0, 0.0]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False}, len(tokens)


def random_weights(rng: np.random.Generator):
    """(w, norm): random matrices scaled like trained ones (1/sqrt(fan-in)
    unless ``scale`` says otherwise) and norm weights near 1."""

    def w(*shape, scale=None):
        return (rng.standard_normal(shape) * (scale or shape[-1] ** -0.5)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    return w, norm


def tiny_mtp_gguf(path: Path, *, nextn: bool = True, kind: str = "Q8_0", seed: int = 0) -> Path:
    """A random tiny GLM-4.5-style model (llama.cpp arch ``glm4moe``): one dense
    decoder layer and, with ``nextn``, one multi-token-prediction (NextN) layer
    after it (a MoE block plus ``nextn.eh_proj/enorm/hnorm/shared_head_norm``;
    the LM head falls back to ``output.weight``). llama.cpp loads it with
    ``load_mtp`` and runs its NextN block in an MTP context. Head size 32
    (so a Q8_0 K cache fits it), the byte-level BPE vocabulary. Weight
    matrices in ``kind`` (norms and biases F32): llama.cpp computes Q8_0
    weights the same in small batches as in one-token steps, so the engine
    may verify drafts in batches (F32 ones differ by ~5e-7: exact batch 1)."""
    rng = np.random.default_rng(seed)
    E, FF, FFE, NE = 64, 128, 32, 4
    n_head, n_kv, hd = 2, 1, 32
    vocab_meta, V = gpt2_vocab()

    w, norm = random_weights(rng)

    n_all = 2 if nextn else 1
    t = {"token_embd.weight": (w(V, E, scale=1.0), kind), "output_norm.weight": (norm(E), "F32"),
         "output.weight": (w(V, E), kind)}
    for i in range(n_all):
        b = f"blk.{i}."
        t.update({
            b + "attn_norm.weight": (norm(E), "F32"),
            b + "attn_q.weight": (w(n_head * hd, E), kind),
            b + "attn_k.weight": (w(n_kv * hd, E), kind),
            b + "attn_v.weight": (w(n_kv * hd, E), kind),
            b + "attn_q.bias": (w(n_head * hd, scale=0.1), "F32"),
            b + "attn_k.bias": (w(n_kv * hd, scale=0.1), "F32"),
            b + "attn_v.bias": (w(n_kv * hd, scale=0.1), "F32"),
            b + "attn_output.weight": (w(E, n_head * hd), kind),
            b + "post_attention_norm.weight": (norm(E), "F32"),
        })
        if i == 0:  # leading_dense_block_count = 1: the decoder layer is dense
            t.update({b + "ffn_gate.weight": (w(FF, E), kind), b + "ffn_up.weight": (w(FF, E), kind),
                      b + "ffn_down.weight": (w(E, FF), kind)})
        else:  # the NextN layer: MoE (4 experts, 2 used, 1 shared) + its own projections
            t.update({
                b + "ffn_gate_inp.weight": (w(NE, E), "F32"),
                b + "exp_probs_b.bias": (np.zeros(NE, np.float32), "F32"),
                b + "ffn_gate_exps.weight": (w(NE, FFE, E), kind),
                b + "ffn_up_exps.weight": (w(NE, FFE, E), kind),
                b + "ffn_down_exps.weight": (w(NE, E, FFE), kind),
                b + "ffn_gate_shexp.weight": (w(FFE, E), kind),
                b + "ffn_up_shexp.weight": (w(FFE, E), kind),
                b + "ffn_down_shexp.weight": (w(E, FFE), kind),
                b + "nextn.eh_proj.weight": (w(E, 2 * E), kind),
                b + "nextn.enorm.weight": (norm(E), "F32"),
                b + "nextn.hnorm.weight": (norm(E), "F32"),
                b + "nextn.shared_head_norm.weight": (norm(E), "F32"),
            })
    a = "glm4moe"
    meta = {"general.architecture": a, "general.name": "tiny-glm4moe-mtp" if nextn else "tiny-glm4moe",
            "general.file_type": _FTYPE[kind],
            f"{a}.context_length": 512, f"{a}.embedding_length": E, f"{a}.block_count": n_all,
            f"{a}.feed_forward_length": FF, f"{a}.attention.head_count": n_head,
            f"{a}.attention.head_count_kv": n_kv, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{a}.rope.freq_base": 10000.0, f"{a}.attention.key_length": hd,
            f"{a}.attention.value_length": hd, f"{a}.rope.dimension_count": hd // 2,
            f"{a}.expert_count": NE, f"{a}.expert_used_count": 2, f"{a}.expert_shared_count": 1,
            f"{a}.expert_feed_forward_length": FFE, f"{a}.leading_dense_block_count": 1,
            f"{a}.expert_weights_scale": 1.0, f"{a}.expert_weights_norm": True, f"{a}.expert_gating_func": 2,
            f"{a}.nextn_predict_layers": 1 if nextn else 0}
    meta.update(vocab_meta)
    return write_gguf(path, meta, t)
