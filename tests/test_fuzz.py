"""Fuzz the daemon's protocol edge: thousands of seeded frames against a real daemon.

The generator makes random bytes, truncated frames, a wrong value for every
parameter of every core method, odd and invalid ids, deep nesting, invalid
UTF-8, over-limit lines and batches, and the runner pipelines them in random
chunks over several connections. Every frame knows what must come back (a
reply with its id, one with id null, an array, or nothing), so the suite
checks: no crash, every id answered exactly once, no reply that is not
strict JSON, no INTERNAL_ERROR, no traceback in the daemon's log, and a
``status`` answered after each batch of frames.

``ASSISTANT_FUZZ_SEED`` and ``ASSISTANT_FUZZ_FRAMES`` change the run (the
defaults keep it to well under a minute); a failure names the seed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from assistant.daemon.methods import all_methods
from assistant.protocol import ErrorCode
from test_server import strict_json

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ASSISTANT_FUZZ_SEED", "1414"))
FRAMES = int(os.environ.get("ASSISTANT_FUZZ_FRAMES", "6000"))
BATCHES = 10  # connections, each sent its share of the frames; a status after each
MAX_LINE = 64 * 1024  # the fuzzed daemon's max_line_bytes: over-limit lines stay cheap
DEEP = 100_000  # nesting no JSON parser follows
WAIT_TICKS = int(os.environ.get("ASSISTANT_FUZZ_WAIT_TICKS", "1200"))  # of 0.1 s: 120 s for the replies of a batch
SKIP_METHODS = {"shutdown"}  # it would end the run; tests/test_daemon.py covers it

# INTERNAL_ERRORs the fuzz has found in handlers and that are not fixed yet:
# (label prefix, message part, what it is). A run that finds only these is an
# xfail naming them; anything else fails. Empty: the one it found (a chat
# racing a sessions.delete) now answers SESSION_NOT_FOUND.
KNOWN_INTERNAL: list[tuple[str, str, str]] = []

# Methods that read parameters beyond their dataclass.
EXTRA_PARAMS = {"sessions.update": ["title", "model", "system", "settings"]}
# The other parameters a method gets while one is fuzzed: valid, cheap, and
# aimed so that whatever passes fails fast (no such model, one token).
BASE_PARAMS: dict[str, dict[str, Any]] = {
    "chat": {"prompt": "hi", "max_tokens": 1, "temperature": 0, "model": "no-such-model"},
    "models.load": {"model": "no-such-model"},
    "sessions.get": {"id": "fz"}, "sessions.update": {"id": "fz"}, "sessions.rewind": {"id": "fz", "message_id": 1},
    "sessions.export": {"id": "fz"},
    "skills.call": {"name": "no.such.skill", "arguments": {}},
    "initialize": {"protocol_version": 1, "client": "fuzz"},
}


def nest(depth: int, leaf: Any = 1) -> Any:
    for _ in range(depth):
        leaf = [leaf]
    return leaf


# Values for parameters, most of them wrong for most parameters. NaN and the
# infinities go out as the bare words (json.dumps writes them), "\ud800" as
# its escape. nest(70) is over the daemon's 64 levels; 10**4000 is under the
# 4,300 digits Python's int() takes.
POOL: list[Any] = [
    True, False, 0, -1, 1, 3, 1.5, -2.5, 2**31, 2**63, -(2**63) - 1, 10**30, 10**4000, 1e308,
    float("nan"), float("inf"), float("-inf"),
    "", "x", "é☃\u2028\U0001F600", "a" * 300, "../../../etc/hostname", "/dev/zero", "\x00\x01", "\ud800",
    [], [1], ["x"], ["*"], [[]], [{"a": 1}], [None], [float("nan")],
    {}, {"a": 1}, {"role": "user", "content": "hi"}, {"\ud800": 1}, nest(40), nest(70), nest(300),
]


# The share of chat frames that name the real model and so may generate (one
# token); the others stop at "no such model", after every check that comes first.
REAL_CHATS = 0.1


def too_costly(method: str, name: str, value: Any) -> bool:
    """Values that would be valid and expensive: a long generation, a huge context."""
    big = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value > 16
    return method == "chat" and name == "max_tokens" and big


def base_params(method: str, name: str, real: bool) -> dict[str, Any]:
    """The valid parameters that go with a fuzzed ``name``. A real chat (the default model)
    generates a token when the fuzzed value passes; ``keep_alive`` is never fuzzed on
    one, as its valid values unload the model and the next chat would reload it."""
    base = dict(BASE_PARAMS.get(method, {}))
    if method == "chat" and real and name != "keep_alive":
        del base["model"]
    drop = {name, "prompt"} if name == "messages" else {name}
    return {k: v for k, v in base.items() if k not in drop}


@dataclass
class Frame:
    """One line to send and what must come back for it."""

    data: bytes
    label: str
    ids: list[Any] = field(default_factory=list)  # replies with these ids (a single reply, or the array's)
    nulls: int = 0  # replies with id null
    array: bool = False  # the replies come as one array


def key(rid: Any) -> str:
    """A reply id as a dict key (1 and 1.0 are one JSON number, but ours never clash)."""
    return json.dumps(rid)


class Generator:
    """Seeded frames of every kind."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.n = 0

    def rid(self) -> Any:
        """A fresh, unique id of a random valid form."""
        self.n += 1
        form = self.rng.randrange(6)
        return [self.n, f"f{self.n}", self.n + 0.5, -self.n, 2**70 + self.n, f"☃ {self.n}"][form]

    def request(self, method: str, params: Any = None, *, rid: Any = None, notify: bool = False) -> dict:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        if not notify:
            msg["id"] = self.rid() if rid is None else rid
        return msg

    def framed(self, msg: Any, label: str) -> Frame:
        data = json.dumps(msg).encode() + b"\n"
        if isinstance(msg, dict) and "id" in msg:
            return Frame(data, label, ids=[msg["id"]])
        return Frame(data, label)  # a notification: nothing comes back

    # -- kinds of frame ----------------------------------------------------------

    def wrong_types(self) -> list[Frame]:
        """Every pool value for every parameter of every core method, the others valid."""
        frames = []
        for m in all_methods():
            if m.name in SKIP_METHODS:
                continue
            names = [f.name for f in dataclasses.fields(m.params)] if m.params else ["anything"]
            for name in names + EXTRA_PARAMS.get(m.name, []):
                for value in POOL:
                    if too_costly(m.name, name, value):
                        continue
                    params = base_params(m.name, name, self.rng.random() < REAL_CHATS)
                    params[name] = value
                    notify = self.rng.random() < 0.03
                    msg = self.request(m.name, params, notify=notify)
                    frames.append(self.framed(msg, f"{m.name} {name}={_short(value)}"))
            for params in ([], "x", 5, None):  # params that are not an object
                frames.append(self.framed(self.request(m.name, params), f"{m.name} params={params!r}"))
        return frames

    def random_bytes(self) -> Frame:
        while True:
            data = bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(1, 200))).replace(b"\n", b" ")
            if data.strip() and not _parses(data):
                return Frame(data + b"\n", "random bytes", nulls=1)

    def truncated(self, frame: Frame) -> Frame:
        line = frame.data[:-1]
        cut = self.rng.randrange(1, len(line))
        return Frame(line[:cut] + b"\n", f"truncated {frame.label}", nulls=1)

    def invalid_utf8(self) -> Frame:
        bad = self.rng.choice([b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80"])
        data = b'{"jsonrpc":"2.0","id":' + str(self.n).encode() + b',"method":"status","params":{"x":"a' + bad + b'"}}'
        return Frame(data + b"\n", f"invalid UTF-8 {bad!r}", nulls=1)

    def odd_id(self) -> Frame:
        """A cheap request with an odd but valid id, or one whose id cannot be taken."""
        good = [0, -0, "", "x" * 10_000, 10**40, 1e300, -1e-300, None, "\U0001F600", "\u2028"]
        bad = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"true", b"false", b"[]", b"{}", b"[1]", b'"\\udfff"']
        shape = self.rng.choice(["good", "bad", "bad-no-method", "no-jsonrpc", "method-not-str", "notify-bad-params"])
        if shape == "good":
            rid = self.rng.choice(good)
            data = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "status"}).encode() + b"\n"
            return Frame(data, f"id {_short(rid)}", ids=[] if rid is None else [rid], nulls=int(rid is None))
        if shape in ("bad", "bad-no-method"):
            rid = self.rng.choice(bad)
            body = b',"method":"status"' if shape == "bad" else b""
            return Frame(b'{"jsonrpc":"2.0","id":' + rid + body + b"}\n", f"id {rid.decode()}", nulls=1)
        rid = self.rid()
        if shape == "no-jsonrpc":
            return Frame(json.dumps({"id": rid, "method": "status"}).encode() + b"\n", "no jsonrpc", ids=[rid])
        if shape == "method-not-str":
            msg = {"jsonrpc": "2.0", "id": rid, "method": self.rng.choice([5, None, [], {}])}
            return Frame(json.dumps(msg).encode() + b"\n", "method not a string", ids=[rid])
        return self.framed(self.request("status", self.rng.choice([[], "x", 5]), notify=True), "notification, bad params")

    def deep(self) -> Frame:
        kind = self.rng.randrange(5)
        if kind == 0:
            return Frame(b"[" * DEEP + b"]" * DEEP + b"\n", "deep array", nulls=1)
        if kind == 1:
            return Frame(b'{"a":' * DEEP + b"1" + b"}" * DEEP + b"\n", "deep object", nulls=1)
        if kind == 2:
            return Frame(b"[" * self.rng.randrange(10, DEEP) + b"\n", "unclosed nesting", nulls=1)
        if kind == 3:  # deep inside the params of a request with an id: the id is lost with the parse
            rid = self.rid()
            head = json.dumps({"jsonrpc": "2.0", "id": rid, "method": "status"})[:-1].encode()
            return Frame(head + b',"params":{"x":' + b"[" * DEEP + b"]" * DEEP + b"}}\n", "deep params", nulls=1)
        rid = self.rid()  # parses, but over the daemon's 64 levels: refused with the id
        msg = self.request("sessions.create", {"settings": {"x": nest(self.rng.randrange(70, 400))}}, rid=rid)
        return self.framed(msg, "params over 64 levels")

    def huge_integer(self) -> Frame:
        digits = str(self.rng.randrange(1, 10)).encode() * self.rng.randrange(4400, 20_000)
        data = b'{"jsonrpc":"2.0","id":' + str(self.n).encode() + b',"method":"sessions.list","params":{"limit":'
        return Frame(data + digits + b"}}\n", "integer over 4,300 digits", nulls=1)

    def over_limit(self) -> Frame:
        size = self.rng.choice([MAX_LINE + 1, MAX_LINE + 2, MAX_LINE * 2, self.rng.randrange(MAX_LINE + 1, 3 * MAX_LINE)])
        head = json.dumps(self.request("status", {"pad": ""}))
        pad = size - len(head)
        return Frame(head.replace('"pad": ""', '"pad": "' + "x" * pad + '"').encode() + b"\n", "over-limit line",
                     nulls=1)

    def at_limit(self) -> Frame:
        msg = self.request("status", {"pad": ""})
        head = json.dumps(msg)
        line = head.replace('"pad": ""', '"pad": "' + "y" * (MAX_LINE - len(head)) + '"').encode()
        assert len(line) == MAX_LINE
        return Frame(line + b"\n", "line of exactly max_line_bytes", ids=[msg["id"]])

    def batch(self) -> Frame:
        """An array of cheap requests, notifications and things that are not requests."""
        if self.rng.random() < 0.1:
            return Frame(b"[]\n", "empty batch", nulls=1)
        items, ids, nulls = [], [], 0
        for _ in range(self.rng.randrange(1, 9)):
            kind = self.rng.randrange(5)
            if kind == 0:
                items.append(self.request(self.rng.choice(["status", "models.list", "sessions.list", "skills.list"])))
                ids.append(items[-1]["id"])
            elif kind == 1:
                items.append(self.request(self.rng.choice(["sessions.get", "no.such.method", "cancel"]),
                                          {"id": self.rng.choice(POOL[:20])}))
                ids.append(items[-1]["id"])
            elif kind == 2:
                items.append(self.request("status", notify=True))
            else:
                items.append(self.rng.choice([1, "x", None, [], [self.request("status", notify=True)], {"foo": 1}]))
                nulls += 1
        label = "batch of " + ", ".join(i.get("method", "?") if isinstance(i, dict) else _short(i) for i in items)
        return Frame(json.dumps(items).encode() + b"\n", label, ids=ids, nulls=nulls, array=bool(ids or nulls))

    # -- the whole run --------------------------------------------------------------

    def frames(self, total: int) -> list[Frame]:
        typed = self.wrong_types()
        out = list(typed)
        makers = [(self.random_bytes, 25), (lambda: self.truncated(self.rng.choice(typed)), 20),
                  (self.invalid_utf8, 8), (self.odd_id, 20), (self.deep, 3), (self.huge_integer, 2),
                  (self.over_limit, 1), (self.at_limit, 1), (self.batch, 12)]
        fns, weights = zip(*makers)
        while len(out) < total:
            out.append(self.rng.choices(fns, weights)[0]())
        self.rng.shuffle(out)
        return out


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or value == value else "NaN"
    return text if len(text) <= 40 else text[:37] + "..."


def _parses(data: bytes) -> bool:
    try:
        json.loads(data.decode("utf-8"))
        return True
    except (ValueError, RecursionError):
        return False


# -- running frames against the daemon ---------------------------------------------------


@dataclass
class Seen:
    """What came back on one connection."""

    singles: Counter = field(default_factory=Counter)  # id key -> replies
    arrays: list[list[dict]] = field(default_factory=list)
    internal: list[dict] = field(default_factory=list)  # INTERNAL_ERROR replies
    bad: list[str] = field(default_factory=list)  # lines that are not strict JSON-RPC

    def take(self, line: bytes) -> None:
        try:
            msg = strict_json(line)
        except (ValueError, RecursionError) as exc:
            self.bad.append(f"{exc}: {line[:200]!r}")
            return
        if isinstance(msg, list):
            for r in msg:
                self._check(r, line)
            self.arrays.append(msg)
        elif isinstance(msg, dict) and "method" in msg and "id" not in msg:
            return  # a notification: deltas of the chats, events
        else:
            self._check(msg, line)
            self.singles[key(msg.get("id"))] += 1

    def _check(self, r: Any, line: bytes) -> None:
        ok = isinstance(r, dict) and r.get("jsonrpc") == "2.0" and "id" in r and (("result" in r) != ("error" in r))
        if ok and "error" in r:
            err = r["error"]
            ok = isinstance(err, dict) and isinstance(err.get("code"), int) and isinstance(err.get("message"), str)
            if ok and err["code"] == ErrorCode.INTERNAL_ERROR:
                self.internal.append(r)
        if not ok:
            self.bad.append(f"not a JSON-RPC response: {line[:200]!r}")


def expected(frames: list[Frame]) -> tuple[Counter, int]:
    singles: Counter = Counter()
    arrays = 0
    for f in frames:
        if f.array:
            arrays += 1
        else:
            singles.update(key(i) for i in f.ids)
            singles[key(None)] += f.nulls
    return singles, arrays


async def run_connection(path, frames: list[Frame], rng: random.Random, tag: int, *,
                         initialize: bool) -> tuple[Seen, Counter, int]:
    """Send ``frames`` pipelined in random chunks on a new connection, collect every reply,
    then a status as the barrier. Returns what came back, and the single replies and
    arrays expected."""
    reader, writer = await asyncio.open_unix_connection(str(path), limit=64 * 1024 * 1024)
    seen = Seen()
    want, arrays = expected(frames)
    if initialize:
        frames = [Frame(json.dumps({"jsonrpc": "2.0", "id": f"init-{tag}", "method": "initialize",
                                    "params": {"client": "fuzz"}}).encode() + b"\n", "initialize",
                        ids=[f"init-{tag}"])] + frames
        want[key(f"init-{tag}")] += 1

    async def collect():
        while line := await reader.readline():
            seen.take(line)

    collector = asyncio.ensure_future(collect())
    try:
        stream = b"".join(f.data for f in frames)
        pos = 0
        while pos < len(stream):
            step = rng.choice([1, 7, 300, 4096, 65536, 1 << 20])
            try:
                writer.write(stream[pos:pos + step])
                await writer.drain()
            except ConnectionError as exc:
                seen.bad.append(f"the daemon closed the connection after {pos} of {len(stream)} bytes: {exc!r}")
                break
            pos += step
        for _ in range(WAIT_TICKS):  # every expected reply (bounded)
            if all(seen.singles[k] >= n for k, n in want.items()) and len(seen.arrays) >= arrays:
                break
            if collector.done():
                break
            await asyncio.sleep(0.1)
        barrier = f"barrier-{tag}"
        writer.write(json.dumps({"jsonrpc": "2.0", "id": barrier, "method": "status"}).encode() + b"\n")
        for _ in range(600):
            if seen.singles[key(barrier)] or collector.done():
                break
            await asyncio.sleep(0.1)
        want[key(barrier)] += 1
    finally:
        writer.close()
        collector.cancel()
    return seen, want, arrays


def compare(seen: Seen, want: Counter, want_arrays: int, frames: list[Frame]) -> list[str]:
    """What is wrong with the replies of one connection: missing, extra, malformed."""
    problems = list(seen.bad)
    for k in set(want) | set(seen.singles):
        if seen.singles[k] != want[k]:
            label = next((f.label for f in frames if any(key(i) == k for i in f.ids)), "?")
            problems.append(f"id {k}: {seen.singles[k]} replies, expected {want[k]} ({label})")
    by_id = {key(i): f for f in frames if f.array for i in f.ids}
    all_null = [f for f in frames if f.array and not f.ids]
    for arr in seen.arrays:
        ids = [r.get("id") for r in arr if isinstance(r, dict)]
        frame = next((by_id[key(i)] for i in ids if i is not None and key(i) in by_id), None)
        if frame is None and ids and all(i is None for i in ids):
            frame = next((f for f in all_null if f.nulls == len(ids)), None)
            if frame is not None:
                all_null.remove(frame)
        if frame is None or Counter(map(key, ids)) != Counter([*map(key, frame.ids), *[key(None)] * frame.nulls]):
            problems.append(f"array reply {_short(ids)} does not match its batch ({frame.label if frame else '?'})")
    if len(seen.arrays) != want_arrays:
        problems.append(f"{len(seen.arrays)} array replies, expected {want_arrays}")
    return problems


def labels(seen: Seen, frames: list[Frame]) -> list[str]:
    """The frames that got INTERNAL_ERROR: method, params, message."""
    by_id = {key(i): f.label for f in frames for i in f.ids}
    return [f"{by_id.get(key(r['id']), '?')}: {r['error']['message'][:160]}" for r in seen.internal]


async def test_fuzzed_frames_get_exactly_their_replies_and_the_daemon_stays_well(assistant_daemon_factory):
    d = assistant_daemon_factory(no_plugins=True, preload=True, config={
        "max_line_bytes": MAX_LINE, "context": 2048, "generation": {"max_tokens": 4}})
    frames = Generator(SEED).frames(FRAMES)
    assert len(frames) >= 5000
    rng = random.Random(SEED + 1)
    async with await d.client("fuzz-setup") as c:
        await c.call("sessions.create", {"id": "fz", "title": "fuzz"})
    problems: list[str] = []
    internal: list[str] = []
    share = -(-len(frames) // BATCHES)
    for b in range(BATCHES):
        chunk = frames[b * share:(b + 1) * share]
        seen, want, arrays = await run_connection(d.socket, chunk, rng, b, initialize=b != BATCHES - 1)
        problems += [f"connection {b}: {p}" for p in compare(seen, want, arrays, chunk)]
        internal += labels(seen, chunk)
        assert d.proc.poll() is None, f"the daemon died (seed {SEED}):\n{d.stderr()[-4000:]}"
        async with await d.client("fuzz-check") as c:  # a fresh client is served after each batch
            assert (await c.call("status"))["pid"] == d.proc.pid
    log = d.stderr()
    assert not problems, f"seed {SEED}: {len(problems)} problems:\n" + "\n".join(problems[:40])
    known = [i for i in internal if known_internal(i)]
    unknown = sorted(set(internal) - set(known))
    assert not unknown, f"seed {SEED}: INTERNAL_ERROR for:\n" + "\n".join(unknown[:60])
    # A handler's failure logs "method X failed" and its traceback; any other is unexplained.
    unexplained = log.count("Traceback") - log.count(" failed\nTraceback")
    assert unexplained == 0 and (known or "Traceback" not in log), \
        f"seed {SEED}: tracebacks in the daemon's log:\n{log[-6000:]}"
    if known:
        pytest.xfail("known handler bugs (issue 14 defect 9): " + "; ".join(sorted(set(known))))


def known_internal(found: str) -> str | None:
    """What a known INTERNAL_ERROR is (see KNOWN_INTERNAL), or None."""
    return next((what for prefix, part, what in KNOWN_INTERNAL if found.startswith(prefix) and part in found), None)
