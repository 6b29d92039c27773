"""The TUI's attachments as content parts: the checks before sending, the path the
line above the input predicts (read by the model, OCR text, transcript, refused),
the parts the chat request carries, the path the reply's ``stats.media`` says
ran, and a refused message keeping its attachment. Driven by Textual's Pilot
against ``tui_fake.FakeClient`` (its ``modalities`` and skills decide native or
fallback, as the daemon does); the real daemon's side is in test_cli_media.py."""

from __future__ import annotations

import asyncio
import os
import wave
from pathlib import Path
from typing import Any, Callable

import pytest

from assistant.tui import attachments
from assistant.tui.app import AssistantApp
from assistant.tui.attachments import AttachmentError
from assistant.tui.screens.attach_flow import attach_path
from assistant.tui.screens.dialogs import InputDialog
from assistant.tui.widgets.chat import ChatInput, ChatView, MessageView
from tui_fake import SKILLS, FakeClient, demo_sessions

SIZE = (120, 36)
OCR = {"name": "vision.ocr", "description": "Read the text in an image.", "plugin": "vision",
       "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}
TRANSCRIBE = {"name": "audio.transcribe", "description": "Transcribe speech.", "plugin": "audio",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}


def png(path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (16, 16), "red").save(path)
    return path


def wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    return path


def make_app(tmp_path: Path, **fake_kwargs: Any) -> AssistantApp:
    fake = FakeClient(**fake_kwargs)

    async def factory(on_starting, start):
        return fake

    app = AssistantApp(client_factory=factory, history_file=None, cwd=tmp_path)
    app.fake = fake
    return app


async def until(pilot, cond: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def ready(pilot) -> None:
    await until(pilot, lambda: pilot.app.connected_once.is_set(), "the TUI to connect")
    await pilot.pause()


def attachment_line(app) -> str:
    return str(app.chat_screen.query_one("#attachment").render())


async def send(pilot, text: str) -> None:
    app = pilot.app
    before = chats(app)
    app.query_one(ChatInput).focus()
    app.query_one(ChatInput).text = text
    await pilot.press("enter")
    await until(pilot, lambda: chats(app) > before and not app.chat_screen.busy, "the reply")
    await pilot.pause()


def chats(app) -> int:
    return sum(1 for m, _ in app.fake.calls if m == "chat")


def last_chat(app) -> dict[str, Any]:
    return [p for m, p in app.fake.calls if m == "chat"][-1]


def user_views(app):
    return [v for v in app.query_one(ChatView).messages() if v.role == "user"]


# -- in the app ------------------------------------------------------------------------------------


async def test_image_goes_as_a_part_and_the_model_reads_it(tmp_path):
    image = png(tmp_path / "cat.png")
    app = make_app(tmp_path, modalities=["text", "image"], sessions={})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        # Through the dialog: a missing file is refused in the dialog, a relative path is taken from cwd.
        await pilot.press("ctrl+o")
        await until(pilot, lambda: isinstance(app.screen, InputDialog), "the attach dialog")
        await pilot.press(*"nothere.png", "enter")
        assert isinstance(app.screen, InputDialog)
        assert f"No such file: {tmp_path / 'nothere.png'}" in str(app.screen.query_one("#dialog-error").render())
        app.screen.query_one("Input").value = "cat.png"
        await pilot.press("enter")
        await until(pilot, lambda: app.chat_screen.attachment is not None, "the attachment")
        assert "image cat.png (read by the model)" in attachment_line(app)
        await send(pilot, "What is in this picture?")
        params = last_chat(app)
        assert params["prompt"] == [{"type": "image", "path": str(image), "name": "cat.png"},
                                    {"type": "text", "text": "What is in this picture?"}]
        view = user_views(app)[-1]
        assert view.note == "image: read by the model"
        assert view.text == "What is in this picture?\n[image cat.png]"
        assert app.chat_screen.attachments == []
        assert "Attached" not in attachment_line(app)
        # The session keeps the text and the parts (stored form: sha256, no path).
        sid = app.chat_screen.session["id"]
        message = app.fake.sessions[sid]["messages"][0]
        assert message["content"] == "What is in this picture?"
        stored = message["parts"]
        assert stored[0]["type"] == "image" and stored[0]["name"] == "cat.png" and "path" not in stored[0]


async def test_fallbacks_are_predicted_and_reported(tmp_path):
    """A text-only model: the line says OCR and transcript before sending, the notes after."""
    image, sound = png(tmp_path / "scan.png"), wav(tmp_path / "memo.wav")
    app = make_app(tmp_path, modalities=["text"], skills=[*SKILLS, OCR, TRANSCRIBE], sessions={})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await until(pilot, lambda: app.loaded_info, "models.list")
        assert attach_path(app.chat_screen, str(image)) is None
        assert attach_path(app.chat_screen, "memo.wav") is None
        line = attachment_line(app)
        assert "image scan.png (OCR text by vision.ocr (the model cannot see images))" in line
        assert "audio memo.wav (transcript by audio.transcribe (the model cannot hear audio))" in line
        assert "removes the last" in line
        await send(pilot, "Summarise both.")
        prompt = last_chat(app)["prompt"]
        assert [p["type"] for p in prompt] == ["image", "audio", "text"]
        assert prompt[1] == {"type": "audio", "path": str(sound), "name": "memo.wav"}
        assert user_views(app)[-1].note == "image: OCR text · audio: transcript"
        # An attachment alone, without words: only the media part goes.
        assert attach_path(app.chat_screen, str(image)) is None
        await send(pilot, "")
        assert last_chat(app)["prompt"] == [{"type": "image", "path": str(image), "name": "scan.png"}]


async def test_refused_media_keeps_the_attachment_and_the_words(tmp_path):
    """No native support and no fallback skill: the daemon's MEDIA_UNSUPPORTED is shown in the
    chat, the attachment and the text wait to be sent again, and the cancel key removes it."""
    sound = wav(tmp_path / "memo.wav")
    app = make_app(tmp_path, modalities=["text"], sessions={})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        await until(pilot, lambda: app.loaded_info, "models.list")
        assert attach_path(app.chat_screen, str(sound)) is None
        assert ("the model cannot hear audio and no audio.transcribe skill is installed: the daemon will refuse it"
                in attachment_line(app))
        await send(pilot, "Transcribe this.")
        errors = [v for v in app.query_one(ChatView).messages() if v.role == "error"]
        assert errors and "no audio.transcribe skill is installed" in errors[-1].text
        assert "The attachment is kept" in errors[-1].text
        assert [a.path for a in app.chat_screen.attachments] == [sound]
        assert app.query_one(ChatInput).text == "Transcribe this."
        assert user_views(app)[-1].note == "not sent"
        assert not [v for v in app.query_one(ChatView).messages() if v.role == "assistant"]
        # Now the daemon has a transcriber: the same message goes through.
        app.fake.skills = [*SKILLS, TRANSCRIBE]
        await send(pilot, app.query_one(ChatInput).text)
        assert not app.chat_screen.attachments
        assert user_views(app)[-1].note == "audio: transcript"
        # Refused again, then removed with the cancel key.
        app.fake.skills = list(SKILLS)
        assert attach_path(app.chat_screen, str(sound)) is None
        await send(pilot, "Again.")
        assert app.chat_screen.attachments
        await pilot.press("escape")
        assert app.chat_screen.attachments == []
        assert "Attachment removed: audio memo.wav" in "\n".join(str(n.message) for n in app._notifications)


async def test_unknown_model_says_the_daemon_decides(tmp_path):
    """A daemon that does not say what the model takes: the line says both possibilities."""
    png(tmp_path / "cat.png")
    app = make_app(tmp_path, skills=[*SKILLS, OCR], sessions={})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        assert attach_path(app.chat_screen, "cat.png") is None
        assert "read by the model if it can, else OCR text by vision.ocr" in attachment_line(app)


async def test_checks_before_sending_are_clear_messages(tmp_path):
    app = make_app(tmp_path, sessions={})
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        screen = app.chat_screen
        assert attach_path(screen, str(tmp_path / "missing.png")) == f"No such file: {tmp_path / 'missing.png'}"
        assert attach_path(screen, str(tmp_path)).endswith("is a folder; attach a file.")
        (tmp_path / "empty.wav").write_bytes(b"")
        assert attach_path(screen, "empty.wav") == "empty.wav is empty; attach an image or audio file."
        (tmp_path / "notes.png").write_text("These are my notes, not a picture.\n")
        assert attach_path(screen, "notes.png") == "notes.png is named like an image file but holds text."
        (tmp_path / "notes.txt").write_text("hi")
        assert "is not an image or audio file" in attach_path(screen, "notes.txt")
        os.mkfifo(tmp_path / "pipe.wav")
        assert "is not a regular file" in attach_path(screen, "pipe.wav")
        if os.geteuid() != 0:  # root reads everything
            locked = png(tmp_path / "locked.png")
            locked.chmod(0)
            assert "permission denied" in attach_path(screen, str(locked))
        # The daemon's limit, when its initialize answer says one.
        app.fake.server_info["media"] = {"max_bytes": 20}
        big = png(tmp_path / "big.png")
        assert "the daemon takes files up to 20 B (media.max_bytes" in attach_path(screen, str(big))
        assert screen.attachments == []
        await pilot.pause()
        assert "No such file" in "\n".join(str(n.message) for n in app._notifications)


async def test_stored_parts_show_by_name_and_regenerate_sends_them_again(tmp_path):
    """A message as sessions.get gives it (text in content, media by sha256 in parts): the view
    names each medium, and regenerate sends the parts again, not only the text."""
    sessions = demo_sessions()
    parts = [{"type": "image", "sha256": "ab" * 32, "mime": "image/png", "name": "sign.png"},
             {"type": "audio", "sha256": "cd" * 32, "mime": "audio/wav"},
             {"type": "text", "text": "What does this say?"}]
    sessions["s-python"]["messages"][0].update(content="What does this say?", parts=parts)
    app = make_app(tmp_path, sessions=sessions, modalities=["text", "image", "audio"])
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        view = MessageView("user", parts)
        await app.query_one(ChatView).add(view)
        assert view.text == f"What does this say?\n[image sign.png] [audio {'cd' * 6}]"
        assert app.chat_screen.session["id"] == "s-python"
        before = chats(app)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: chats(app) > before and not app.chat_screen.busy, "the regenerated reply")
        assert last_chat(app)["prompt"] == parts
        assert user_views(app)[-1].note == "image: read by the model · audio: heard by the model"


# -- the pure functions ----------------------------------------------------------------------------


@pytest.mark.parametrize("head,kind", [
    (b"\x89PNG\r\n\x1a\n\0\0", "image"), (b"\xff\xd8\xff\xe0\0\x10JFIF", "image"), (b"GIF89a\x01\0", "image"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "image"), (b"RIFF\0\0\0\0WAVEfmt ", "audio"), (b"fLaC\0\0\0\x22", "audio"),
    (b"ID3\x04\0\0", "audio"), (b"\xff\xfb\x90\x64", "audio"), (b"OggS\0\x02", "audio"),
    (b"\0\0\0\x20ftypM4A \0\0", "audio"), (b"\0\0\0\x18ftypheic", "image"), (b"hello", None), (b"", None)])
def test_sniff(head, kind):
    assert attachments.sniff(head) == kind


def test_media_note_and_expected_path():
    assert attachments.media_note(["image"], "native") == "image: read by the model"
    assert attachments.media_note(["image"], "ocr") == "image: OCR text"
    assert attachments.media_note(["audio"], "transcript") == "audio: transcript"
    assert attachments.media_note(["image", "audio"], "native+transcript") == \
        "image: read by the model · audio: transcript"
    assert attachments.media_note(["image"], None) == ""
    skills = [OCR]
    assert attachments.expected_path("image", ["text", "image"], []) == "read by the model"
    assert attachments.expected_path("audio", ["text", "audio"], []) == "heard by the model"
    assert attachments.expected_path("image", ["text"], skills).startswith("OCR text by vision.ocr")
    assert "daemon will refuse it" in attachments.expected_path("audio", ["text"], skills)


def test_content_for_the_daemon(tmp_path):
    att = attachments.prepare(str(png(tmp_path / "a.png")))
    assert attachments.message_content("hi", []) == "hi"
    assert attachments.message_content("hi", [att]) == [
        {"type": "image", "path": str(tmp_path / "a.png"), "name": "a.png"}, {"type": "text", "text": "hi"}]
    assert attachments.message_content("  ", [att]) == [att.part()]
    # the kind comes from the bytes: a WAV named .png is audio
    fake = wav(tmp_path / "sound.png")
    assert attachments.prepare(str(fake)).kind == "audio"
    with pytest.raises(AttachmentError, match="Give the path"):
        attachments.prepare("  ")
