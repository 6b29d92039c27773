"""The GGUF header reader (backends/gguf.py) on files written here."""

from __future__ import annotations

import pytest
from gguf_writer import write_gguf  # noqa: E402  (tests/ is on sys.path under pytest)

from backends.base import ModelLoadError
from backends.gguf import read_metadata

# Strings of many lengths, one longer than the reader's 1 MiB buffer: the
# skipping of string arrays must land on the next key whatever the layout.
WORDS = [f"w{i}" * (i % 7) for i in range(20_000)] + ["x" * (3 << 20)] + ["tail", ""]


def _file(tmp_path):
    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": WORDS, "llama.after_the_vocabulary": 7,
            "tokenizer.ggml.scores": [0.5] * 10, "general.name": "last"}
    return write_gguf(tmp_path / "m.gguf", meta, {})


def test_string_arrays_are_summarised_and_the_keys_after_them_read_right(tmp_path):
    path = _file(tmp_path)
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.tokens"] == {"array_of": 8, "length": len(WORDS)}
    assert meta["llama.after_the_vocabulary"] == 7 and meta["general.name"] == "last"
    assert read_metadata(path, keep_arrays=True)["tokenizer.ggml.tokens"] == WORDS


@pytest.mark.parametrize("cut", [40, 1000, 150_000, 1_200_000, 3_300_000, "in the last string"])
def test_a_file_cut_anywhere_in_its_header_is_called_truncated(tmp_path, cut):
    path = _file(tmp_path)
    data = path.read_bytes()
    if cut == "in the last string":  # "tail", then "" (8 length bytes), then the next key's length
        cut = data.index(b"llama.after_the_vocabulary") - 8 - 8 - 2
    path.write_bytes(data[:cut])
    with pytest.raises(ModelLoadError, match="truncated GGUF header"):
        read_metadata(path)
