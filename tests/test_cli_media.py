"""``assistant ask --image/--audio`` and ``assistant skills call vision.ocr`` through the
real command line and a real daemon: the parts the CLI sends (absolute paths, the
order given), its checks before connecting, the fallback path the reply reports
(a stand-in ``vision.ocr`` plugin here; the built-in RapidOCR one when it is
installed, on an image the test renders), and a medium nothing can read refused
with a clear error."""

from __future__ import annotations

import json
import os
import wave
from importlib import metadata
from pathlib import Path

import pytest

from assistant.testing import run_cli

pytestmark = pytest.mark.slow

# A stand-in for the built-in vision plugin: its vision.ocr logs each path it is given
# and answers with the file's size, so a test sees that the daemon called it, with what.
FAKE_OCR = '''
import json
from pathlib import Path
from assistant import hookimpl

LOG = Path({log!r})

def ocr(path):
    data = Path(path).read_bytes()
    with LOG.open("a") as f:
        f.write(path + "\\n")
    text = f"THE SIGN SAYS OPEN ({{len(data)}} bytes at {{path}})"
    return {{"text": text, "lines": [{{"text": text, "box": [[0, 0], [1, 0], [1, 1], [0, 1]], "score": 1.0}}],
            "width": 1, "height": 1}}

@hookimpl
def register_skills(register):
    register("vision.ocr", ocr, description="Read the text in an image (a test stand-in).", parameters={{
        "type": "object", "properties": {{"path": {{"type": "string"}}}}, "required": ["path"]}})
'''

GREEDY = {"generation": {"temperature": 0, "max_tokens": 8}}


def render_png(path: Path, text: str = "OPEN", size: tuple[int, int] = (64, 32)) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((4, 8), text, fill="black")
    img.save(path)
    return path


def write_wav(path: Path, seconds: float = 0.2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return path


def fake_ocr_plugin(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "ocr-calls.txt"
    plugin = tmp_path / "fake_ocr.py"
    plugin.write_text(FAKE_OCR.format(log=str(log)))
    return plugin, log


def cli(daemon, *args: str, cwd: Path, timeout: float = 300):
    return run_cli(*args, socket_path=daemon.socket, config=daemon.config, cwd=cwd, timeout=timeout)


# -- the CLI's own checks (no daemon: they come before connecting) ----------------------------------


def test_ask_media_paths_are_checked_before_connecting(tmp_path):
    sock = tmp_path / "none.sock"  # nothing listens here: a check that passed would say so
    r = run_cli("ask", "--no-start", "--image", "missing.png", "hi", socket_path=sock, cwd=tmp_path)
    assert r.returncode == 1 and "--image missing.png: no such file" in r.stderr
    r = run_cli("ask", "--no-start", "--audio", str(tmp_path), "hi", socket_path=sock, cwd=tmp_path)
    assert r.returncode == 1 and f"--audio {tmp_path}: a folder; give a file" in r.stderr
    os.mkfifo(tmp_path / "pipe.wav")
    r = run_cli("ask", "--no-start", "--audio", "pipe.wav", "hi", socket_path=sock, cwd=tmp_path)
    assert r.returncode == 1 and "--audio pipe.wav: not a regular file" in r.stderr
    # A good file gets as far as the connection.
    render_png(tmp_path / "ok.png")
    r = run_cli("ask", "--no-start", "--image", "ok.png", "hi", socket_path=sock, cwd=tmp_path)
    assert r.returncode == 1 and "no daemon is listening" in r.stderr


# -- through a real daemon ------------------------------------------------------------------------


async def test_ask_image_falls_back_to_ocr_and_says_so(assistant_daemon_factory, tmp_path):
    """SmolLM2 cannot see: the daemon has the image read by vision.ocr (the stand-in) and the
    reply says ``media: ocr``; the CLI sent an absolute path, taken from its own directory."""
    plugin, log = fake_ocr_plugin(tmp_path)
    daemon = assistant_daemon_factory(plugin_files=[plugin], plugins=["fake_ocr"], config=GREEDY)
    image = render_png(tmp_path / "sign.png")
    r = cli(daemon, "ask", "--json", "--session", "media", "--image", "sign.png", "What does the sign say?",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["stats"]["media"] == "ocr"
    assert result["finish_reason"] in ("stop", "length")
    assert log.read_text().strip(), "vision.ocr was not called"
    # The session keeps the message's text and its image (stored by hash, named as sent).
    async with await daemon.client() as c:
        data = await c.call("sessions.get", {"id": "media"})
    user = data["messages"][0]
    assert user["content"] == "What does the sign say?"
    media = [p for p in user["parts"] if p["type"] == "image"]
    assert len(media) == 1 and media[0]["name"] == "sign.png" and len(media[0]["sha256"]) == 64
    assert image.read_bytes()  # untouched
    # Without --json: the answer on stdout, which path the image took on stderr.
    r = cli(daemon, "ask", "--image", str(image), "And again?", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "[image: OCR text]" in r.stderr


async def test_ask_audio_nothing_can_hear_is_refused(assistant_daemon_factory, tmp_path):
    """No audio.transcribe skill and a text-only model: MEDIA_UNSUPPORTED, said plainly, exit 1,
    nothing stored; the daemon keeps serving."""
    plugin, _ = fake_ocr_plugin(tmp_path)
    daemon = assistant_daemon_factory(plugin_files=[plugin], plugins=["fake_ocr"], config=GREEDY)
    write_wav(tmp_path / "memo.wav")
    r = cli(daemon, "ask", "--session", "s1", "--audio", "memo.wav", "Transcribe this.", cwd=tmp_path)
    assert r.returncode == 1
    assert "audio" in r.stderr and "error:" in r.stderr and "Traceback" not in r.stderr
    async with await daemon.client() as c:
        try:
            messages = (await c.call("sessions.get", {"id": "s1"}))["messages"]
        except Exception:  # noqa: BLE001 - the session may not even exist: nothing was stored
            messages = []
        assert not [m for m in messages if m["role"] == "user"]
        assert (await c.call("status")) is not None


async def test_skills_call_takes_a_relative_path_from_here(assistant_daemon_factory, tmp_path):
    plugin, log = fake_ocr_plugin(tmp_path)
    daemon = assistant_daemon_factory(plugin_files=[plugin], plugins=["fake_ocr"])
    image = render_png(tmp_path / "scan.png")
    r = cli(daemon, "skills", "call", "vision.ocr", '{"path": "scan.png"}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["text"] == f"THE SIGN SAYS OPEN ({image.stat().st_size} bytes at {image})"
    assert log.read_text().splitlines() == [str(image)]
    r = cli(daemon, "skills", "call", "vision.ocr", '["scan.png"]', cwd=tmp_path)
    assert r.returncode == 1 and "arguments must be a JSON object, not list" in r.stderr
    r = cli(daemon, "skills", "call", "vision.ocr", '{"path": "nothere.png"}', cwd=tmp_path)
    assert r.returncode == 1 and "error:" in r.stderr and "Traceback" not in r.stderr


def _builtin_vision() -> bool:
    try:
        import rapidocr_onnxruntime  # noqa: F401
    except ImportError:
        return False
    return any(ep.name == "vision" for ep in metadata.entry_points(group="assistant.plugins"))


@pytest.mark.skipif(not _builtin_vision(), reason="the built-in vision plugin (RapidOCR) is not installed")
async def test_real_ocr_through_skills_call_and_ask(assistant_daemon_factory, tmp_path):
    """The built-in vision plugin reads a word the test renders, through `skills call` and as
    the fallback of `ask --image`."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (480, 120), "white")
    try:
        font = ImageFont.load_default(size=64)
    except TypeError:  # Pillow < 10.1: the bitmap font, too small for OCR to be sure
        pytest.skip("this Pillow has no scalable default font")
    ImageDraw.Draw(img).text((20, 20), "HELLO", fill="black", font=font)
    img.save(tmp_path / "hello.png")
    daemon = assistant_daemon_factory(plugins=["vision"], config=GREEDY)
    r = cli(daemon, "skills", "call", "vision.ocr", '{"path": "hello.png"}', cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "HELLO" in json.loads(r.stdout)["text"].upper()
    r = cli(daemon, "ask", "--json", "--image", "hello.png", "What does the image say?", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["stats"]["media"] == "ocr"
