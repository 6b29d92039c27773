"""Media over the HTTP API: OpenAI's ``image_url`` / ``input_audio`` parts, Ollama's ``images``.

A real daemon serving HTTP on loopback, with the echo backend and the fake fallback
skills of tests/test_media_daemon.py (the reply is the text the model was given, so a
test sees the fallback's marked text arrive). Over HTTP media come inline only: a
path, a ``file:`` or an ``http(s):`` URL is a 400, and bad bytes are the chat path's
errors as HTTP statuses.
"""

from __future__ import annotations

import base64
import socket

import httpx
import pytest
import yaml

from assistant.testing import DaemonProcess, isolated_env
from media_files import text_png, tone_wav
from test_media_daemon import ECHO_BACKEND, FAKE_FALLBACKS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(home, *, fallbacks: bool) -> tuple[DaemonProcess, str]:
    plugin_dir = home / "plugins"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "echo_backend.py").write_text(ECHO_BACKEND)
    names = ["echo_backend"]
    if fallbacks:
        (plugin_dir / "fakemedia.py").write_text(FAKE_FALLBACKS)
        names.append("fakemedia")
    fake = home / "echo.bin"
    fake.write_bytes(b"echo")
    port = _free_port()
    cfg = {"threads": 2, "preload": True, "model": "echo", "http": {"listen": f"127.0.0.1:{port}"},
           "models": {"echo": {"path": str(fake), "backend": "echo", "speculative": {"drafter": "off"}}}}
    env = {**isolated_env(home), "ASSISTANT_PLUGIN_DIR": str(plugin_dir), "ASSISTANT_PLUGINS": ",".join(names)}
    d = DaemonProcess(home, config_text=yaml.safe_dump(cfg), env=env)
    d.start()
    return d, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    d, base = _start(tmp_path_factory.mktemp("http-media"), fallbacks=True)
    yield d, base
    d.stop()


@pytest.fixture(scope="module")
def bare_api(tmp_path_factory):
    d, base = _start(tmp_path_factory.mktemp("http-bare"), fallbacks=False)
    yield d, base
    d.stop()


@pytest.fixture(scope="module")
def png_b64(tmp_path_factory):
    path = text_png(tmp_path_factory.mktemp("png") / "p.png", "Hello")
    return base64.b64encode(path.read_bytes()).decode(), path.stat().st_size


@pytest.fixture(scope="module")
def wav_b64(tmp_path_factory):
    path = tone_wav(tmp_path_factory.mktemp("wav") / "w.wav", 0.5)
    return base64.b64encode(path.read_bytes()).decode()


def post(base: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{base}{path}", json=body, timeout=60, **kw)


def test_openai_image_url_and_input_audio(api, png_b64, wav_b64):
    _d, base = api
    data, size = png_b64
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Read:"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
        {"type": "input_audio", "input_audio": {"data": wav_b64, "format": "wav"}}]}]})
    assert r.status_code == 200, r.text
    body = r.json()
    text = body["choices"][0]["message"]["content"]
    assert text.startswith("ECHO: Read:\n[Image ")
    assert f"text read by OCR: OCR#1 {size} bytes]" in text and "— transcript: SPOKEN#" in text
    assert body["x_assistant"]["stats"]["media"] == "ocr+transcript"


def test_openai_session_keeps_the_new_turns_media(api, png_b64):
    d, base = api
    data, _size = png_b64
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}},
                                     {"type": "text", "text": "what?"}]}]}, headers={"X-Session-Id": "web"})
    assert r.status_code == 200, r.text

    async def stored():
        async with await d.client() as c:
            return await c.call("sessions.get", {"id": "web"})
    import asyncio
    sess = asyncio.run(stored())
    assert sess["system_prompt"] == "be brief"
    parts = sess["messages"][0]["parts"]
    assert [p["type"] for p in parts] == ["image", "text"] and parts[0]["mime"] == "image/png"


@pytest.mark.parametrize("part, words", [
    ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "file: URLs are not taken over HTTP"),
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, "does not fetch URLs"),
    ({"type": "image_url", "image_url": {"url": "/etc/passwd"}}, "file paths are not taken over HTTP"),
    ({"type": "image", "path": "/etc/passwd"}, "file paths are not taken over HTTP"),
    ({"type": "image", "sha256": "0" * 64, "mime": "image/png"}, "only over the daemon's socket"),
])
def test_openai_refuses_paths_and_urls(api, part, words):
    _d, base = api
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": [part]}]})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_openai_media_only_in_user_messages(api, png_b64):
    _d, base = api
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,"
                                                                                      f"{png_b64[0]}"}}]},
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "only a user's message" in r.json()["error"]["message"]


def test_ollama_images(api, png_b64):
    _d, base = api
    data, size = png_b64
    r = post(base, "/api/chat", {"model": "echo", "stream": False,
                                 "messages": [{"role": "user", "content": "look", "images": [data]}]})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["content"].endswith(f"text read by OCR: OCR#1 {size} bytes]\nlook")
    assert r.json()["x_assistant"]["stats"]["media"] == "ocr"
    r = post(base, "/api/generate", {"model": "echo", "stream": False, "prompt": "and this", "images": [data]})
    assert r.status_code == 200, r.text
    assert "text read by OCR" in r.json()["response"] and r.json()["response"].endswith("\nand this")
    for bad in ("/home/me/cat.png", "~/cat.png", "file:///etc/passwd", "https://example.com/a.png"):
        r = post(base, "/api/chat", {"model": "echo", "stream": False,
                                     "messages": [{"role": "user", "content": "x", "images": [bad]}]})
        assert r.status_code == 400 and "images must be base64 data" in r.json()["error"], (bad, r.text)


def test_bad_media_bytes_are_client_errors(api):
    _d, base = api
    bad = base64.b64encode(b"plain text, not an image").decode()
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bad}"}}]}]})
    assert r.status_code == 400 and "it is text" in r.json()["error"]["message"], r.text
    r = post(base, "/api/chat", {"model": "echo", "stream": False,
                                 "messages": [{"role": "user", "content": "x", "images": ["iVBOR!!!"]}]})
    assert r.status_code == 400 and "base64" in r.json()["error"], r.text
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": "ping"}]})
    assert r.status_code == 200  # and it keeps serving


def test_media_unsupported_is_a_400(bare_api, png_b64):
    _d, base = bare_api
    r = post(base, "/v1/chat/completions", {"model": "echo", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png_b64[0]}"}}]}]})
    assert r.status_code == 400 and "cannot take images" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "media_unsupported"
