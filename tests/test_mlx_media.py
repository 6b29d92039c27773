"""Images and audio read natively on the MLX backend (Gemma 4's towers through mlx-vlm).

On a tiny random Gemma 4 folder with a vision and an audio tower
(tests/mlx_gemma4_media_files.py), real media made here (Pillow draws the
image, ``wave`` writes the WAV), checked against mlx-vlm 0.7.10 itself:

- the prompt's tokens are exactly what mlx-vlm's Gemma4Processor makes of the
  same text and media (each medium its begin token, as many soft tokens as
  the processor counts, its end token), and the counts follow the medium
  (two image sizes, two audio lengths): nothing is hard-coded;
- the logits after prefilling text + image + text + audio + text through
  ``tokenize_media`` / ``forward_media`` / ``forward`` on the backend's cache
  equal mlx-vlm's own model forward over the same input (its towers, its
  language model, its bidirectional attention within an image), and a
  causal-only image does not (so the comparison can fail);
- a reply completes; the next turn with the same image reuses the cached
  prefix (no forward_media, no decode, no encode); a cut inside a medium
  keeps none of it;
- what the folder says: support for the towers it holds, none (and why) for
  a text-only one, a kind it lacks refused; a llama.cpp ``mmproj`` refused;
- bad media: a truncated PNG, a text file named .png, an empty, a truncated
  and a non-WAV audio file are each a MediaError naming the problem, and the
  backend keeps serving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import wave
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("the mlx extra is not installed", allow_module_level=True)
if importlib.util.find_spec("mlx_vlm") is None:
    pytest.skip("mlx-vlm (the [vlm] extra) is not installed: pip install --no-deps mlx-vlm==0.7.10 "
                "&& pip install requests Pillow", allow_module_level=True)

from mlx_gemma4_media_files import MEDIA_TOKENS, write_media_target  # noqa: E402

from backends.base import LoadOptions, MediaError, ModelLoadError  # noqa: E402
from backends.media import MediaInput, MediaPrompt  # noqa: E402
from backends.mlx_backend import MLXBackend  # noqa: E402

MARK = "<__media__>"
CHAT = "<|turn>user\nWhat is here?\n{m}\nand here:\n{m}\nSay it.<turn|>\n<|turn>model\n"


# --------------------------------------------------------------------------
# media made by the tests


def _png(path: Path, size=(48, 48), text="Hi 42") -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((2, size[1] // 3), text, fill="black")
    img.save(path)
    return path


def _samples(seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t)).astype(np.float32)


def _wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def _medium(kind: str, path: Path) -> MediaInput:
    data = path.read_bytes()
    return MediaInput(kind, str(path), hashlib.sha256(data).hexdigest(),
                      "image/png" if kind == "image" else "audio/wav")


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """No model hub here (nor on CI): transformers and huggingface_hub, which mlx-vlm's
    processor goes through, read only the folder the test wrote, and fail at once
    rather than wait on a network they would otherwise try."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_media_target(tmp_path_factory.mktemp("mlx-media") / "gemma-4-tiny-av")


@pytest.fixture(scope="module")
def backend(folder):
    b = MLXBackend()
    b.load(str(folder), LoadOptions(n_ctx=1024))
    yield b
    b.unload()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    return {"image": _png(d / "sign.png"), "wide": _png(d / "wide.png", (60, 20), "wide"),
            "audio": _wav(d / "tone.wav", _samples(1.0)), "short": _wav(d / "short.wav", _samples(0.5)),
            "d": d}


@pytest.fixture(scope="module")
def reference(folder):
    return _reference_for(folder)


def _reference_for(folder: Path):
    """mlx-vlm's own Gemma 4 (towers and language model) and processor over the same folder."""
    import warnings

    import mlx.core as mx
    from mlx_vlm.models.gemma4.processing_gemma4 import Gemma4Processor
    from mlx_vlm.utils import load_model

    model = load_model(folder)
    model.set_dtype(mx.float32)
    with warnings.catch_warnings():  # transformers' mel filter bank: "At least one mel filter has all zero values"
        warnings.simplefilter("ignore")
        return model, Gemma4Processor.from_pretrained(str(folder), local_files_only=True)


def _reference_inputs(processor, text: str, kinds: list[str], paths: list[Path]):
    """The processor's inputs for ``text`` with each marker as the medium's own token."""
    from PIL import Image

    for kind in kinds:
        text = text.replace(MARK, MEDIA_TOKENS["image_token" if kind == "image" else "audio_token"], 1)
    images = [Image.open(p) for k, p in zip(kinds, paths) if k == "image"] or None
    audio = [_read_back(p) for k, p in zip(kinds, paths) if k == "audio"] or None
    return processor(text="<bos>" + text, images=images, audio=audio, add_special_tokens=False)


def _read_back(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


def _prefill(b: MLXBackend, prompt: MediaPrompt) -> dict[int, np.ndarray]:
    """Prefill ``prompt`` from an empty cache, as the generation loop does; the logits of every text row."""
    b.truncate(0)
    rows: dict[int, np.ndarray] = {}
    pos = 0
    for span in [*prompt.spans, None]:
        stop = span.start if span is not None else len(prompt.tokens)
        if stop > pos:
            out = b.forward(prompt.tokens[pos:stop], logits_at=list(range(stop - pos)))
            rows.update({pos + i: out[i] for i in range(stop - pos)})
        if span is not None:
            b.forward_media(span)
            pos = span.end
    return rows


# --------------------------------------------------------------------------
# what the folder says


def test_a_folder_with_towers_reads_images_and_audio(backend):
    assert backend.media_support() == frozenset({"image", "audio"})
    said = backend.info.choices["media"]
    assert "images" in said and "audio" in said and "bidirectional" in said and "mlx-vlm" in said


def test_a_text_only_folder_reads_no_media_and_says_why(tmp_path, media):
    b = MLXBackend()
    b.load(str(write_media_target(tmp_path / "text-only", vision=False, audio=False)), LoadOptions(n_ctx=256))
    try:
        assert b.media_support() == frozenset()
        assert "no vision or audio tower" in b.info.choices["media"]
        with pytest.raises(MediaError, match="reads no image natively"):
            b.tokenize_media(f"look {MARK}", [_medium("image", media["image"])])
    finally:
        b.unload()


def test_a_vision_only_folder_refuses_audio(tmp_path, media):
    b = MLXBackend()
    b.load(str(write_media_target(tmp_path / "vision-only", audio=False)), LoadOptions(n_ctx=256))
    try:
        assert b.media_support() == frozenset({"image"})
        with pytest.raises(MediaError, match="reads no audio natively"):
            b.tokenize_media(f"hear {MARK}", [_medium("audio", media["audio"])])
    finally:
        b.unload()


def test_an_mmproj_is_refused_on_mlx(folder, tmp_path):
    with pytest.raises(ModelLoadError, match="mmproj .* llama.cpp projector"):
        MLXBackend().load(str(folder), LoadOptions(n_ctx=256, mmproj=str(tmp_path / "mmproj-x.gguf")))


# --------------------------------------------------------------------------
# counts and logits against mlx-vlm


@pytest.mark.parametrize("image, audio", [("image", "audio"), ("wide", "short")])
def test_tokens_are_the_processors_and_media_add_what_it_counts(backend, reference, media, image, audio):
    _, processor = reference
    kinds, paths = ["image", "audio"], [media[image], media[audio]]
    prompt = backend.tokenize_media(CHAT.format(m=MARK), [_medium(k, p) for k, p in zip(kinds, paths)])
    ref = np.array(_reference_inputs(processor, CHAT.format(m=MARK), kinds, paths)["input_ids"][0])
    cfg = json.loads((Path(backend.info.path) / "config.json").read_text())
    soft = {"image": int((ref == cfg["image_token_id"]).sum()), "audio": int((ref == cfg["audio_token_id"]).sum())}
    assert [s.length for s in prompt.spans] == [soft["image"], soft["audio"]]
    ours = np.array(prompt.tokens)
    for span, kind in zip(prompt.spans, kinds):
        ours[span.start:span.end] = cfg[f"{kind}_token_id"]
        assert set(prompt.tokens[span.start:span.end]) == {span.placeholder}
    assert ours.tolist() == ref.tolist()
    # Each medium raises the prompt by its soft tokens and its begin/end tokens, nothing else.
    text_only = backend.tokenize(CHAT.format(m=""))
    assert len(prompt.tokens) == len(text_only) + soft["image"] + soft["audio"] + 4


def test_counts_follow_the_medium(backend, media):
    got = {k: backend.tokenize_media(f"x\n{MARK}\n", [_medium("image" if k in ("image", "wide") else "audio",
                                                             media[k])]).spans[0].length
           for k in ("image", "wide", "audio", "short")}
    assert got["image"] != got["wide"] and got["audio"] != got["short"]
    assert got["audio"] == 25 and got["short"] == 13  # 40 ms a token: 1 s and 0.5 s


def _logits_against_mlx_vlm(backend, reference, media) -> tuple[str, list[int], np.ndarray]:
    """Prefill text + image + text + audio + text on ``backend`` and through
    mlx-vlm's model; asserts the logits of every text row agree."""
    import mlx.core as mx

    model, processor = reference
    kinds, paths = ["image", "audio"], [media["image"], media["audio"]]
    text = CHAT.format(m=MARK)
    prompt = backend.tokenize_media(text, [_medium(k, p) for k, p in zip(kinds, paths)])
    ours = _prefill(backend, prompt)
    assert backend.cached_tokens == prompt.tokens
    inputs = _reference_inputs(processor, text, kinds, paths)
    out = model(inputs["input_ids"], **{k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")})
    ref = np.array(out.logits[0].astype(mx.float32))
    rows = sorted(ours)
    assert len(rows) == len(prompt.tokens) - sum(s.length for s in prompt.spans)
    np.testing.assert_allclose(np.stack([ours[r] for r in rows]), ref[rows], atol=2e-4, rtol=1e-4)
    return text, rows, ref


def test_prefill_logits_equal_mlx_vlms_forward(backend, reference, media):
    text, rows, ref = _logits_against_mlx_vlm(backend, reference, media)
    kinds, paths = ["image", "audio"], [media["image"], media["audio"]]

    # The image's soft tokens attend to each other both ways, as mlx-vlm's do: causal ones give other logits.
    towers = backend._towers
    towers.bidirectional = False
    try:
        causal = _prefill(backend, backend.tokenize_media(text, [_medium(k, p) for k, p in zip(kinds, paths)]))
    finally:
        towers.bidirectional = True
    last = rows[-1]
    assert np.abs(causal[last] - ref[last]).max() > 1e-3


def test_quantized_towers_load_and_agree_with_mlx_vlm(tmp_path, media):
    """A conversion that stores the towers 4-bit (as quantized mlx-community folders may)."""
    folder = write_media_target(tmp_path / "gemma-4-tiny-av-4bit", quantize_towers=32)
    b = MLXBackend()
    b.load(str(folder), LoadOptions(n_ctx=512))
    try:
        assert b.media_support() == frozenset({"image", "audio"})
        assert type(b._towers.module.vision_tower.encoder.layers[0].mlp.up_proj.linear).__name__ == "QuantizedLinear"
        _logits_against_mlx_vlm(b, _reference_for(folder), media)
    finally:
        b.unload()


# --------------------------------------------------------------------------
# replies and turns


def _greedy(b: MLXBackend, prompt: MediaPrompt, n: int) -> list[int]:
    rows = _prefill(b, prompt)
    tok = int(np.argmax(rows[len(prompt.tokens) - 1]))
    out = [tok]
    while len(out) < n and not b.is_eog(tok):
        tok = int(np.argmax(b.forward([tok])[0]))
        out.append(tok)
    return out


def test_a_reply_completes_and_the_next_turn_reuses_the_image(backend, media):
    image = _medium("image", _png(media["d"] / "fresh.png", (40, 40), "new"))  # not encoded by another test
    turn1 = "<|turn>user\nRead it:\n" + MARK + "\n<turn|>\n<|turn>model\n"
    prompt = backend.tokenize_media(turn1, [image])
    reply = _greedy(backend, prompt, 6)
    assert reply and all(0 <= t < backend.info.vocab_size for t in reply)
    assert prompt.spans[0].encode_ms is not None and prompt.spans[0].encode_ms > 0

    # The next turn: the same image in the history, a new question after the reply.
    turn2 = turn1 + backend.detokenize(reply) + "<turn|>\n<|turn>user\nAnd again?<turn|>\n<|turn>model\n"
    second = backend.tokenize_media(turn2, [image])
    span = second.spans[0]
    assert span.handle.prepared is None and span.handle.embeddings is not None  # not decoded again
    cached = backend.cached_tokens
    common = 0
    while common < min(len(cached), len(second.tokens)) and cached[common] == second.tokens[common]:
        common += 1
    keep = second.safe_prefix(common)
    assert keep >= span.end  # the image is in the reused prefix: no forward_media this turn
    backend.truncate(keep)
    out = backend.forward(second.tokens[keep:])
    assert out.shape == (1, backend.info.vocab_size) and backend.cached_tokens == second.tokens


def test_the_same_image_elsewhere_is_not_encoded_again(backend, media):
    image = _medium("image", media["wide"])
    first = backend.tokenize_media(f"a\n{MARK}\n", [image])
    _prefill(backend, first)
    moved = backend.tokenize_media(f"other words first\n{MARK}\n", [image])
    _prefill(backend, moved)
    assert first.spans[0].encode_ms > 0 and moved.spans[0].encode_ms == 0.0


def test_the_cache_is_never_cut_inside_a_medium(backend, media):
    prompt = backend.tokenize_media(f"x\n{MARK}\ny", [_medium("image", media["image"])])
    _prefill(backend, prompt)
    span = prompt.spans[0]
    backend.truncate(span.start + 3)
    assert backend.cached_tokens == prompt.tokens[:span.start]
    backend.forward_media(span)  # evaluated again from its kept embeddings
    assert backend.cached_tokens == prompt.tokens[:span.end] and span.encode_ms == 0.0


def test_a_reply_completes_through_the_generation_loop(backend, media):
    from assistant.inference.generation import generate
    from assistant.inference.sampling import SamplingParams

    turn = "<|turn>user\nWhat do you see and hear?\n" + MARK + "\n" + MARK + "<turn|>\n<|turn>model\n"
    d = media["d"]  # media no other test encoded: the first reply encodes both
    prompt = backend.tokenize_media(turn, [_medium("image", _png(d / "loop.png", (44, 52), "loop")),
                                           _medium("audio", _wav(d / "loop.wav", _samples(0.8)))])
    backend.truncate(0)
    result = generate(backend, prompt, SamplingParams(temperature=0), max_tokens=5)
    assert result.stats.prompt_tokens == len(prompt.tokens) and len(result.tokens) >= 1
    assert result.stats.media_tokens == sum(s.length for s in prompt.spans) and result.stats.media_encode_ms > 0
    # The same prompt again: both media are in the reused prefix, nothing is encoded or evaluated again.
    again = generate(backend, prompt, SamplingParams(temperature=0), max_tokens=5)
    assert again.tokens == result.tokens and again.stats.cached_prompt_tokens >= prompt.spans[-1].end
    assert not again.stats.media_encode_ms  # None: no medium was evaluated


# --------------------------------------------------------------------------
# bad media


def _bad(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


def test_bad_media_are_clear_errors_and_the_backend_keeps_serving(backend, media):
    d = media["d"]
    png = media["image"].read_bytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"")
    empty_wav = buf.getvalue()
    full_wav = media["audio"].read_bytes()
    cases = [
        ("image", _bad(d, "cut.png", png[: len(png) // 2]), r"cannot decode image .*truncated"),
        ("image", _bad(d, "notes.png", b"just some text, not a picture\n" * 4), "not an image"),
        ("audio", _bad(d, "empty.wav", empty_wav), "holds no audio samples"),
        ("audio", _bad(d, "cut.wav", full_wav[: len(full_wav) // 2]), "truncated: its header says 16000"),
        ("audio", _bad(d, "song.wav", b"ID3\x03\x00" + b"\x00" * 64), "MP3 audio; the MLX backend decodes WAV"),
        ("audio", _bad(d, "zero.wav", b""), "not a WAV file"),
    ]
    for kind, path, message in cases:
        with pytest.raises(MediaError, match=message):
            backend.tokenize_media(f"look\n{MARK}\n", [_medium(kind, path)])
    with pytest.raises(MediaError, match="2 media markers for 1 media"):
        backend.tokenize_media(f"{MARK}{MARK}", [_medium("image", media["image"])])
    backend.truncate(0)
    assert backend.forward(backend.tokenize("still here")).shape == (1, backend.info.vocab_size)


def test_too_long_audio_is_refused_from_its_header(backend, media):
    long = _wav(media["d"] / "long.wav", np.zeros(16000 * 31, dtype=np.float32))
    with pytest.raises(MediaError, match="31.0 s long; this model hears at most 30 s"):
        backend.tokenize_media(MARK, [_medium("audio", long)])


def test_audio_at_another_rate_is_resampled(backend, media):
    at_22k = _wav(media["d"] / "tone22k.wav", _samples(1.0, 22050), 22050)
    prompt = backend.tokenize_media(MARK, [_medium("audio", at_22k)])
    assert prompt.spans[0].length == 25


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels and holds none."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(backend, media):
    bomb = _png_header_only(media["d"] / "bomb.png", 30000, 30000)
    with pytest.raises(MediaError, match="too large to decode safely"):
        backend.tokenize_media(MARK, [_medium("image", bomb)])


def test_an_animated_gif_is_read_by_its_first_frame(backend, media):
    from PIL import Image

    frames = [Image.new("RGB", (48, 48), c) for c in ("white", "black")]
    gif = media["d"] / "blink.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    prompt = backend.tokenize_media(f"x\n{MARK}\n", [_medium("image", gif)])
    assert prompt.spans[0].length == backend.tokenize_media(
        f"x\n{MARK}\n", [_medium("image", media["image"])]).spans[0].length  # both 48x48
    pixels = prompt.spans[0].handle.prepared.inputs["pixel_values"]
    assert pixels.min() > 0.9  # the white first frame, not the black second one


def test_without_mlx_vlm_the_model_serves_text_and_names_the_extra(folder, monkeypatch):
    from backends import mlx_media

    monkeypatch.setattr(mlx_media, "spec_found", lambda name: name != "mlx_vlm")
    b = MLXBackend()
    b.load(str(folder), LoadOptions(n_ctx=256))
    try:
        assert b.media_support() == frozenset()
        assert "need mlx-vlm, which is not installed; install: pip install 'local-assistant[vlm]'" in \
            b.info.choices["media"]
        assert b.forward(b.tokenize("text still works")).shape == (1, b.info.vocab_size)
    finally:
        b.unload()
