"""Images and audio read natively on llama.cpp through libmtmd: the tiny random
Gemma 4 target (tests/gemma4_files.py) with its tiny random gemma4uv + gemma4ua
projector (tests/gemma4_media_files.py), real PNG/GIF/WAV files the tests write.

Counts are checked against libmtmd's own (``mtmd_tokenize`` of the whole prompt,
``mtmd_helper_get_n_pos``), never hard-coded. Random weights: the plumbing is
real (positions, KV cache, prefix reuse, drafting after media), what the model
makes of the picture is noise."""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import struct
from pathlib import Path

import pytest

from gemma4_files import AssistantShape, Gemma4Shape, write_assistant
from gemma4_media_files import ProjectorShape, png_bytes, wav_bytes, write_media_pair, write_projector

from assistant.inference.generation import generate
from assistant.inference.sampling import SamplingParams
from backends.base import BackendError, ContextOverflowError, LoadOptions, MediaError, ModelLoadError
from backends.media import MediaInput, MediaPrompt

pytest.importorskip("llama_cpp")
pytest.importorskip("PIL")

from backends.llamacpp import LlamaCppBackend  # noqa: E402
from backends import mmproj_pairing  # noqa: E402

GREEDY = SamplingParams(temperature=0)
KV = {"kv_type": "q8_0/f16"}  # bit-exact verify batches: greedy identity with drafting on


def medium(kind: str, path: Path, mime: str = "") -> MediaInput:
    return MediaInput(kind, str(path), hashlib.sha256(path.read_bytes()).hexdigest(), mime)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    model, projector = write_media_pair(d / "pair")
    out = {"model": model, "projector": projector, "dir": d}
    for name, data in (("a.png", png_bytes(48, 48, seed=1)), ("b.png", png_bytes(64, 40, seed=2)),
                       ("a.wav", wav_bytes(1.0)), ("b.wav", wav_bytes(0.5, rate=22050, freq=300, channels=2))):
        (d / name).write_bytes(data)
        out[name] = d / name
    return out


@pytest.fixture(scope="module")
def backend(files):
    b = LlamaCppBackend()
    b.load(str(files["model"]), LoadOptions(n_ctx=1024, n_threads=2, extra=KV))
    yield b
    b.unload()


def chat(b: LlamaCppBackend, *turns: str) -> str:
    """A conversation of user/assistant turns (alternating, user first), rendered."""
    roles = ["user", "assistant"]
    return b.apply_chat_template([{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)])


def mtmd_counts(b: LlamaCppBackend, text: str, paths: list[Path]) -> tuple[int, list[int]]:
    """libmtmd's own figures for ``text`` with these files: the positions of the whole
    prompt (mtmd_helper_get_n_pos) and each media chunk's n_pos."""
    ctx = b._media
    M = ctx.M
    bitmaps = []
    for p in paths:
        data = p.read_bytes()
        buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        bitmaps.append(M.mtmd_helper_bitmap_init_from_buf(ctx.ctx, buf, len(data), False))
    chunks = M.mtmd_input_chunks_init()
    try:
        raw = text.encode()
        t = M.mtmd_input_text()
        t.text, t.text_len, t.add_special, t.parse_special = raw, len(raw), False, True
        arr = (M.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        assert M.mtmd_tokenize(ctx.ctx, chunks, ctypes.byref(t), arr, len(bitmaps)) == 0
        per = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            ch = M.mtmd_input_chunks_get(chunks, i)
            if M.mtmd_input_chunk_get_type(ch) != 0:
                per.append(int(M.mtmd_input_chunk_get_n_pos(ch)))
        return int(M.mtmd_helper_get_n_pos(chunks)), per
    finally:
        M.mtmd_input_chunks_free(chunks)
        for bm in bitmaps:
            M.mtmd_bitmap_free(bm)


def count_encodes(b: LlamaCppBackend, monkeypatch) -> list[str]:
    """Every medium the backend evaluates from now on (its kind), in order."""
    seen: list[str] = []
    real = b._media.evaluate

    def counting(tok, *args, **kwargs):
        seen.append(tok.kind)
        return real(tok, *args, **kwargs)

    monkeypatch.setattr(b._media, "evaluate", counting)
    return seen


def test_the_projector_beside_the_model_is_found_and_says_what_it_reads(backend, files):
    info = backend.info
    assert info.modalities == ["text", "image", "audio"]
    assert backend.media_support() == frozenset({"image", "audio"})
    assert files["projector"].name in info.choices["media"] and "found beside the model" in info.choices["media"]
    M = backend._media.M
    assert backend.media_marker() == M.mtmd_default_marker().decode() == "<__media__>"


def test_image_and_audio_take_the_positions_mtmd_counts_and_the_reply_completes(backend, files):
    mk = backend.media_marker()
    text = chat(backend, f"look {mk} then hear {mk} and say")
    paths = [files["a.png"], files["b.wav"]]
    total, per_medium = mtmd_counts(backend, text, paths)
    prompt = backend.tokenize_media(text, [medium("image", paths[0]), medium("audio", paths[1])])
    assert [s.length for s in prompt.spans] == per_medium and all(n > 0 for n in per_medium)
    assert [s.n_tokens for s in prompt.spans] == per_medium  # no M-RoPE: one position per embedding
    assert len(prompt.tokens) == total
    text_only = backend.tokenize(text.replace(mk, ""))
    backend.truncate(0)
    r = generate(backend, prompt, GREEDY, max_tokens=12)
    assert r.stats.prompt_tokens == total > len(text_only) + sum(per_medium)  # + mtmd's begin/end markers
    assert r.stats.media_tokens == sum(per_medium) and r.stats.media_encode_ms > 0
    assert r.stats.as_dict()["media_tokens"] == sum(per_medium)
    assert r.finish_reason in ("stop", "length") and r.stats.completion_tokens > 0
    assert backend.cached_tokens[:total] == prompt.tokens
    assert "media_tokens" not in generate(backend, text_only, GREEDY, max_tokens=2).stats.as_dict()


def test_a_second_turn_about_the_same_image_does_not_encode_it_again(backend, files, monkeypatch):
    mk = backend.media_marker()
    image = medium("image", files["a.png"])
    backend.truncate(0)
    first = backend.tokenize_media(chat(backend, f"what is in {mk} here"), [image])
    r1 = generate(backend, first, GREEDY, max_tokens=8)
    encodes = count_encodes(backend, monkeypatch)
    second = backend.tokenize_media(chat(backend, f"what is in {mk} here", r1.text or "it is", "and the colour"),
                                    [image])
    span = second.spans[0]
    r2 = generate(backend, second, GREEDY, max_tokens=8)
    assert encodes == [] and span.encode_ms is None and r2.stats.media_encode_ms is None
    assert "media_encode_ms" not in r2.stats.as_dict() and r2.stats.as_dict()["media_tokens"] == span.length
    assert r2.stats.cached_prompt_tokens >= span.end  # the image came from the KV cache
    # Another image at the same place is encoded (and nothing of the old one is kept).
    other = backend.tokenize_media(chat(backend, f"what is in {mk} here", r1.text or "it is", "and the colour"),
                                   [medium("image", files["b.png"])])
    r3 = generate(backend, other, GREEDY, max_tokens=4)
    assert encodes == ["image"] and r3.stats.cached_prompt_tokens == other.spans[0].start


def test_the_cache_is_never_cut_inside_a_medium(backend, files):
    mk = backend.media_marker()
    prompt = backend.tokenize_media(chat(backend, f"a {mk} b"), [medium("audio", files["a.wav"])])
    backend.truncate(0)
    generate(backend, prompt, GREEDY, max_tokens=2)
    span = prompt.spans[0]
    backend.truncate(span.start + span.length // 2)
    assert len(backend.cached_tokens) == span.start  # cut at the medium's start
    for tokens in ([span.placeholder], [prompt.tokens[0], span.placeholder], [-5, 7]):
        with pytest.raises(BackendError, match="placeholder"):
            backend.forward(tokens)  # a placeholder is no token
    assert len(backend.cached_tokens) == span.start
    assert MediaPrompt(prompt.tokens, prompt.spans).safe_prefix(span.start + 3) == span.start


def test_a_medium_that_does_not_fit_is_refused_and_the_cache_kept(backend, files):
    mk = backend.media_marker()
    prompt = backend.tokenize_media(chat(backend, f"x {mk}"), [medium("image", files["a.png"])])
    backend.truncate(0)
    filler = backend.tokenize("the tea is in the hat " * 200)[: 1024 - prompt.spans[0].length + 1]
    backend.forward(filler)
    with pytest.raises(ContextOverflowError):
        backend.forward_media(prompt.spans[0])
    assert backend.cached_tokens == filler
    backend.truncate(0)


def _engine(drafter):
    from assistant.inference.speculative import SpeculativeEngine

    return SpeculativeEngine(drafter, adaptive=False, max_draft=4)


def _drafting_prompt(b: LlamaCppBackend, files) -> MediaPrompt:
    # The image first, then enough text that the engine's calibration probe (the last 64
    # tokens) is text; repeated text so that prompt lookup finds n-grams to copy.
    mk = b.media_marker()
    text = chat(b, f"{mk} the tea is in the hat and the rain is in the tin. " * 1
                + "the tea is in the hat and the rain is in the tin. " * 6)
    return b.tokenize_media(text, [medium("image", files["a.png"])])


def test_prompt_lookup_drafting_after_an_image_keeps_greedy_output(backend, files):
    from assistant.inference.speculative import NgramDrafter

    prompt = _drafting_prompt(backend, files)
    backend.truncate(0)
    plain = generate(backend, prompt, GREEDY, max_tokens=40)
    backend.truncate(0)
    engine = _engine(NgramDrafter())
    fast = generate(backend, prompt, GREEDY, max_tokens=40, speculative=engine)
    assert fast.tokens == plain.tokens and fast.stats.drafter == "ngram" and fast.stats.accepted > 0
    assert fast.stats.media_tokens == plain.stats.media_tokens == prompt.spans[0].length


def test_mtp_drafting_after_an_image_keeps_greedy_output(files, tmp_path):
    from assistant.inference.speculative import MtpDrafter

    drafter = write_assistant(tmp_path / "mtp-tiny.gguf", AssistantShape.for_target(Gemma4Shape()))
    b = LlamaCppBackend()
    b.load(str(files["model"]), LoadOptions(n_ctx=1024, n_threads=2, extra=KV, mtp_model=str(drafter)))
    try:
        assert b.mtp_kind() == "assistant" and "image" in b.media_support()
        prompt = _drafting_prompt(b, files)
        plain = generate(b, prompt, GREEDY, max_tokens=24)
        b.truncate(0)
        fast = generate(b, prompt, GREEDY, max_tokens=24, speculative=_engine(MtpDrafter(b)))
        assert fast.tokens == plain.tokens and fast.stats.drafted > 0 and fast.stats.drafter_kind == "assistant"
    finally:
        b.unload()


def _gif(path: Path) -> Path:
    from PIL import Image

    frames = [Image.new("RGB", (40, 40), c) for c in ("red", "blue")]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _wav_with_codec(tag: int) -> bytes:
    body = b"\0" * 400
    fmt = struct.pack("<HHIIHH", tag, 1, 16000, 16000, 1, 8)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(body)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("kind,name,data,message", [
    ("image", "cut.png", png_bytes(48, 48)[:300], "could not be decoded"),
    ("image", "notes.png", b"just some text, not a picture\n" * 4, "not an image"),
    ("image", "empty.png", b"", "empty"),
    ("audio", "empty.wav", wav_bytes(0.0), "no audio samples"),
    ("audio", "cut.wav", wav_bytes(1.0)[:1000], "truncated"),
    ("audio", "mp3-in-wav.wav", _wav_with_codec(0x55), "codec 0x0055"),
    ("audio", "noise.wav", bytes(range(256)) * 8, "not a WAV, MP3 or FLAC"),
    ("audio", "picture.wav", png_bytes(16, 16), "not a WAV, MP3 or FLAC"),
    ("image", "sound.png", wav_bytes(0.2), "not an image"),
])
def test_bad_media_are_clear_errors_and_the_model_goes_on(backend, files, tmp_path, kind, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    mk = backend.media_marker()
    with pytest.raises(MediaError, match=message):
        backend.tokenize_media(chat(backend, f"see {mk}"), [medium(kind, path)])
    good = backend.tokenize_media(chat(backend, f"see {mk}"), [medium(kind, files["a.png" if kind == "image"
                                                                                    else "a.wav"])])
    assert generate(backend, good, GREEDY, max_tokens=2).stats.completion_tokens > 0


def test_more_markers_than_media_too_many_pixels_and_an_animation(backend, files, tmp_path, monkeypatch):
    mk = backend.media_marker()
    with pytest.raises(MediaError, match="2 media marker"):
        backend.tokenize_media(chat(backend, f"{mk} {mk}"), [medium("image", files["a.png"])])
    gif = medium("image", _gif(tmp_path / "anim.gif"))
    assert backend.tokenize_media(chat(backend, f"{mk}"), [gif]).spans[0].length > 0  # its first frame
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # the decompression-bomb limit, made small
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(64, 64, seed=9))
    with pytest.raises(MediaError, match="too many pixels"):
        backend.tokenize_media(chat(backend, f"{mk}"), [medium("image", big)])


def test_a_projector_for_another_model_is_refused_naming_both_files(files, tmp_path):
    wide = write_projector(tmp_path / "mmproj-wide.gguf", ProjectorShape(n_embd=128))
    b = LlamaCppBackend()
    with pytest.raises(ModelLoadError) as err:
        b.load(str(files["model"]), LoadOptions(n_ctx=256, n_threads=2, mmproj=str(wide)))
    msg = str(err.value)
    assert str(wide) in msg and str(files["model"]) in msg
    assert "output embedding size is 128" in msg and "n_embd (gemma4.embedding_length) is 64" in msg
    with pytest.raises(ModelLoadError, match="not a projector"):
        b.load(str(files["model"]), LoadOptions(n_ctx=256, mmproj=str(files["model"])))
    with pytest.raises(ModelLoadError, match="does not exist"):
        b.load(str(files["model"]), LoadOptions(n_ctx=256, mmproj=str(tmp_path / "missing.gguf")))


def test_the_daemon_refuses_a_configured_projector_before_unloading_anything(files, tmp_path):
    from assistant.config.models import ModelSpec
    from assistant.daemon.drafts import resolve_mmproj
    from assistant.protocol import RPCError

    wide = write_projector(tmp_path / "wide.gguf", ProjectorShape(n_embd=128))
    spec = ModelSpec(name="g4", path=files["model"], mmproj=wide)
    with pytest.raises(RPCError, match="does not belong to model"):
        asyncio.run(resolve_mmproj("g4", spec, "llama.cpp"))
    ok = ModelSpec(name="g4", path=files["model"], mmproj=files["projector"])
    assert asyncio.run(resolve_mmproj("g4", ok, "llama.cpp")) == str(files["projector"])


def test_sibling_projectors_that_do_not_pair_are_passed_over(files, tmp_path):
    model, _ = write_media_pair(tmp_path, projector_name="mmproj-b-right.gguf")
    write_projector(tmp_path / "mmproj-a-wide.gguf", ProjectorShape(n_embd=128))
    (tmp_path / "mmproj-0-junk.gguf").write_bytes(b"not a gguf at all")
    found, lines = mmproj_pairing.find_sibling(model)
    assert found == str(tmp_path / "mmproj-b-right.gguf")
    assert any("mmproj-a-wide.gguf: ignored: does not pair" in ln for ln in lines)
    assert any("mmproj-0-junk.gguf: ignored" in ln for ln in lines)
    (tmp_path / "mmproj-b-right.gguf").unlink()
    b = LlamaCppBackend()
    info = b.load(str(model), LoadOptions(n_ctx=256, n_threads=2))
    try:
        assert info.modalities == ["text"] and b.media_support() == frozenset()
        assert "text only" in info.choices["media"] and "mmproj-a-wide.gguf" in info.choices["media"]
        with pytest.raises(MediaError, match="reads no media natively"):
            b.tokenize_media(chat(b, "x <__media__>"), [medium("image", files["a.png"])])
    finally:
        b.unload()


def test_a_projector_with_one_kind_reads_only_that_kind(files, tmp_path):
    model, _ = write_media_pair(tmp_path, projector_shape=ProjectorShape(audio=False))
    b = LlamaCppBackend()
    b.load(str(model), LoadOptions(n_ctx=256, n_threads=2, extra={"media": True}))
    try:
        assert b.media_support() == frozenset({"image"}) and b.info.modalities == ["text", "image"]
        with pytest.raises(MediaError, match="does not read audio"):
            b.tokenize_media(chat(b, "x <__media__>"), [medium("audio", files["a.wav"])])
    finally:
        b.unload()


def test_a_glm4_file_without_mrope_sections_takes_no_projector(tmp_path):
    """llama.cpp's glm4/glm4moe graph aborts the process on embeddings unless the file has
    M-RoPE sections: such a projector is refused from the headers, never loaded."""
    from gguf_writer import tiny_mtp_gguf

    model = tiny_mtp_gguf(tmp_path / "glm.gguf")
    projector = write_projector(tmp_path / "mmproj-glm.gguf", ProjectorShape(n_embd=64))
    pairing = mmproj_pairing.projector_pairing(model, projector)
    assert not pairing.ok and any("M-RoPE" in d for d in pairing.differences)
    assert any("made for gemma4 models" in d for d in pairing.differences)
