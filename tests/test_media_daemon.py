"""Media (images, audio) in chat messages, through the real daemon over its real socket.

The daemons here run a scripted backend from a plugin file (``echo``: it answers
with the text it was given, so a test sees what the model received) and, where a
test needs the fallbacks, a plugin with fake ``vision.ocr`` / ``audio.transcribe``
skills (each reply numbered, so a test sees whether the cache answered). Media are
made by the tests (tests/media_files.py): PNGs with text, tones, broken files.
The native path runs on the tiny random Gemma 4 + projector (tests/gemma4_media_files.py)
where the generation loop takes media prompts; the real fallback plugins where installed.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import struct
import textwrap
from pathlib import Path

import pytest
import yaml

from assistant.daemon.media import checks
from assistant.daemon.media.parts import Source, parse_content
from assistant.daemon.media.store import MediaStore
from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, isolated_env
from media_files import animated_gif, bomb_png, text_png, tone_wav, truncated

ECHO_BACKEND = '''
import numpy as np
from assistant import hookimpl
from backends.base import Backend, ModelInfo

EOS, V = 256, 512


class Echo(Backend):
    """Answers "ECHO: " and the last user message as the template rendered it."""

    name = "echo"

    @classmethod
    def availability(cls):
        return True, "test backend"

    def load(self, path, options=None):
        self._cache = []
        self._info = ModelInfo(name="echo", path=path, backend="echo", architecture="script",
                               context_length=16384, train_context_length=16384, vocab_size=V,
                               chat_template=None, template_source="fallback", bos_token_id=None,
                               eos_token_ids=[EOS])
        return self._info

    def unload(self):
        pass

    def tokenize(self, text, *, add_bos=True, special=True):
        return list(text.encode())

    def token_bytes(self, token):
        return bytes([token]) if 0 <= token < 256 else b""

    def is_eog(self, token):
        return token == EOS

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"

    @property
    def cached_tokens(self):
        return list(self._cache)

    def _next(self):
        text = bytes(t for t in self._cache if 0 <= t < 256)
        convo, _, said = text.rpartition(b"<assistant>")
        last = convo.rpartition(b"<user>")[2].rpartition(b"</user>")[0]
        script = b"ECHO: " + last
        return script[len(said)] if len(said) < len(script) else EOS

    def forward(self, tokens, logits_at=None):
        self._cache.extend(tokens)
        out = np.zeros((1 if logits_at is None else len(logits_at), V), dtype=np.float32)
        out[:, self._next()] = 10.0
        return out

    def truncate(self, n):
        del self._cache[n:]


@hookimpl
def register_backends(register):
    register("echo", Echo)
'''

FAKE_FALLBACKS = '''
import os
from assistant import hookimpl

CALLS = {"vision.ocr": 0, "audio.transcribe": 0}


def _ocr(path):
    CALLS["vision.ocr"] += 1
    return {"text": f"OCR#{CALLS['vision.ocr']} {os.path.getsize(path)} bytes", "lines": [], "width": 1, "height": 1}


def _transcribe(path, language=None):
    CALLS["audio.transcribe"] += 1
    return {"text": f"SPOKEN#{CALLS['audio.transcribe']}", "segments": [], "duration": 1.0, "language": "en",
            "model": "fake"}


def _calls():
    return dict(CALLS)


PATH = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}


@hookimpl
def register_skills(register):
    register("vision.ocr", _ocr, "fake OCR", PATH)
    register("audio.transcribe", _transcribe, "fake transcription",
             {"type": "object", "properties": {"path": {"type": "string"}, "language": {"type": "string"}},
              "required": ["path"]})
    register("fakemedia.calls", _calls, "how often each fake ran", {"type": "object", "properties": {}})
'''


def _daemon(home: Path, *, fallbacks: bool, config: dict | None = None) -> DaemonProcess:
    home.mkdir(parents=True, exist_ok=True)
    plugin_dir = home / "plugins"
    plugin_dir.mkdir(exist_ok=True)
    (plugin_dir / "echo_backend.py").write_text(textwrap.dedent(ECHO_BACKEND))
    names = ["echo_backend"]
    if fallbacks:
        (plugin_dir / "fakemedia.py").write_text(textwrap.dedent(FAKE_FALLBACKS))
        names.append("fakemedia")
    fake = home / "echo.bin"
    fake.write_bytes(b"echo")
    cfg = {"threads": 2, "preload": True, "model": "echo",
           "models": {"echo": {"path": str(fake), "backend": "echo", "speculative": {"drafter": "off"}}},
           **(config or {})}
    env = {**isolated_env(home), "ASSISTANT_PLUGIN_DIR": str(plugin_dir), "ASSISTANT_PLUGINS": ",".join(names)}
    return DaemonProcess(home, config_text=yaml.safe_dump(cfg), env=env)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A daemon with the echo model and the fake fallbacks; yields (daemon, its home)."""
    home = tmp_path_factory.mktemp("media")
    d = _daemon(home, fallbacks=True)
    d.start()
    yield d, home
    d.stop()


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A daemon with the echo model (it reads no media) and no fallback skills."""
    d = _daemon(tmp_path_factory.mktemp("bare"), fallbacks=False)
    d.start()
    yield d
    d.stop()


def media_dir(home: Path) -> Path:
    return home / "data" / "assistant" / "media"


async def ask(d: DaemonProcess, **params) -> dict:
    async with await d.client() as c:
        return await c.call("chat", {"max_tokens": 2000, **params})


async def refused(d: DaemonProcess, **params) -> RPCError:
    with pytest.raises(RPCError) as info:
        await ask(d, **params)
    return info.value


async def messages_of(d: DaemonProcess, session: str) -> list[dict]:
    async with await d.client() as c:
        try:
            return (await c.call("sessions.get", {"id": session}))["messages"]
        except RPCError as exc:
            if exc.code == ErrorCode.SESSION_NOT_FOUND:
                return []
            raise


async def still_serves(d: DaemonProcess) -> None:
    reply = await ask(d, prompt="ping")
    assert reply["text"] == "ECHO: ping" and reply["finish_reason"] == "stop"


# -- the checks, on their own ---------------------------------------------------------


def test_content_parts_in_every_shape_are_normalised():
    b64 = base64.b64encode(b"x").decode()
    parts = parse_content([{"type": "text", "text": "hi"}, {"type": "image", "path": "~/a.png"},
                           {"type": "image", "data": b64, "name": "dir/b.png"},
                           {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
                           {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
                           {"type": "audio", "url": "file:///tmp/c%20d.wav"}], "prompt", local=True)
    assert parts[0] == {"type": "text", "text": "hi"}
    assert parts[1] == Source("image", "prompt[1]", "a.png", path=os.path.expanduser("~/a.png"))
    assert parts[2] == Source("image", "prompt[2]", "b.png", data=b64)
    assert parts[3].data == b64 and parts[3].kind == "image"
    assert parts[4] == Source("audio", "prompt[4]", data=b64)
    assert parts[5].path == "/tmp/c d.wav" and parts[5].name == "c d.wav"


@pytest.mark.parametrize("part, words", [
    ({"type": "image", "path": "rel/a.png"}, "must be absolute"),
    ({"type": "image", "path": "/a", "data": "eA=="}, "exactly one of"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "does not fetch"),
    ({"type": "image_url", "image_url": {"url": "data:image/png,raw"}}, "must be base64"),
    ({"type": "input_audio", "input_audio": {"data": "eA==", "format": "ogg"}}, "not taken"),
    ({"type": "video", "data": "eA=="}, "unknown content part type"),
    ({"type": "text"}, "needs 'text'"),
])
def test_bad_part_shapes_name_the_part(part, words):
    with pytest.raises(RPCError) as info:
        parse_content([{"type": "text", "text": "x"}, part], "prompt", local=True)
    assert info.value.code == ErrorCode.INVALID_PARAMS and "prompt[1]" in info.value.message
    assert words in info.value.message


def test_paths_and_file_urls_are_local_only():
    for part in ({"type": "image", "path": "/etc/passwd"}, {"type": "image_url", "image_url": {"url": "file:///x"}},
                 {"type": "image", "sha256": "0" * 64, "mime": "image/png"}):
        with pytest.raises(RPCError) as info:
            parse_content([part], "messages[0].content", local=False)
        assert info.value.code == ErrorCode.INVALID_PARAMS and "HTTP" in info.value.message \
            or "socket" in info.value.message


def test_store_is_content_addressed_and_private(tmp_path):
    store = MediaStore(tmp_path / "media")
    sha, path = store.put(b"\x89PNG same bytes", "image/png")
    again, path2 = store.put(b"\x89PNG same bytes", "image/png")
    assert (sha, path) == (again, path2) and path == tmp_path / "media" / sha[:2] / f"{sha}.png"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "media").stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_audio_headers_give_codec_and_duration_without_decoding(tmp_path):
    limits = checks.Limits()
    wav = tone_wav(tmp_path / "t.wav", 1.5).read_bytes()
    assert checks.check(wav, "audio", limits, "p").info["duration"] == 1.5
    frame = b"\xff\xfb\x90\x00" + bytes(413)  # MPEG-1 layer III, 128 kbps, 44.1 kHz
    mp3 = checks.check(frame * 100, "audio", limits, "p")
    assert mp3.mime == "audio/mpeg" and 2.5 < mp3.info["duration"] < 2.7
    # FLAC: STREAMINFO (16 kHz, mono, 16 bit, 32000 samples), then a frame's sync code
    packed = (16000 << 44) | (0 << 41) | (15 << 36) | 32000
    flac = b"fLaC" + b"\x80\x00\x00\x22" + bytes(10) + packed.to_bytes(8, "big") + bytes(16) + b"\xff\xf8" + bytes(8)
    got = checks.check(flac, "audio", limits, "p")
    assert got.mime == "audio/flac" and got.info["duration"] == 2.0
    with pytest.raises(RPCError) as info:
        checks.check(flac[:42], "audio", limits, "p")
    assert info.value.code == ErrorCode.MEDIA_INVALID and "no audio frames" in info.value.message


# -- the fallback path, through the daemon ------------------------------------------


async def test_image_and_audio_go_through_the_fallbacks_and_are_cached(served, tmp_path):
    d, home = served
    png = text_png(tmp_path / "scan.png", "Hello")
    wav = tone_wav(tmp_path / "memo.wav", 1.0)
    reply = await ask(d, session="fb", prompt=[{"type": "text", "text": "What does it say?"},
                                               {"type": "image", "path": str(png)}])
    size = png.stat().st_size
    assert reply["text"] == f"ECHO: What does it say?\n[Image scan.png — text read by OCR: OCR#1 {size} bytes]"
    assert reply["stats"]["media"] == "ocr" and "media_tokens" not in reply["stats"]
    stored = (await messages_of(d, "fb"))[0]
    assert stored["content"] == "What does it say?"
    (text, image) = stored["parts"]
    assert text == {"type": "text", "text": "What does it say?"}
    assert image["type"] == "image" and image["mime"] == "image/png" and image["name"] == "scan.png"
    assert image["width"] > 0 and image["height"] > 0
    kept = media_dir(home) / image["sha256"][:2] / f"{image['sha256']}.png"
    assert kept.read_bytes() == png.read_bytes() and stat.S_IMODE(kept.stat().st_mode) == 0o600

    # The next turn adds audio; the image in the history comes from the cache (OCR ran once).
    reply = await ask(d, session="fb", prompt=[{"type": "audio", "path": str(wav)}, {"type": "text", "text": "and?"}])
    assert reply["text"] == "ECHO: [Audio memo.wav — transcript: SPOKEN#1]\nand?"
    assert reply["stats"]["media"] == "ocr+transcript"
    async with await d.client() as c:
        calls = (await c.call("skills.call", {"name": "fakemedia.calls", "arguments": {}}))["result"]
    assert calls == {"vision.ocr": 1, "audio.transcribe": 1}

    # The same image again, inline this time: stored once, read from the cache.
    data = base64.b64encode(png.read_bytes()).decode()
    reply = await ask(d, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}]}])
    assert reply["text"] == f"ECHO: [Image {image['sha256'][:12]}.png — text read by OCR: OCR#1 {size} bytes]"
    assert sorted(p.name for p in media_dir(home).rglob("*.png")) == [kept.name]


async def test_animated_gif_is_its_first_frame_and_says_so(served, tmp_path):
    d, home = served
    gif = animated_gif(tmp_path / "anim.gif", ["one", "two", "three"])
    reply = await ask(d, session="gif", prompt=[{"type": "image", "path": str(gif)}])
    assert reply["notes"] == ["anim.gif: an animated GIF of 3 frames: only its first frame is used"]
    part = (await messages_of(d, "gif"))[0]["parts"][0]
    assert part["mime"] == "image/png" and part["frames"] == 3  # the first frame, as PNG
    from PIL import Image
    with Image.open(media_dir(home) / part["sha256"][:2] / f"{part['sha256']}.png") as img:
        assert getattr(img, "n_frames", 1) == 1 and img.size == (part["width"], part["height"])


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo.png"
    os.mkfifo(path)
    return str(path)


def _unreadable(tmp_path: Path) -> str:
    path = text_png(tmp_path / "secret.png", "x")
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything
        pytest.skip("running as root: a mode-0 file is still readable")
    return str(path)


def _wav_with_codec(tmp_path: Path, tag: int) -> str:
    path = tone_wav(tmp_path / "codec.wav", 0.5)
    data = bytearray(path.read_bytes())
    data[20:22] = struct.pack("<H", tag)
    path.write_bytes(bytes(data))
    return str(path)


def _long_wav(tmp_path: Path) -> str:
    """A WAV whose header and samples say 3 s, over the limit of the test (2 s)."""
    return str(tone_wav(tmp_path / "long.wav", 3.0, rate=8000))


# (name, how to make the part, the error code, words the message holds)
BAD = [
    ("truncated PNG", lambda t: {"type": "image", "path": str(truncated(text_png(t / "a.png", "Hi"), 0.5))},
     ErrorCode.MEDIA_INVALID, "truncated"),
    ("truncated JPEG", lambda t: {"type": "image", "path": str(truncated(_jpeg(t / "a.jpg"), 0.5))},
     ErrorCode.MEDIA_INVALID, "JPEG"),
    ("text named .png", lambda t: {"type": "image", "path": str(_write(t / "notes.png", b"just some text\n"))},
     ErrorCode.MEDIA_INVALID, "it is text"),
    ("30000x30000 header", lambda t: {"type": "image", "path": str(bomb_png(t / "bomb.png"))},
     ErrorCode.MEDIA_TOO_LARGE, "media.max_pixels"),
    ("empty WAV", lambda t: {"type": "audio", "path": str(_write(t / "e.wav", b""))},
     ErrorCode.MEDIA_INVALID, "empty"),
    ("truncated WAV", lambda t: {"type": "audio", "path": str(truncated(tone_wav(t / "t.wav", 1.0), 0.5))},
     ErrorCode.MEDIA_INVALID, "truncated"),
    ("unsupported codec", lambda t: {"type": "audio", "path": _wav_with_codec(t, 0x55)},
     ErrorCode.MEDIA_INVALID, "MPEG layer 3"),
    ("Ogg audio", lambda t: {"type": "audio", "path": str(_write(t / "a.ogg", b"OggS" + bytes(200)))},
     ErrorCode.MEDIA_INVALID, "Ogg"),
    ("image part with audio bytes", lambda t: {"type": "image", "path": str(tone_wav(t / "x.png", 0.2))},
     ErrorCode.MEDIA_INVALID, "the part says image"),
    ("missing file", lambda t: {"type": "image", "path": str(t / "nope.png")},
     ErrorCode.MEDIA_INVALID, "no such file"),
    ("a directory", lambda t: {"type": "image", "path": str(t)}, ErrorCode.MEDIA_INVALID, "directory"),
    ("a FIFO", lambda t: {"type": "image", "path": _fifo(t)}, ErrorCode.MEDIA_INVALID, "not a regular file"),
    ("unreadable", lambda t: {"type": "image", "path": _unreadable(t)}, ErrorCode.MEDIA_INVALID,
     "permission denied"),
    ("bad base64", lambda t: {"type": "image", "data": "iVBORw0KGgo!!!not base64"}, ErrorCode.MEDIA_INVALID,
     "base64"),
    ("oversize base64", lambda t: {"type": "image", "data": "A" * (3 * 1024 * 1024)}, ErrorCode.MEDIA_TOO_LARGE,
     "media.max_bytes"),
    ("oversize file", lambda t: {"type": "audio", "path": str(_write(t / "big.wav", bytes(3 * 1024 * 1024)))},
     ErrorCode.MEDIA_TOO_LARGE, "media.max_bytes"),
    ("a relative path", lambda t: {"type": "image", "path": "scan.png"}, ErrorCode.INVALID_PARAMS, "absolute"),
]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _jpeg(path: Path) -> Path:
    from PIL import Image
    Image.effect_noise((128, 128), 64).convert("RGB").save(path, format="JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """The fallback daemon with small media limits (2 MiB, 2 s of audio)."""
    d = _daemon(tmp_path_factory.mktemp("limited"), fallbacks=True,
                config={"media": {"max_bytes": 2 * 1024 * 1024, "max_audio_seconds": 2}})
    try:
        d.start()
    except RuntimeError as exc:
        if "media" in str(exc):
            pytest.skip(f"the config has no media section yet: {str(exc).splitlines()[-1]}")
        raise
    yield d
    d.stop()


@pytest.mark.parametrize("name, make, code, words", BAD, ids=[b[0] for b in BAD])
async def test_bad_media_is_a_clear_error_and_nothing_is_kept(limited, tmp_path, name, make, code, words):
    d = limited
    await ask(d, session="bad", prompt="kept")  # acknowledged: stays
    before = await messages_of(d, "bad")
    part = make(tmp_path)
    exc = await refused(d, session="bad", prompt=[{"type": "text", "text": "look"}, part])
    assert exc.code == code, exc.message
    assert words in exc.message and "prompt[1]" in exc.message
    assert await messages_of(d, "bad") == before
    await still_serves(d)


async def test_too_long_recording_is_refused_by_the_limit(limited, tmp_path):
    exc = await refused(limited, session="long", prompt=[{"type": "audio", "path": _long_wav(tmp_path)}])
    assert exc.code == ErrorCode.MEDIA_TOO_LARGE and "3.0 s long" in exc.message
    assert "media.max_audio_seconds (2 s)" in exc.message
    assert await messages_of(limited, "long") == []
    await still_serves(limited)


async def test_media_to_a_model_that_cannot_take_it_without_fallback(bare, tmp_path):
    png = text_png(tmp_path / "scan.png", "Hi")
    await ask(bare, session="s", prompt="first")
    exc = await refused(bare, session="s", prompt=[{"type": "image", "path": str(png)}])
    assert exc.code == ErrorCode.MEDIA_UNSUPPORTED
    assert "cannot take images" in exc.message and "vision.ocr" in exc.message
    assert exc.data["kind"] == "image"
    exc = await refused(bare, messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": base64.b64encode(tone_wav(tmp_path / "a.wav", 0.2)
                                                                         .read_bytes()).decode()}}]}])
    assert exc.code == ErrorCode.MEDIA_UNSUPPORTED and "audio.transcribe" in exc.message
    assert [m["content"] for m in await messages_of(bare, "s")] == ["first", "ECHO: first"]
    await still_serves(bare)


async def test_media_only_in_user_messages_and_markers_are_escaped(served, tmp_path):
    d, _home = served
    exc = await refused(d, messages=[{"role": "assistant", "content": [
        {"type": "image", "path": str(text_png(tmp_path / "a.png", "x"))}]}, {"role": "user", "content": "hi"}])
    assert exc.code == ErrorCode.INVALID_PARAMS and "only a user's message" in exc.message


async def test_session_with_media_replays_and_exports_after_a_restart(tmp_path):
    home = tmp_path / "restart"
    png = text_png(tmp_path / "page.png", "Page")
    wav = tone_wav(tmp_path / "note.wav", 0.5)
    d = _daemon(home, fallbacks=True)
    d.start()
    try:
        await ask(d, session="keep", prompt=[{"type": "text", "text": "read"}, {"type": "image", "path": str(png)},
                                             {"type": "audio", "path": str(wav)}])
    finally:
        d.stop()
    png.unlink()  # the session keeps its own copy
    d = _daemon(home, fallbacks=True)
    d.start()
    try:
        msgs = await messages_of(d, "keep")
        assert [p["type"] for p in msgs[0]["parts"]] == ["text", "image", "audio"]
        reply = await ask(d, session="keep", prompt="again")
        assert reply["stats"]["media"] == "ocr+transcript"  # the history's media, from the kept text
        async with await d.client() as c:
            calls = (await c.call("skills.call", {"name": "fakemedia.calls", "arguments": {}}))["result"]
            assert calls == {"vision.ocr": 0, "audio.transcribe": 0}  # cached in the store before the restart
            out = tmp_path / "export" / "keep.md"
            out.parent.mkdir()
            exported = await c.call("sessions.export", {"id": "keep", "path": str(out)})
        image, audio = msgs[0]["parts"][1:]
        assert exported["path"] == str(out)
        md = out.read_text()
        assert f"![page.png](media/{image['sha256']}.png)" in md
        assert f"[Audio: note.wav](media/{audio['sha256']}.wav) (0.5 s)" in md
        assert (out.parent / "media" / f"{image['sha256']}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out.parent / "media" / f"{audio['sha256']}.wav").read_bytes() == wav.read_bytes()
        assert {f["file"] for f in exported["media"]} == {f"media/{image['sha256']}.png",
                                                          f"media/{audio['sha256']}.wav"}
        assert exported["markdown"] == md
    finally:
        d.stop()


# -- the real fallback plugins, where installed ----------------------------------------


@pytest.mark.timeout(600)
async def test_real_ocr_fallback_reads_the_rendered_text(tmp_path):
    pytest.importorskip("plugins.vision", reason="the vision plugin (plugins/vision) is not installed")
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr-onnxruntime is not installed")
    home = tmp_path / "real"
    d = _daemon(home, fallbacks=False)
    d.env["ASSISTANT_PLUGINS"] = "echo_backend,vision"
    d.start()
    try:
        png = text_png(tmp_path / "sign.png", "OPEN 24 HOURS")
        reply = await ask(d, prompt=[{"type": "image", "path": str(png)}])
        assert reply["stats"]["media"] == "ocr"
        assert "text read by OCR" in reply["text"] and "OPEN" in reply["text"].upper()
    finally:
        d.stop()


# -- the native path: the tiny random Gemma 4 with its projector -------------------------


def _native_ready() -> None:
    import inspect

    from assistant.inference import generation
    if "MediaPrompt" not in inspect.getsource(generation):
        pytest.skip("the generation loop does not take media prompts yet (assistant/inference/generation.py)")
    pytest.importorskip("gemma4_media_files", reason="tests/gemma4_media_files.py is not there yet")


@pytest.mark.timeout(600)
async def test_native_media_on_tiny_gemma4(tmp_path):
    _native_ready()
    import gemma4_media_files as g4m
    target, _projector = g4m.write_media_pair(tmp_path / "g4")  # mmproj-*.gguf beside it: found by itself
    home = tmp_path / "native"
    home.mkdir()
    cfg = {"threads": 2, "context": 2048, "preload": False, "model": "g4",
           "models": {"g4": {"path": str(target), "speculative": {"drafter": "off"}}}}
    env = isolated_env(home)
    d = DaemonProcess(home, config_text=yaml.safe_dump(cfg), env={**env, "ASSISTANT_PLUGINS": ""})
    d.start()
    png = text_png(tmp_path / "img.png", "Hi", size=24)
    wav = tone_wav(tmp_path / "one.wav", 1.0)
    try:
        plain = await ask(d, session="n0", prompt="Describe.", max_tokens=4, temperature=0)
        first = await ask(d, session="n1", prompt=[{"type": "image", "path": str(png)},
                                                   {"type": "audio", "path": str(wav)},
                                                   {"type": "text", "text": "Describe."}], max_tokens=4,
                          temperature=0)
        st = first["stats"]
        assert st["media"] == "native" and first["finish_reason"] in ("stop", "length")
        assert st["media_tokens"] > 0 and st.get("media_encode_ms") is not None
        # prompt_tokens grew by the positions mtmd counted for the media (markers aside: a few tokens)
        assert st["prompt_tokens"] - plain["stats"]["prompt_tokens"] >= st["media_tokens"]
        second = await ask(d, session="n1", prompt="And again?", max_tokens=4, temperature=0)
        st2 = second["stats"]
        assert st2["media"] == "native" and "media_encode_ms" not in st2  # not encoded again
        assert st2["cached_prompt_tokens"] >= st["prompt_tokens"] - 1 - st["completion_tokens"] \
            or st2["cached_prompt_tokens"] >= st["media_tokens"]
    finally:
        d.stop()
    d = DaemonProcess(home, env={**env, "ASSISTANT_PLUGINS": ""})
    d.start()
    try:
        msgs = await messages_of(d, "n1")
        assert [p["type"] for p in msgs[0]["parts"]] == ["image", "audio", "text"]
        third = await ask(d, session="n1", prompt="Once more.", max_tokens=4, temperature=0)
        assert third["stats"]["media"] == "native" and third["stats"]["media_tokens"] == st["media_tokens"]
        async with await d.client() as c:
            exported = await c.call("sessions.export", {"id": "n1"})
        assert len(exported["media"]) == 2 and all(f["path"] for f in exported["media"])
    finally:
        d.stop()


@pytest.mark.timeout(600)
async def test_native_media_on_mlx(tmp_path):
    """The same parts through the daemon on MLX (mlx-vlm's Gemma 4 towers, tiny and random)."""
    pytest.importorskip("mlx.core", reason="MLX is not installed")
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed")
    import mlx_gemma4_media_files as mg4m
    folder = mg4m.write_media_target(tmp_path / "g4mlx")
    home = tmp_path / "mlx"
    home.mkdir()
    cfg = {"threads": 2, "context": 1024, "preload": False, "model": "g4mlx",
           "models": {"g4mlx": {"path": str(folder), "backend": "mlx", "speculative": {"drafter": "off"}}}}
    env = {**isolated_env(home), "ASSISTANT_PLUGINS": ""}
    d = DaemonProcess(home, config_text=yaml.safe_dump(cfg), env=env)
    d.start()
    png = text_png(tmp_path / "img.png", "Hi", size=24)
    wav = tone_wav(tmp_path / "one.wav", 1.0)
    try:
        plain = await ask(d, session="m0", prompt="Describe.", max_tokens=4, temperature=0)
        first = await ask(d, session="m1", prompt=[{"type": "image", "path": str(png)},
                                                   {"type": "audio", "path": str(wav)},
                                                   {"type": "text", "text": "Describe."}], max_tokens=4,
                          temperature=0)
        st = first["stats"]
        assert st["backend"] == "mlx" and st["media"] == "native", st
        assert st["media_tokens"] > 0 and st.get("media_encode_ms") is not None
        assert st["prompt_tokens"] - plain["stats"]["prompt_tokens"] >= st["media_tokens"]
        second = await ask(d, session="m1", prompt="And again?", max_tokens=4, temperature=0)
        st2 = second["stats"]
        assert st2["media"] == "native" and "media_encode_ms" not in st2  # the cache held them
        assert st2["media_tokens"] == st["media_tokens"] and st2["cached_prompt_tokens"] >= st["media_tokens"]
    finally:
        d.stop()


def test_wire_errors_carry_the_part():
    exc = checks.refuse(ErrorCode.MEDIA_INVALID, "messages[0].content[1]", "bad")
    assert json.loads(json.dumps(exc.to_dict())) == {"code": -32050, "message": "messages[0].content[1]: bad",
                                                     "data": {"part": "messages[0].content[1]"}}
