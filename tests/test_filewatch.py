"""File-watching automations: real file events in temporary folders, a real
daemon, the real SmolLM2 model for prompt actions."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from assistant.testing import run_cli
from plugins.filewatch.rules import RuleError, load_rules, parse_rule

pytestmark = pytest.mark.slow


def config_with(rules: list[dict], **settings) -> str:
    return yaml.safe_dump({"threads": 2, "context": 2048, "preload": True,
                           "plugins": {"filewatch": {"rules": rules, **settings}}})


async def runs_of(client, rule_id: str) -> list[dict]:
    return (await client.call("automations.log", {"id": rule_id, "limit": 1000}))["runs"]


async def wait_runs(client, rule_id: str, n: int, timeout: float = 90, finished: bool = True) -> list[dict]:
    """Poll until the rule has at least n (finished) runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = await runs_of(client, rule_id)
        done = [r for r in runs if r["status"] != "running"] if finished else runs
        if len(done) >= n:
            return done
        await asyncio.sleep(0.2)
    raise AssertionError(f"rule {rule_id} did not reach {n} runs: {await runs_of(client, rule_id)}")


async def quiet(client, rule_id: str, seconds: float = 2.0) -> list[dict]:
    """Wait until the rule's run count has not changed for ``seconds`` and nothing runs."""
    last = None
    stable_since = time.monotonic()
    while True:
        runs = await runs_of(client, rule_id)
        sig = [(r["id"], r["status"]) for r in runs]
        if sig != last:
            last, stable_since = sig, time.monotonic()
        elif time.monotonic() - stable_since >= seconds and all(r["status"] != "running" for r in runs):
            return runs
        await asyncio.sleep(0.2)


def summary_rule(folder: Path, **extra) -> dict:
    return {
        "id": "summarize",
        "trigger": {"paths": [str(folder)], "globs": ["*.txt"], "debounce": 0.3},
        "actions": [
            {"prompt": "Summarize this text in one sentence:\n\n{content}", "max_tokens": 40},
            {"write": {"to": "{dir}/{stem}.summary.md"}},
        ],
        **extra,
    }


async def test_dropped_file_gets_its_sidecar_summary(daemon_factory, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = daemon_factory(config_text=config_with([summary_rule(inbox)])).start()
    async with await d.client() as c:
        await asyncio.sleep(1.5)  # the watcher arms after startup
        (inbox / "note.txt").write_text("The meeting moved to Thursday at 10am in room 4. Bring the budget draft.")
        runs = await wait_runs(c, "summarize", 1)
    run = runs[0]
    assert run["status"] == "ok", run
    sidecar = inbox / "note.summary.md"
    assert sidecar.exists() and sidecar.read_text().strip()
    prompt, write = run["actions"]
    assert prompt["type"] == "prompt" and "Thursday" in prompt["input"]
    assert prompt["stats"]["completion_tokens"] >= 1
    assert write["output"] == str(sidecar) and sidecar.read_text() == prompt["output"]
    assert run["events"][0]["kind"] == "added"
    # The sidecar (*.md) does not match the rule's glob, and is its own output anyway.
    assert not (inbox / "note.summary.summary.md").exists()


async def test_burst_of_500_writes_is_debounced(daemon_factory, tmp_path):
    folder = tmp_path / "burst"
    folder.mkdir()
    rule = {"id": "burst", "trigger": {"paths": [str(folder)], "debounce": 0.5},
            "actions": [{"emit": {"type": "test.burst", "message": "{name}"}}]}
    d = daemon_factory(config_text=config_with([rule])).start()
    target = folder / "log.txt"
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        for i in range(500):  # ~1.5 s of writes: many watcher batches, never a 0.5 s pause
            with open(target, "a") as f:
                f.write(f"line {i}\n")
            time.sleep(0.003)
        runs = await quiet(c, "burst", 2.0)
    # Bound: events closer together than the rule's debounce (0.5 s) coalesce
    # into one run per pause. This burst has no pause, so it makes one run; we
    # allow 2 in case the machine stalls the writer for over 0.5 s mid-burst.
    assert 1 <= len(runs) <= 2, [len(r["events"]) for r in runs]
    assert sum(len(r["events"]) for r in runs) >= 5  # the watcher saw many events; runs coalesced them


async def test_in_place_rewrite_does_not_trigger_itself(daemon_factory, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    rule = {"id": "rewrite", "trigger": {"paths": [str(folder)], "globs": ["*.txt"], "debounce": 0.3},
            "actions": [{"prompt": "Repeat this text exactly:\n\n{content}", "max_tokens": 40},
                        {"write": {"in_place": True}}]}
    d = daemon_factory(config_text=config_with([rule])).start()
    doc = folder / "doc.txt"
    original = "Hello world. This is a short document.\n"
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        doc.write_text(original)
        await wait_runs(c, "rewrite", 1)
        runs = await quiet(c, "rewrite", 3.0)
        listed = await c.call("automations.list")
    assert len(runs) == 1 and runs[0]["status"] == "ok"
    assert (folder / "doc.txt.bak").read_text() == original  # backup kept
    assert doc.read_text() == runs[0]["actions"][0]["output"]
    assert listed["counters"]["ignored_own_output"] >= 1
    # Rewrites use the prompt-lookup drafter by default.
    assert runs[0]["actions"][0]["stats"].get("drafter", "ngram") in ("ngram", None)


async def test_dry_run_changes_nothing_but_is_traced(daemon_factory, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = daemon_factory(config_text=config_with([summary_rule(inbox, dry_run=True)])).start()
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        (inbox / "a.txt").write_text("some text")
        runs = await wait_runs(c, "summarize", 1)
    assert runs[0]["status"] == "dry_run"
    assert [a["output"] for a in runs[0]["actions"]] == ["(dry run: not done)"] * 2
    assert runs[0]["actions"][1]["input"]["to"] == str(inbox / "a.summary.md")
    assert sorted(p.name for p in inbox.iterdir()) == ["a.txt"]


async def test_failed_condition_does_not_run_the_actions(daemon_factory, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rule = summary_rule(inbox, conditions={"max_size": 10})
    d = daemon_factory(config_text=config_with([rule])).start()
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        (inbox / "big.txt").write_text("x" * 100)
        runs = await wait_runs(c, "summarize", 1)
    assert runs[0]["status"] == "skipped" and runs[0]["actions"] == []
    assert runs[0]["conditions"] == [{"condition": "size", "ok": False, "detail": "100 bytes (allowed 0..10)"}]
    assert not (inbox / "big.summary.md").exists()


async def test_deleted_and_recreated_folder_keeps_working(daemon_factory, tmp_path):
    folder = tmp_path / "watched"
    folder.mkdir()
    rule = {"id": "echo", "trigger": {"paths": [str(folder)], "debounce": 0.2},
            "actions": [{"emit": "{name}"}]}
    d = daemon_factory(config_text=config_with([rule])).start()
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        (folder / "one.txt").write_text("1")
        await wait_runs(c, "echo", 1)
        shutil.rmtree(folder)
        await asyncio.sleep(1.5)
        folder.mkdir()
        await asyncio.sleep(2.5)  # the supervisor notices within a second and re-arms
        (folder / "two.txt").write_text("2")
        runs = await wait_runs(c, "echo", 2)
    assert {Path(r["path"]).name for r in runs} >= {"one.txt", "two.txt"}


async def test_failing_action_is_traced_and_the_watcher_goes_on(daemon_factory, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rule = {"id": "broken", "trigger": {"paths": [str(folder)], "debounce": 0.2},
            "actions": [{"skill": "no.such.skill", "arguments": {"file": "{path}"}}, {"emit": "never"}]}
    d = daemon_factory(config_text=config_with([rule])).start()
    async with await d.client() as c:
        await asyncio.sleep(1.5)
        (folder / "a.txt").write_text("a")
        await wait_runs(c, "broken", 1)
        (folder / "b.txt").write_text("b")
        runs = await wait_runs(c, "broken", 2)
    for run in runs:
        assert run["status"] == "error"
        assert "no.such.skill" in run["error"]
        assert len(run["actions"]) == 1 and run["actions"][0]["error"]
        assert run["actions"][0]["input"]["arguments"]["file"] == run["path"]


def test_automations_cli_test_list_enable_disable(daemon_factory, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    d = daemon_factory(config_text=config_with([summary_rule(inbox, enabled=False)])).start()
    # A test runs only on a file the rule watches (issue 14): the rule is disabled, so nothing else runs on it.
    doc = inbox / "cats.txt"
    doc.write_text("Cats sleep most of the day and hunt at night.")
    args = dict(socket_path=d.socket, config=d.config)
    out = run_cli("automations", "test", "summarize", str(doc), "--json", **args)
    assert out.returncode == 0, out.stderr
    trace = json.loads(out.stdout)
    assert trace["status"] == "ok" and trace["manual"] is True
    assert (inbox / "cats.summary.md").exists()

    listed = json.loads(run_cli("automations", "list", "--json", **args).stdout)
    assert listed["rules"][0]["enabled"] is False and listed["rules"][0]["last_run"]["id"] == trace["id"]
    assert run_cli("automations", "enable", "summarize", **args).stdout.strip() == "summarize: enabled"
    shown = json.loads(run_cli("automations", "show", "summarize", "--json", **args).stdout)
    assert shown["enabled"] is True and shown["runs"][0]["id"] == trace["id"]
    log = run_cli("automations", "log", "--json", **args)
    assert [r["id"] for r in json.loads(log.stdout)["runs"]] == [trace["id"]]
    bad = run_cli("automations", "show", "nope", **args)
    assert bad.returncode == 1 and "no automation rule 'nope'" in bad.stderr


def test_rule_errors_name_the_rule_and_the_key(tmp_path):
    good = summary_rule(tmp_path)
    cases = [
        ({**good, "trigger": {"paths": [str(tmp_path)], "events": ["changed"]}}, "trigger.events"),
        ({**good, "mode": "sometimes"}, "mode"),
        ({**good, "actions": [{"prompt": "x {nope}"}]}, "actions[0].prompt"),
        ({**good, "actions": [{"shell": "ls"}]}, "actions"),
        ({**good, "triger": {}}, "triger"),
        ({**good, "conditions": {"max_size": "big"}}, "conditions.max_size"),
    ]
    for data, key in cases:
        with pytest.raises(RuleError) as exc:
            parse_rule(data, "rules[0]")
        assert "'summarize'" in str(exc.value) and f": {key}:" in str(exc.value), str(exc.value)
    rules, errors = load_rules({"rules": [good, {**good, "mode": "x"}, {**good, "id": "second"}]})
    assert [r.id for r in rules] == ["summarize", "second"]
    assert len(errors) == 2 and "already used" in errors[0] or "mode" in errors[0]


def test_rule_matching():
    rule = parse_rule({"id": "r", "trigger": {"paths": ["/w"], "globs": ["*.md", "sub/*.txt"],
                                              "ignore": ["draft-*"], "recursive": True},
                       "actions": [{"emit": "x"}]}, "t")
    assert rule.matches("added", Path("/w/a.md"))
    assert rule.matches("modified", Path("/w/deep/er/a.md"))
    assert rule.matches("added", Path("/w/sub/b.txt")) and not rule.matches("added", Path("/w/b.txt"))
    assert not rule.matches("added", Path("/w/draft-a.md"))
    assert not rule.matches("added", Path("/w/.a.md.swp")) and not rule.matches("added", Path("/w/a.md~"))
    assert not rule.matches("deleted", Path("/w/a.md"))  # default events: added, modified
    assert not rule.matches("added", Path("/elsewhere/a.md"))


def scope_rule(folder: Path) -> dict:
    """A disabled rule (only manual tests run it) that rewrites *.txt in place, with a .bak."""
    return {"id": "rewrite", "enabled": False, "trigger": {"paths": [str(folder)], "globs": ["*.txt"]},
            "actions": [{"write": {"in_place": True, "content": "rewritten by {rule}"}}]}


async def test_manual_test_keeps_to_the_rule_scope(daemon_factory, tmp_path):
    """automations.test refuses any file the rule could not be triggered by: outside its
    folder, through `..`, through a symlink, or not matching its globs; nothing is written."""
    from assistant.protocol import ErrorCode, RPCError

    watched = tmp_path / "watched"
    watched.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (watched / "link.txt").symlink_to(outside)
    (watched / "notes.md").write_text("not a txt")
    text = {"threads": 2, "preload": False, "plugins": {"filewatch": {"rules": [scope_rule(watched)]}}}
    d = daemon_factory(config_text=yaml.safe_dump(text)).start()
    refused = [str(outside), str(watched / ".." / "outside.txt"), str(watched / "link.txt"),
               str(watched / "notes.md"), "/etc/hostname"]
    async with await d.client() as c:
        for path in refused:
            for dry in (None, True):
                with pytest.raises(RPCError) as info:
                    await c.call("automations.test", {"id": "rewrite", "path": path, "dry_run": dry})
                assert info.value.code == ErrorCode.INVALID_PARAMS, info.value.message
                assert "rewrite" in info.value.message and "path" in info.value.message
        runs = await runs_of(c, "rewrite")
    assert runs == []  # refused before anything ran, dry or not
    assert outside.read_text() == "keep me" and not (tmp_path / "outside.txt.bak").exists()
    assert sorted(p.name for p in watched.iterdir()) == ["link.txt", "notes.md"]
    assert "Traceback" not in d.stderr()


async def test_manual_test_runs_on_a_file_in_scope(daemon_factory, tmp_path):
    """In scope, also through a symlinked watched folder, the rule runs as its watcher would."""
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    doc = real / "sub" / "a.txt"
    doc.write_text("before")
    text = {"threads": 2, "preload": False, "plugins": {"filewatch": {"rules": [scope_rule(alias)]}}}
    d = daemon_factory(config_text=yaml.safe_dump(text)).start()
    async with await d.client() as c:
        dry = await c.call("automations.test", {"id": "rewrite", "path": str(doc), "dry_run": True})
        assert dry["status"] == "dry_run" and doc.read_text() == "before"
        assert dry["path"] == str(alias / "sub" / "a.txt")  # named under the trigger path, as events are
        done = await c.call("automations.test", {"id": "rewrite", "path": str(doc)})
    assert done["status"] == "ok", done
    assert doc.read_text() == "rewritten by rewrite" and (real / "sub" / "a.txt.bak").read_text() == "before"
