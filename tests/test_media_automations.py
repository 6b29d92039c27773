"""The media automations documented in docs/automations.md, run end to end: the rules
are read from the document itself, real files land in real folders, the real watcher
sees them, and the real Whisper and OCR models write the sidecars.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from assistant.testing import DaemonProcess, isolated_env
from media_files import spoken_wav, text_png, truncated
from plugins.filewatch.actions import ActionError, _field
from plugins.filewatch.rules import RuleError, parse_rule

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[1] / "docs" / "automations.md"
MARKER = "<!-- media-rules:"


def documented_rules() -> list[dict]:
    """The YAML block that follows the media-rules marker in docs/automations.md."""
    text = DOC.read_text()
    assert MARKER in text, "docs/automations.md lost its media rules"
    block = re.search(r"```yaml\n(.*?)```", text[text.index(MARKER):], re.S)
    return yaml.safe_load(block.group(1))["plugins"]["filewatch"]["rules"]


async def runs_of(client, rule_id: str) -> list[dict]:
    return (await client.call("automations.log", {"id": rule_id, "limit": 100}))["runs"]


async def wait_for_run(client, rule_id: str, path: Path, timeout: float = 90) -> dict:
    """The first finished run of the rule on ``path`` (not skipped)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for run in await runs_of(client, rule_id):
            if run["path"] == str(path) and run["status"] not in ("running", "skipped"):
                return run
        await asyncio.sleep(0.2)
    raise AssertionError(f"no run of {rule_id} on {path}: {await runs_of(client, rule_id)}")


def drop(src: Path, folder: Path) -> Path:
    """Move a finished file into a watched folder in one step, as a recorder or scanner app does."""
    target = folder / src.name
    os.replace(src, target)
    return target


@pytest.fixture
def media_daemon(tmp_path):
    recordings, scans, staging = tmp_path / "Recordings", tmp_path / "Scans", tmp_path / "staging"
    for folder in (recordings, scans, staging):
        folder.mkdir()
    rules = documented_rules()
    assert [r["id"] for r in rules] == ["transcribe-recordings", "ocr-scans"]
    rules[0]["trigger"]["paths"] = [str(recordings)]
    rules[1]["trigger"]["paths"] = [str(scans)]
    home = tmp_path / "home"
    home.mkdir()
    env = {**isolated_env(home), "ASSISTANT_PLUGINS": "filewatch,audio,vision"}
    config = {"preload": False, "threads": 2, "plugins": {"filewatch": {"rules": rules}}}
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env=env).start()
    yield d, recordings, scans, staging
    d.stop()
    shutil.rmtree(env["XDG_RUNTIME_DIR"], ignore_errors=True)


async def test_recordings_get_transcripts_and_scans_get_their_text(media_daemon):
    d, recordings, scans, staging = media_daemon
    async with await d.client() as c:
        sub = await c.call("events.subscribe", {"types": ["daemon.started"]})
        if not sub["recent"]:
            for _ in range(300):  # every plugin's startup (filewatch's watcher) has run
                if (await c.call("events.subscribe", {"types": ["daemon.started"]}))["recent"]:
                    break
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the watcher arms after startup

        # A recording: its transcript lands next to it.
        wav = drop(spoken_wav(staging / "meeting.wav", "The budget meeting moves to Thursday in room four."),
                   recordings)
        run = await wait_for_run(c, "transcribe-recordings", wav)
        assert run["status"] == "ok", run
        transcript = (recordings / "meeting.txt").read_text().lower()
        assert "budget" in transcript and "thursday" in transcript, transcript
        skill, write = run["actions"]
        assert skill["input"] == {"skill": "audio.transcribe", "arguments": {"path": str(wav)}}
        assert write["output"] == str(recordings / "meeting.txt")

        # A scan: its text lands next to it.
        page = drop(text_png(staging / "page-1.png", "Invoice 4471\nTotal due 318 euros", size=48), scans)
        run = await wait_for_run(c, "ocr-scans", page)
        assert run["status"] == "ok", run
        text = (scans / "page-1.ocr.txt").read_text().lower()
        assert "4471" in text and "total" in text and "euros" in text, text

        # Broken files: the run fails with the skill's message, no sidecar, the watcher goes on.
        cut = drop(truncated(text_png(staging / "cut.png", "Cut short page", size=48), 0.5), scans)
        run = await wait_for_run(c, "ocr-scans", cut)
        assert run["status"] == "error" and "truncated" in run["error"], run
        assert not (scans / "cut.ocr.txt").exists()
        fake = staging / "notes.wav"
        fake.write_text("not a recording at all\n" * 10)
        fake = drop(fake, recordings)
        run = await wait_for_run(c, "transcribe-recordings", fake)
        assert run["status"] == "error" and "not an audio file" in run["error"], run
        assert not (recordings / "notes.txt").exists()

        again = drop(text_png(staging / "page-2.png", "Second page arrives", size=48), scans)
        run = await wait_for_run(c, "ocr-scans", again)
        assert run["status"] == "ok" and "second" in (scans / "page-2.ocr.txt").read_text().lower(), run

        # The sidecars triggered nothing: every run is on a medium the test dropped.
        paths = {r["path"] for rid in ("transcribe-recordings", "ocr-scans") for r in await runs_of(c, rid)}
        assert paths == {str(wav), str(page), str(cut), str(fake), str(again)}, paths


# -- the two small filewatch features these rules use, without a daemon -----------------------


def test_the_documented_rules_load_and_read_no_file_content():
    for data in documented_rules():
        rule = parse_rule(data, "docs/automations.md")
        assert rule.actions[0].options["output"] == "text"
        # Their templates use neither {content} nor {diff}: a recording's bytes are never read as text.
        assert not rule.uses_content()
    summary = parse_rule({"id": "s", "trigger": {"paths": ["/w"]},
                          "actions": [{"prompt": "Summarize:\n\n{content}"}, {"write": "{dir}/{stem}.md"}]}, "x")
    assert summary.uses_content()
    diffed = parse_rule({"id": "d", "trigger": {"paths": ["/w"]},
                         "actions": [{"skill": "x.y", "arguments": {"change": "{diff}"}}]}, "x")
    assert diffed.uses_content()


def test_a_skill_action_output_key_picks_a_field_of_the_result():
    result = {"text": "hello", "segments": [{"start": 0.0, "text": "hello"}]}
    assert _field(result, "text", "audio.transcribe") == "hello"
    assert _field(result, "segments.0.start", "audio.transcribe") == 0.0
    with pytest.raises(ActionError, match="its result has no 'txt' \\(it has text, segments\\)"):
        _field(result, "txt", "audio.transcribe")
    with pytest.raises(RuleError, match="output"):
        parse_rule({"id": "bad", "trigger": {"paths": ["/w"]},
                    "actions": [{"skill": "vision.ocr", "arguments": {"path": "{path}"}, "output": 3}]}, "x")
