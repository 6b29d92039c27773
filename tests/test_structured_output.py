"""Structured output (``response_format``) with the real SmolLM2 model.

What is checked, and how:

- the generation loop on a real llama.cpp backend: every reply that ends on
  its own parses and validates (jsonschema) against its schema, schemas with
  enums, nested objects, arrays and required keys; ``json_object`` gives an
  object; seeded sampling under the grammar is reproducible and valid; a
  ``max_tokens`` cut mid-JSON is ``length`` and not complete;
- speculative decoding under the grammar: greedy tokens identical with
  drafting off, ``ngram`` (drafting as much as it can) and ``auto``; a
  drafter whose drafts end in a token the grammar rejects gets that token
  cut before verification (never counted as drafted), and a draft the
  grammar rejects outright is not verified at all;
- the MLX backend: the same constrained greedy tokens as llama.cpp (the
  grammar is built from the ``Backend`` interface alone);
- the real daemon over its socket: the ``response_format`` chat parameter,
  speculative on and off, bad values refused with INVALID_PARAMS naming the
  problem (and nothing stored in the session), and ``assistant ask
  --schema FILE`` / ``--format json``;
- the parser of ``response_format`` alone: OpenAI's shape, its errors, the
  size bounds.

The model is tiny (135M): its JSON is valid because the grammar makes it
so, not because it is good at JSON. Replies are kept short (max_tokens well
under 200) so the file runs in well under a minute of decoding.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from assistant.inference import speculative as S
from assistant.inference.constraints import (MAX_DEPTH, ConstraintError, ResponseFormat, constraint_for,
                                             parse_response_format)
from assistant.inference.generation import generate
from assistant.inference.sampling import SamplingParams
from assistant.inference.speculative.drafter import Draft
from assistant.protocol import ErrorCode, RPCError

jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object",
            "properties": {"sku": {"enum": ["A1", "B2", "C3"]}, "qty": {"type": "integer", "minimum": 1,
                                                                     "maximum": 9}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "express": {"type": "boolean"},
    },
    "required": ["items", "express"],
    "additionalProperties": False,
}
VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "confidence": {"type": "number"}},
           "required": ["answer", "confidence"], "additionalProperties": False}

CASES = [
    ("person", PERSON, "Make up a JSON record of a person: name, age, role, address and tags."),
    ("order", ORDER, "Write a JSON order for two items."),
    ("verdict", VERDICT, "Is Paris the capital of France? Answer in JSON."),
]
# A prompt whose answer copies JSON from it, so prompt lookup has drafts to offer.
COPY = ("Repeat this JSON exactly:\n" + json.dumps(
    {"name": "Ada Lovelace", "age": 36, "role": "admin", "address": {"city": "London", "zip": "10115"},
     "tags": ["math", "poetry"]}, indent=2))


def schema_format(schema: dict, name: str = "reply", strict: bool = True) -> ResponseFormat:
    fmt = parse_response_format({"type": "json_schema",
                                 "json_schema": {"name": name, "schema": schema, "strict": strict}})
    assert fmt is not None
    return fmt


def chat_prompt(backend, text: str) -> list[int]:
    return backend.tokenize(backend.apply_chat_template([{"role": "user", "content": text}]))


def valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def smol(shared_cache_dir):
    """SmolLM2 on llama.cpp with the KV cache types under which verify batches are
    exact on this CPU (as tests/test_speculative.py loads it): drafting really runs."""
    pytest.importorskip("llama_cpp")
    from assistant.config.models import resolve_model
    from backends.base import LoadOptions
    from backends.llamacpp import LlamaCppBackend

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(shared_cache_dir))
        path = resolve_model("smollm2-135m").path
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=2048, n_threads=2, extra={"kv_type": "q8_0/f16"}))
    yield b
    b.unload()


def run(backend, prompt, params, max_tokens=160, **kw):
    backend.truncate(0)
    return generate(backend, prompt, params, max_tokens=max_tokens, **kw)


_COSTS: dict = {}


def engine(backend, drafter, **kw):
    """An engine with the loaded model's cost model kept across requests (one calibration)."""
    return S.SpeculativeEngine(drafter, costs=_COSTS.setdefault(id(backend), S.CostModel()), **kw)


# -- the generation loop -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, schema, question", CASES, ids=[c[0] for c in CASES])
def test_greedy_replies_validate_against_their_schema(smol, name, schema, question):
    fmt = schema_format(schema, name)
    r = run(smol, chat_prompt(smol, question), SamplingParams(temperature=0, response_format=fmt))
    assert r.finish_reason == "stop" and r.complete is True, (r.finish_reason, r.text)
    value = valid(r.text, schema)
    assert set(value) == set(schema["required"])  # additionalProperties false: exactly the required keys


@pytest.mark.slow
def test_json_object_gives_an_object(smol):
    fmt = parse_response_format({"type": "json_object"})
    r = run(smol, chat_prompt(smol, "Describe the city of Paris in JSON."),
            SamplingParams(temperature=0, response_format=fmt), max_tokens=120)
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict) and r.complete
    else:  # this tiny model may list facts until max_tokens: then the text is the start of an object
        assert r.finish_reason == "length" and r.complete is False and r.text.lstrip().startswith("{")
    r = run(smol, chat_prompt(smol, "Give me a JSON object with a key 'ok' set to true."),
            SamplingParams(temperature=0, response_format=fmt), max_tokens=60)
    assert r.finish_reason == "stop" and isinstance(json.loads(r.text), dict)


@pytest.mark.slow
def test_seeded_sampling_under_the_grammar(smol):
    fmt = schema_format(PERSON)
    prompt = chat_prompt(smol, CASES[0][2])
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.0, seed=seed, response_format=fmt)
              for seed in (1, 2)]
    a, b = run(smol, prompt, params[0]), run(smol, prompt, params[0])
    assert a.text == b.text and a.finish_reason == "stop", a.text  # the same seed, the same reply
    valid(a.text, PERSON)
    # with prompt lookup drafting, the same seeded text (point-mass drafts draw with the same stream)
    c = run(smol, prompt, params[0], speculative=engine(smol, S.NgramDrafter(), adaptive=False, max_draft=8))
    assert c.text == a.text
    other = run(smol, prompt, params[1])
    assert other.finish_reason == "stop" and other.text != a.text  # the seed matters: sampling ran under the mask
    valid(other.text, PERSON)


@pytest.mark.slow
def test_max_tokens_cut_mid_json_is_length_not_complete(smol):
    fmt = schema_format(PERSON)
    r = run(smol, chat_prompt(smol, CASES[0][2]), SamplingParams(temperature=0, response_format=fmt), max_tokens=12)
    assert r.finish_reason == "length" and r.complete is False
    assert r.text.lstrip().startswith("{")
    with pytest.raises(ValueError):
        json.loads(r.text)
    # a stop string that cuts the JSON: "stop", but not complete either
    r = run(smol, chat_prompt(smol, CASES[0][2]), SamplingParams(temperature=0, response_format=fmt),
            stop=['"age"'])
    assert r.finish_reason == "stop" and r.complete is False


# -- speculative decoding under the grammar ----------------------------------------------


@pytest.mark.slow
def test_greedy_identity_with_drafting_on_and_off(smol):
    fmt = schema_format(PERSON)
    greedy = SamplingParams(temperature=0, response_format=fmt)
    prompt = chat_prompt(smol, COPY)
    plain = run(smol, prompt, greedy)
    assert plain.finish_reason == "stop"
    valid(plain.text, PERSON)
    # max_draft 8: the first drafting run calibrates verify batches up to max_draft + 1
    eager = run(smol, prompt, greedy, speculative=engine(smol, S.NgramDrafter(), adaptive=False, max_draft=8))
    auto = run(smol, prompt, greedy, speculative=engine(smol, S.AutoDrafter(S.NgramDrafter(), None), max_draft=8))
    assert eager.tokens == plain.tokens and auto.tokens == plain.tokens
    assert eager.text == plain.text and eager.complete and auto.complete
    assert eager.stats.accepted > 0, eager.stats  # drafting really ran, and paid
    assert auto.stats.drafter == "auto(ngram)"


class ScriptDrafter:
    """Drafts the next tokens of a known reply, then ``tail`` (tokens the grammar rejects)."""

    name = "script"

    def __init__(self, reply: list[int], n_prompt: int, tail: list[int], good: int = 4):
        self.reply, self.n_prompt, self.tail, self.good = reply, n_prompt, tail, good
        self.proposed: list[list[int]] = []

    def begin(self, tokens, params):
        pass

    def propose(self, tokens, choose):
        at = len(tokens) - self.n_prompt
        d = self.reply[at : at + self.good] + self.tail
        k = choose("script", len(d))
        if k <= 0:
            return None
        self.proposed.append(d[:k])
        return Draft(d[:k], "script")

    def close(self):
        pass


@pytest.mark.slow
def test_a_draft_token_the_grammar_rejects_ends_the_draft(smol):
    fmt = schema_format(VERDICT)
    greedy = SamplingParams(temperature=0, response_format=fmt)
    prompt = chat_prompt(smol, CASES[2][2])
    plain = run(smol, prompt, greedy, max_tokens=40)
    assert plain.finish_reason == "stop"
    junk = smol.tokenize("Sure! Here", add_bos=False, special=False)  # never valid JSON here
    # Correct tokens then junk: the junk is cut before verification, so every verified
    # token is right, and the reply is the plain one.
    drafter = ScriptDrafter(plain.tokens + [smol.info.eos_token_ids[0]], len(prompt), junk)
    spec = run(smol, prompt, greedy, max_tokens=40, speculative=engine(smol, drafter, adaptive=False, max_draft=8))
    assert spec.tokens == plain.tokens
    assert drafter.proposed and spec.stats.drafted > 0
    assert spec.stats.drafted == spec.stats.accepted, spec.stats  # no rejected token was ever verified
    # Only junk: nothing is verified at all.
    only_junk = ScriptDrafter([], len(prompt), junk, good=0)
    spec = run(smol, prompt, greedy, max_tokens=40,
               speculative=engine(smol, only_junk, adaptive=False, max_draft=8))
    assert spec.tokens == plain.tokens and only_junk.proposed and spec.stats.drafted == 0
    assert spec.stats.speculative.verify_steps == 0


@pytest.mark.slow
def test_constraint_state_follows_the_tokens_taken(smol):
    """The constraint built from the Backend interface: a JSON reply's tokens are
    accepted one by one, a wrong token is refused, a draft prefix check moves nothing."""
    fmt = schema_format(VERDICT)
    plain = run(smol, chat_prompt(smol, CASES[2][2]), SamplingParams(temperature=0, response_format=fmt),
                max_tokens=40)
    c = constraint_for(fmt, smol)
    bad = smol.tokenize("no", add_bos=False, special=False)
    assert c.valid_prefix(plain.tokens) == len(plain.tokens) and c.taken == 0
    assert c.valid_prefix(bad) == 0 and not c.allows(bad[0])
    assert not c.allowed()[smol.info.eos_token_ids[0]]  # nothing written yet: it may not end
    for t in plain.tokens:
        c.take(t)
    assert c.complete and c.allowed()[smol.info.eos_token_ids[0]]
    with pytest.raises(ConstraintError):
        c.take(bad[0])


mlx_installed = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None


@pytest.mark.slow
@pytest.mark.skipif(not mlx_installed, reason="the mlx extra is not installed")
def test_mlx_backend_gives_the_same_constrained_tokens(smol):
    """MLX on the same GGUF file (a few tokens/s on this CPU: a short reply)."""
    from backends.base import LoadOptions
    from backends.mlx_backend import MLXBackend

    fmt = schema_format(VERDICT)
    greedy = SamplingParams(temperature=0, response_format=fmt)
    b = MLXBackend()
    b.load(smol.info.path, LoadOptions(n_ctx=512))
    try:
        prompt = chat_prompt(b, CASES[2][2])
        assert prompt == chat_prompt(smol, CASES[2][2])
        m = run(b, prompt, greedy, max_tokens=10)
        ref = run(smol, prompt, greedy, max_tokens=10)
        assert m.tokens == ref.tokens and m.text.lstrip().startswith("{")
        assert m.stats.backend == "mlx"
    finally:
        b.unload()


# -- the parser of response_format ---------------------------------------------------


def test_response_format_shapes():
    assert parse_response_format({"type": "text"}) is None
    obj = parse_response_format({"type": "json_object"})
    assert obj.type == "json_object" and obj.grammar and obj.to_openai() == {"type": "json_object"}
    spec = {"name": "person-v1", "schema": PERSON, "strict": True, "description": "a person"}
    fmt = parse_response_format({"type": "json_schema", "json_schema": spec, "extra": 1})
    assert fmt.schema == PERSON and fmt.strict and fmt.name == "person-v1"
    assert fmt.to_openai() == {"type": "json_schema", "json_schema": spec}
    # without a schema: any JSON value; without strict: an unsupported keyword is ignored, with a warning
    assert parse_response_format({"type": "json_schema", "json_schema": {"name": "x"}}).schema is None
    loose = parse_response_format({"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "format": "no-such-format"}}})
    assert not loose.strict and any("no-such-format" in w for w in loose.warnings)


@pytest.mark.parametrize("value, message", [
    ("json", "expected an object with a 'type'"),
    ({"type": "xml"}, "'type' must be one of 'text', 'json_object', 'json_schema', got 'xml'"),
    ({"type": "json_schema"}, "needs a 'json_schema' object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "json_schema.name must be 1 to 64"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "x" * 65, "schema": {}}}, "json_schema.name must be"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}, "json_schema.strict must be"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "must be a JSON Schema object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "json_schema.schema.type: 'nonsense' is not valid"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"enum": "x"}}}}}}},
     "json_schema.schema.properties.a.properties.b.enum: 'x' is not of type 'array'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": ["a"],
                                                                        "properties": {"a": False}}}},
     "cannot be enforced: Unsatisfiable schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
        "type": "string", "format": "no-such-format"}}}, "cannot be enforced: Unknown format: no-such-format"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "https://example.com/s.json"}}},
     "does not fetch"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(("}}},
     "regex parse error"),
])
def test_bad_response_formats_are_refused_naming_the_problem(value, message):
    with pytest.raises(ConstraintError) as err:
        parse_response_format(value)
    assert message in str(err.value), str(err.value)


def test_schema_size_is_bounded():
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(1001)}}
    for schema, message in ((deep, "nested more than 64 levels"), (wide, "more than 1000 object properties"),
                            ({"enum": list(range(20_001))}, "more than 20000 values")):
        with pytest.raises(ConstraintError, match=message):
            parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


# -- the daemon ---------------------------------------------------------------------------


async def _ask(client, **params):
    return await (await client.chat(**params)).result()


@pytest.mark.slow
async def test_daemon_response_format(daemon):
    from assistant.client import Client

    client = await Client.connect(daemon.socket, client_name="test")
    try:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
        off = await _ask(client, prompt=CASES[0][2], temperature=0, max_tokens=160, response_format=fmt,
                         draft="off")
        assert off["finish_reason"] == "stop", off
        valid(off["text"], PERSON)
        verdict = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT}}
        off = await _ask(client, prompt=CASES[2][2], temperature=0, max_tokens=40, response_format=verdict,
                         draft="off")
        valid(off["text"], VERDICT)
        for draft in ("ngram", "auto"):  # a small max_draft: the first drafting request calibrates up to it
            on = await _ask(client, prompt=CASES[2][2], temperature=0, max_tokens=40, response_format=verdict,
                            draft=draft, max_draft=4)
            assert on["text"] == off["text"] and on["stats"]["drafter"] != "off"
        obj = await _ask(client, prompt="Give me a JSON object with a key 'ok' set to true.", temperature=0,
                         max_tokens=60, response_format={"type": "json_object"})
        assert obj["finish_reason"] == "stop" and isinstance(json.loads(obj["text"]), dict)
        cut = await _ask(client, prompt=CASES[0][2], temperature=0, max_tokens=10, response_format=fmt)
        assert cut["finish_reason"] == "length"
        with pytest.raises(ValueError):
            json.loads(cut["text"])
        # bad values: INVALID_PARAMS naming the problem, nothing stored, the daemon serves on
        bad = [({"type": "yaml"}, "'type' must be one of"),
               ("json", "parameter 'response_format': expected an object"),
               ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer", "minimum": "0"}}},
                "parameter 'response_format': json_schema.schema.minimum: '0' is not of type 'number'")]
        for value, message in bad:
            with pytest.raises(RPCError) as err:
                await _ask(client, prompt="Hi", session="s1", max_tokens=4, response_format=value)
            assert err.value.code == ErrorCode.INVALID_PARAMS and message in err.value.message, err.value.message
        sessions = await client.call("sessions.list", {})
        assert all(s["id"] != "s1" for s in sessions["sessions"]), sessions
        r = await _ask(client, prompt="Hi", session="s1", max_tokens=4, response_format={"type": "text"})
        assert r["session"] == "s1"
    finally:
        await client.close()


@pytest.mark.slow
def test_cli_ask_schema_and_format_json(daemon, tmp_path):
    from assistant.testing import run_cli

    schema_file = tmp_path / "verdict.schema.json"
    schema_file.write_text(json.dumps(VERDICT))
    out = run_cli("ask", "--schema", str(schema_file), "-t", "0", "-n", "60", CASES[2][2],
                  socket_path=daemon.socket, config=daemon.config)
    assert out.returncode == 0, out.stderr
    valid(out.stdout, VERDICT)
    out = run_cli("ask", "--format", "json", "-t", "0", "-n", "60",
                  "Give me a JSON object with a key 'ok' set to true.", socket_path=daemon.socket,
                  config=daemon.config)
    assert out.returncode == 0 and isinstance(json.loads(out.stdout), dict), out.stderr
    out = run_cli("ask", "--schema", str(schema_file), "-t", "0", "-n", "3", CASES[2][2],
                  socket_path=daemon.socket, config=daemon.config)
    assert out.returncode == 0 and "the JSON is not complete" in out.stderr
    # bad files: one clear line each, no traceback
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text("{nope")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "nonsense"}))
    for args, message in (([str(tmp_path / "missing.json")], "no such file"),
                          ([str(tmp_path)], "not a file"),
                          ([str(tmp_path / "list.json")], "a JSON Schema is an object"),
                          ([str(tmp_path / "broken.json")], "not JSON"),
                          ([str(tmp_path / "bad.json")], "json_schema.schema.type: 'nonsense' is not valid")):
        out = run_cli("ask", "--schema", *args, "Hi", socket_path=daemon.socket, config=daemon.config)
        assert out.returncode == 1 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = run_cli("ask", "--schema", str(schema_file), "--format", "json", "Hi", socket_path=daemon.socket,
                  config=daemon.config)
    assert out.returncode == 1 and "not both" in out.stderr
