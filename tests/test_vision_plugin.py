"""The vision plugin (plugins/vision): OCR with RapidOCR's real PP-OCRv4 models on images
the tests render with Pillow, through a real daemon; every bad image is a clear error
and the daemon goes on serving.

One daemon serves the whole module, so the OCR models load once.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil

import pytest
import yaml

from assistant.protocol import ErrorCode, RPCError
from assistant.testing import DaemonProcess, isolated_env, run_cli
from media_files import animated_gif, bomb_png, text_png, truncated
from plugins.vision import images, ocr, settings_of

pytestmark = pytest.mark.slow

SENTENCE = "The quick brown fox jumps\nover the lazy dog near\nthe river bank at noon"


@pytest.fixture(scope="module")
def vision_daemon(tmp_path_factory):
    home = tmp_path_factory.mktemp("vision-daemon")
    env = {**isolated_env(home), "ASSISTANT_PLUGINS": "vision"}
    config = {"preload": False, "threads": 2, "plugins": {"vision": {"threads": 2, "max_pixels": 20_000_000}}}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env=env).start()
    yield d
    d.stop()
    shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)


async def call(d: DaemonProcess, name: str, **arguments):
    async with await d.client() as c:
        return (await c.call("skills.call", {"name": name, "arguments": arguments}))["result"]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def found_share(expected: str, got: str) -> float:
    """The share of the expected words OCR found (OCR may miss or garble one)."""
    want, have = words(expected), set(words(got))
    return sum(w in have for w in want) / len(want)


async def test_ocr_reads_the_text_rendered_into_an_image(vision_daemon, tmp_path):
    page = text_png(tmp_path / "page.png", SENTENCE, size=48)
    result = await call(vision_daemon, "vision.ocr", path=str(page))
    assert found_share(SENTENCE, result["text"]) >= 0.8, result["text"]
    # Rows come back in reading order, one per printed line.
    rows = result["text"].lower().splitlines()
    assert len(rows) == 3 and "fox" in rows[0] and "lazy" in rows[1] and "river" in rows[2], rows
    from PIL import Image

    with Image.open(page) as im:
        assert (result["width"], result["height"]) == im.size
    assert result["format"] == "PNG" and result["frames"] == 1 and result["notes"] == []
    for line in result["lines"]:
        assert len(line["box"]) == 4 and 0 < line["score"] <= 1
        assert all(-2 <= x <= result["width"] + 2 and -2 <= y <= result["height"] + 2 for x, y in line["box"])


async def test_an_animated_gif_gives_its_first_frame_and_says_so(vision_daemon, tmp_path):
    gif = animated_gif(tmp_path / "anim.gif", ["Alpha frame words", "Omega second frame"])
    result = await call(vision_daemon, "vision.ocr", path=str(gif))
    assert result["frames"] == 2 and result["format"] == "GIF"
    assert any("first frame" in note for note in result["notes"]), result["notes"]
    assert "alpha" in result["text"].lower() and "omega" not in result["text"].lower(), result["text"]


async def test_transparent_text_is_read_on_white(vision_daemon, tmp_path):
    # Dark text on a fully transparent background: converted naively it is black on black.
    from PIL import Image

    text_png(tmp_path / "opaque.png", "Transparent background text", size=48)
    with Image.open(tmp_path / "opaque.png") as im:
        grey = im.convert("L")
    rgba = Image.new("RGBA", grey.size, (0, 0, 0, 0))
    rgba.putalpha(grey.point(lambda v: 255 - v))  # opaque where the text is, transparent elsewhere
    rgba.save(tmp_path / "clear.png")
    result = await call(vision_daemon, "vision.ocr", path=str(tmp_path / "clear.png"))
    assert found_share("Transparent background text", result["text"]) >= 0.6, result["text"]


def _truncated_png(tmp_path):
    return str(truncated(text_png(tmp_path / "cut.png", SENTENCE), 0.5))


def _truncated_jpeg(tmp_path):
    from PIL import Image

    text_png(tmp_path / "src.png", SENTENCE)
    with Image.open(tmp_path / "src.png") as im:
        im.save(tmp_path / "cut.jpg", quality=90)
    return str(truncated(tmp_path / "cut.jpg", 0.4))


def _text_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("these are notes, not an image\n")
    return str(tmp_path / "notes.png")


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _empty(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    return str(tmp_path / "empty.png")


BAD_IMAGES = [
    ("truncated PNG", _truncated_png, "truncated"),
    ("truncated JPEG", _truncated_jpeg, "truncated"),
    ("text named .png", _text_named_png, "not an image file"),
    ("30000x30000 PNG", lambda t: str(bomb_png(t / "bomb.png", 30000, 30000)), "refused before decoding"),
    ("5000x5000 PNG over max_pixels", lambda t: str(bomb_png(t / "big.png", 5000, 5000)), "max_pixels"),
    ("PostScript named .png", lambda t: _write(t / "page.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
     "not an image file"),  # Pillow would run Ghostscript on it
    ("empty file", _empty, "empty"),
    ("missing file", lambda t: str(t / "nowhere.png"), "no such file"),
    ("a directory", lambda t: str(t), "not a regular file"),
    ("a relative path", lambda t: "page.png", "absolute path"),
]


@pytest.mark.parametrize("make, expected", [(m, e) for _, m, e in BAD_IMAGES], ids=[n for n, _, _ in BAD_IMAGES])
async def test_a_bad_image_is_a_clear_error_and_the_daemon_keeps_serving(vision_daemon, tmp_path, make, expected):
    path = make(tmp_path)
    for skill in ("vision.ocr", "vision.describe"):
        with pytest.raises(RPCError) as err:
            await call(vision_daemon, skill, path=path)
        assert err.value.code == ErrorCode.INVALID_PARAMS, err.value
        assert expected in err.value.message and path in err.value.message, err.value.message
    # Still serving, and still reading images.
    good = text_png(tmp_path / "after.png", "still reading", size=48)
    assert "still" in (await call(vision_daemon, "vision.ocr", path=str(good)))["text"].lower()


async def test_describe_without_a_seeing_model_says_the_facts_and_the_text(vision_daemon, tmp_path):
    # The default model (SmolLM2) cannot see: describe falls back to the image's facts and its OCR text.
    page = text_png(tmp_path / "receipt.png", "Total due 42 euros", size=48)
    result = await call(vision_daemon, "vision.describe", path=str(page))
    assert result["method"] == "ocr"
    assert result["text"].startswith("A PNG image, ") and " pixels, in colour" in result["text"], result["text"]
    assert found_share("Total due 42 euros", result["text"]) >= 0.75, result["text"]
    assert result["notes"] and "OCR" in result["notes"][0]


async def test_ocr_runs_off_the_event_loop(vision_daemon, tmp_path):
    """While a page is being read, the daemon answers other requests (the OCR runs in a thread)."""
    page = text_png(tmp_path / "long.png", "\n".join(f"Line number {i} of a long page" for i in range(25)), 40)
    async with await vision_daemon.client() as c:
        reading = asyncio.ensure_future(c.call("skills.call", {"name": "vision.ocr",
                                                               "arguments": {"path": str(page)}}))
        await asyncio.sleep(0.3)  # the request is in
        async with await vision_daemon.client() as other:
            await other.call("status")
        answered_while_reading = not reading.done()
        result = (await reading)["result"]
    assert answered_while_reading
    assert found_share("Line number of a long page", result["text"]) == 1.0


def test_skills_call_vision_ocr_from_the_command_line(vision_daemon, tmp_path):
    page = text_png(tmp_path / "cli.png", "Command line reading", size=48)
    done = run_cli("skills", "call", "vision.ocr", json.dumps({"path": str(page)}), socket_path=vision_daemon.socket)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert found_share("Command line reading", result["text"]) >= 0.66, result
    bad = run_cli("skills", "call", "vision.ocr", json.dumps({"path": str(tmp_path / "gone.png")}),
                  socket_path=vision_daemon.socket)
    assert bad.returncode != 0 and "no such file" in bad.stderr, (bad.stdout, bad.stderr)


# -- the pieces, without a daemon ------------------------------------------------------------


def test_settings_are_checked_naming_the_key():
    assert settings_of(None)["threads"] == 2
    with pytest.raises(ValueError, match="plugins.vision.threads"):
        settings_of({"threads": 0})
    with pytest.raises(ValueError, match="plugins.vision.min_score"):
        settings_of({"min_score": 2})
    with pytest.raises(ValueError, match="plugins.vision.tresholds: unknown setting"):
        settings_of({"tresholds": 1})


def test_boxes_on_one_row_join_with_spaces_and_rows_with_newlines():
    def line(text, x, y, h=40):
        return ocr.Line(text, [[x, y], [x + 100, y], [x + 100, y + h], [x, y + h]], 0.9)

    lines = [line("second", 0, 100), line("world", 150, 3), line("hello", 0, 0), line("row", 120, 104)]
    assert ocr.join_lines(lines) == "hello world\nsecond row"


def test_facts_are_said_plainly():
    facts = images.ImageFacts("x.gif", "GIF", "image/gif", 640, 480, "P", 3, 20_480)
    assert facts.sentence() == ("A GIF image, 640 x 480 pixels, in colour (a palette), animated (3 frames; this "
                                "reads the first), 20 KB.")


def test_gif_frames_are_counted_without_decoding_them(tmp_path):
    from PIL import Image

    for n in (1, 3, 7):
        gif = animated_gif(tmp_path / f"g{n}.gif", [f"Frame {i}" for i in range(n)])
        with Image.open(gif) as im:
            assert images.gif_frames(gif.read_bytes()) == im.n_frames == n
    assert images.gif_frames(gif.read_bytes()[:200]) >= 1  # cut short: what is there, at least one
