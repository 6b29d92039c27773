"""A small reader of GGUF file headers: metadata without loading the model.

Used by ``assistant doctor`` (will the model fit? how big is its KV cache?)
and by backends that need the metadata before, or instead of, llama.cpp.
Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from .base import ModelLoadError

GGUF_MAGIC = b"GGUF"

# value type -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

# general.file_type -> name (llama.cpp's llama_ftype)
FILE_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
              11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
              17: "Q5_K_M", 18: "Q6_K", 32: "BF16"}


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise ModelLoadError(f"{self.path}: truncated GGUF header (file ends early)")
        return data

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 28:
            raise ModelLoadError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
        return self.read(n).decode("utf-8", errors="replace")

    def _skip_strings(self, count: int) -> None:
        """Step over ``count`` length-prefixed strings (a vocabulary: 262,144
        for Gemma 3) by walking a buffer rather than reading per string."""
        f, unpack_from = self.f, struct.unpack_from
        buf, pos = b"", 0
        for _ in range(count):
            if pos + 8 > len(buf):
                if pos > len(buf):  # the last string ran past the buffer
                    f.seek(pos - len(buf), 1)
                    buf, pos = b"", 0
                buf, pos = buf[pos:] + f.read(1 << 20), 0
                if len(buf) < 8:
                    raise ModelLoadError(f"{self.path}: truncated GGUF header (file ends early)")
            n = unpack_from("<Q", buf, pos)[0]
            if n > 1 << 28:
                raise ModelLoadError(f"{self.path}: corrupt GGUF header (string of {n} bytes)")
            pos += 8 + n
        f.seek(pos - len(buf), 1)  # to just after the last string (back, or forward past the buffer)
        if f.tell() > os.fstat(f.fileno()).st_size:
            raise ModelLoadError(f"{self.path}: truncated GGUF header (file ends early)")

    def value(self, vtype: int, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == 8:
            return self.string()
        if vtype == 9:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if count > 1 << 28:
                raise ModelLoadError(f"{self.path}: corrupt GGUF header (array of {count} items)")
            if etype in _SCALARS and not keep_arrays:
                self.f.seek(struct.calcsize(_SCALARS[etype]) * count, 1)
                return {"array_of": etype, "length": count}
            if etype == 8 and not keep_arrays:
                self._skip_strings(count)
                return {"array_of": etype, "length": count}
            items = [self.value(etype, keep_arrays) for _ in range(count)]
            return items if keep_arrays else {"array_of": etype, "length": count}
        raise ModelLoadError(f"{self.path}: corrupt GGUF header (unknown value type {vtype})")


def read_metadata(path: str | Path, *, keep_arrays: bool = False) -> dict[str, Any]:
    """The key/value metadata of a GGUF file.

    Arrays (the tokenizer's vocabulary, merges, ...) are summarised as
    ``{"array_of": type, "length": n}`` unless ``keep_arrays``. Raises
    ``ModelLoadError`` for a missing file, a non-GGUF file or a damaged header.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (a GGUF file starts with the bytes b'GGUF')")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": n_tensors}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = r.value(r.unpack("<I"), keep_arrays)
            return meta
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def kv_bytes_per_token(meta: dict[str, Any], bytes_per_value: int = 2) -> int | None:
    """Size of one token's keys and values (f16 cache) from the metadata, if known."""
    arch = meta.get("general.architecture")
    try:
        layers = int(meta[f"{arch}.block_count"])
        n_embd = int(meta[f"{arch}.embedding_length"])
        n_head = int(meta[f"{arch}.attention.head_count"])
        n_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
        k_len = int(meta.get(f"{arch}.attention.key_length", n_embd // n_head))
        v_len = int(meta.get(f"{arch}.attention.value_length", n_embd // n_head))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return layers * n_kv * (k_len + v_len) * bytes_per_value


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The handful of facts people ask about a model file."""
    arch = meta.get("general.architecture")
    ftype = meta.get("general.file_type")
    return {
        "architecture": arch,
        "name": meta.get("general.name"),
        "context_length": meta.get(f"{arch}.context_length"),
        "quantization": FILE_TYPES.get(ftype, str(ftype) if ftype is not None else None),
        "has_chat_template": "tokenizer.chat_template" in meta,
        "kv_bytes_per_token": kv_bytes_per_token(meta),
    }


# ggml_type -> name (ggml.h), for the per-tensor types in the tensor infos
GGML_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
              11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
              18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
              25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
              39: "MXFP4"}


def read_tensor_infos(path: str | Path) -> list[dict[str, Any]]:
    """Name, shape (GGUF order: innermost dimension first) and type name of every tensor.

    Reads the header only (no tensor data). Raises ``ModelLoadError`` like
    :func:`read_metadata`.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            magic = f.read(4)
            if magic != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (a GGUF file starts with the bytes b'GGUF')")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            for _ in range(n_kv):
                r.string()
                r.value(r.unpack("<I"), False)
            infos = []
            for _ in range(n_tensors):
                name = r.string()
                n_dims = r.unpack("<I")
                if n_dims > 8:
                    raise ModelLoadError(f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dimensions)")
                shape = [r.unpack("<Q") for _ in range(n_dims)]
                ttype = r.unpack("<I")
                r.unpack("<Q")  # offset into the data section
                infos.append({"name": name, "shape": shape, "type": GGML_TYPES.get(ttype, f"type {ttype}")})
            return infos
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------
# The whole header (metadata and tensor infos) in one pass, with tensor sizes:
# what the memory plan (backends.memory_plan) sizes a load from.

# ggml type name -> (values per block, bytes per block), from ggml's type traits (ggml.c)
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22),
               "Q5_1": (32, 24), "Q8_0": (32, 34), "Q8_1": (32, 36), "Q2_K": (256, 84), "Q3_K": (256, 110),
               "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q8_K": (256, 292),
               "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ3_XXS": (256, 98), "IQ1_S": (256, 50),
               "IQ4_NL": (32, 18), "IQ3_S": (256, 110), "IQ2_S": (256, 82), "IQ4_XS": (256, 136), "I8": (1, 1),
               "I16": (1, 2), "I32": (1, 4), "I64": (1, 8), "F64": (1, 8), "IQ1_M": (256, 56), "BF16": (1, 2),
               "TQ1_0": (256, 54), "TQ2_0": (256, 66), "MXFP4": (32, 17)}

SMALL_ARRAY = 4096  # arrays up to this many items are kept by read_header (per-layer patterns and counts)


def tensor_nbytes(shape: list[int], type_name: str) -> int | None:
    """Bytes of a tensor's data (ggml row layout: whole blocks), None for a type not known here."""
    block = GGML_BLOCKS.get(type_name)
    if block is None:
        return None
    n = 1
    for d in shape:
        n *= int(d)
    per, size = block
    return -(-n // per) * size


class GGUFHeader:
    """A GGUF file's metadata and tensor infos (no weights), from :func:`read_header`.

    ``meta`` keeps arrays of up to :data:`SMALL_ARRAY` items (per-layer
    sliding-window patterns, KV head counts) and summarises longer ones like
    :func:`read_metadata`; ``tensors`` are dicts with name, shape (innermost
    first), type and ``nbytes`` (None for a type not known here)."""

    def __init__(self, path: Path, meta: dict[str, Any], tensors: list[dict[str, Any]], file_size: int):
        self.path, self.meta, self.tensors, self.file_size = path, meta, tensors, file_size

    @property
    def arch(self) -> str | None:
        return self.meta.get("general.architecture")

    def arch_key(self, name: str, default: Any = None) -> Any:
        """``{architecture}.{name}`` from the metadata."""
        return self.meta.get(f"{self.arch}.{name}", default)

    @property
    def tensor_bytes(self) -> int:
        """The data of every tensor whose type is known (see :attr:`unknown_types`)."""
        return sum(t["nbytes"] or 0 for t in self.tensors)

    @property
    def unknown_types(self) -> list[str]:
        return sorted({t["type"] for t in self.tensors if t["nbytes"] is None})

    def bytes_by_type(self) -> dict[str, int]:
        """Tensor data per ggml type, largest first."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t["type"]] = out.get(t["type"], 0) + (t["nbytes"] or 0)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def tensor(self, name: str) -> dict[str, Any] | None:
        return next((t for t in self.tensors if t["name"] == name), None)

    @property
    def vocab_size(self) -> int | None:
        """Tokens in the vocabulary (the token list, else the embedding's rows)."""
        tokens = self.meta.get("tokenizer.ggml.tokens")
        if isinstance(tokens, dict):
            return int(tokens["length"])
        if isinstance(tokens, list):
            return len(tokens)
        embd = self.tensor("token_embd.weight")
        return int(embd["shape"][-1]) if embd and len(embd["shape"]) == 2 else None


def read_header(path: str | Path, *, small_arrays: int = SMALL_ARRAY) -> GGUFHeader:
    """Metadata and tensor infos of a GGUF file in one pass (reads no tensor data).

    Raises ``ModelLoadError`` for a missing file, a non-GGUF file or a damaged
    header, like :func:`read_metadata`."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        with open(path, "rb") as f:
            r = _Reader(f, path)
            if f.read(4) != GGUF_MAGIC:
                raise ModelLoadError(f"{path} is not a GGUF file (a GGUF file starts with the bytes b'GGUF')")
            version = r.unpack("<I")
            if version not in (2, 3):
                raise ModelLoadError(f"{path}: unsupported GGUF version {version}")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            if n_tensors > 1 << 24:
                raise ModelLoadError(f"{path}: corrupt GGUF header ({n_tensors} tensors)")
            meta: dict[str, Any] = {"gguf.version": version, "gguf.tensor_count": n_tensors}
            for _ in range(n_kv):
                key = r.string()
                meta[key] = _small_value(r, r.unpack("<I"), small_arrays)
            tensors = [_tensor_info(r, path) for _ in range(n_tensors)]
            return GGUFHeader(path, meta, tensors, os.fstat(f.fileno()).st_size)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _small_value(r: _Reader, vtype: int, limit: int) -> Any:
    """A metadata value; arrays of scalars or strings with up to ``limit`` items kept."""
    if vtype != 9:
        return r.value(vtype, False)
    pos = r.f.tell()
    etype, count = r.unpack("<I"), r.unpack("<Q")
    if count <= limit and (etype in _SCALARS or etype == 8):
        return [r.value(etype, True) for _ in range(count)]
    r.f.seek(pos)
    return r.value(vtype, False)


def _tensor_info(r: _Reader, path: Path) -> dict[str, Any]:
    name = r.string()
    n_dims = r.unpack("<I")
    if n_dims > 8:
        raise ModelLoadError(f"{path}: corrupt GGUF header (tensor {name!r} has {n_dims} dimensions)")
    shape = [r.unpack("<Q") for _ in range(n_dims)]
    ttype = r.unpack("<I")
    r.unpack("<Q")  # offset into the data section
    type_name = GGML_TYPES.get(ttype, f"type {ttype}")
    return {"name": name, "shape": shape, "type": type_name, "nbytes": tensor_nbytes(shape, type_name)}
