"""The generation loop's logic, on a tiny scripted backend (the real model is
exercised end to end in test_daemon.py and test_llamacpp_backend.py)."""

import dataclasses
import threading

import numpy as np
import pytest

from assistant.inference.generation import StopMatcher, common_prefix, generate, plain_tokens
from assistant.inference.sampling import Sampler, SamplingParams
from backends.base import Backend, ContextOverflowError, ModelInfo

EOS = 0


class ScriptedBackend(Backend):
    """Predicts token (last + 1) mod vocab; token i is the text chr(ord('a') + i - 1)."""

    name = "scripted"

    def __init__(self, n_ctx=64, vocab=27, multibyte=False):
        self._cache = []
        self.forwarded = 0
        self.multibyte = multibyte
        self._info = ModelInfo(name="s", path="-", backend="scripted", architecture="t", context_length=n_ctx,
                               train_context_length=n_ctx, vocab_size=vocab, chat_template=None,
                               template_source="fallback", bos_token_id=None, eos_token_ids=[EOS])

    @classmethod
    def availability(cls):
        return True, "test"

    def load(self, path, options=None):
        return self._info

    def unload(self):
        pass

    @property
    def info(self):
        return self._info

    def tokenize(self, text, *, add_bos=True, special=True):
        return [ord(c) - ord("a") + 1 for c in text]

    def token_bytes(self, token):
        if self.multibyte:
            return "é".encode()[token % 2 : token % 2 + 1]  # each token is half of 'é'
        return chr(ord("a") + token - 1).encode()

    def is_eog(self, token):
        return token == EOS

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        return "".join(m["content"] for m in messages)

    @property
    def cached_tokens(self):
        return list(self._cache)

    def forward(self, tokens, logits_at=None):
        if len(self._cache) + len(tokens) > self._info.context_length:
            raise ContextOverflowError("full", needed=len(self._cache) + len(tokens),
                                       available=self._info.context_length)
        self._cache.extend(tokens)
        self.forwarded += len(tokens)
        at = [len(tokens) - 1] if logits_at is None else logits_at
        out = np.zeros((len(at), self._info.vocab_size), dtype=np.float32)
        for row, i in enumerate(at):
            out[row, (tokens[i] + 1) % self._info.vocab_size] = 10.0
        return out

    def truncate(self, n):
        del self._cache[n:]


GREEDY = SamplingParams(temperature=0)


def test_greedy_generation_streams_and_stops_at_eos():
    b = ScriptedBackend()
    pieces = []
    r = generate(b, b.tokenize("uvw"), GREEDY, max_tokens=50, on_text=pieces.append)
    assert r.text == "xyz" and "".join(pieces) == r.text
    assert r.finish_reason == "stop"  # z (26) is followed by EOS (0)
    assert r.stats.completion_tokens == 3 and r.stats.prompt_tokens == 3


def test_max_tokens():
    b = ScriptedBackend()
    r = generate(b, b.tokenize("a"), GREEDY, max_tokens=4)
    assert r.text == "bcde" and r.finish_reason == "length"


def test_prefix_is_reused_from_the_cache():
    b = ScriptedBackend()
    generate(b, b.tokenize("abc"), GREEDY, max_tokens=2)
    before = b.forwarded
    r = generate(b, b.tokenize("abcdefg"), GREEDY, max_tokens=1)
    # abc + d were cached (d was forwarded after being sampled); only efg are new.
    assert r.stats.cached_prompt_tokens == 4
    assert b.forwarded - before == 3


def test_identical_prompt_still_evaluates_one_token():
    b = ScriptedBackend()
    generate(b, b.tokenize("abc"), GREEDY, max_tokens=1)
    r = generate(b, b.tokenize("abc"), GREEDY, max_tokens=1)
    assert r.stats.cached_prompt_tokens == 2 and r.text == "d"


def test_stop_string_cuts_the_text_and_is_not_emitted():
    b = ScriptedBackend()
    pieces = []
    r = generate(b, b.tokenize("a"), GREEDY, max_tokens=20, stop=["efg"], on_text=pieces.append)
    assert r.text == "bcd" and "".join(pieces) == "bcd" and r.finish_reason == "stop"


def test_partial_stop_prefix_is_released_when_generation_ends():
    b = ScriptedBackend()
    r = generate(b, b.tokenize("a"), GREEDY, max_tokens=3, stop=["dx"])
    assert r.text == "bcd" and r.finish_reason == "length"


def test_multibyte_characters_are_never_split():
    b = ScriptedBackend(multibyte=True)
    pieces = []
    # tokens alternate between the two bytes of 'é'
    r = generate(b, [1], GREEDY, max_tokens=4, on_text=pieces.append)
    assert r.text == "éé" and all(p == "é" for p in pieces)


def test_prompt_that_does_not_fit_is_an_error():
    b = ScriptedBackend(n_ctx=8)
    with pytest.raises(ContextOverflowError) as exc:
        generate(b, list(range(1, 10)), GREEDY, max_tokens=2)
    assert exc.value.needed == 9 and exc.value.available == 8


def test_context_full_is_reported_not_hidden():
    b = ScriptedBackend(n_ctx=8, vocab=1000)
    r = generate(b, [1, 2, 3], GREEDY, max_tokens=100)
    assert r.finish_reason == "length" and r.stats.context_full is True
    assert len(b.cached_tokens) == 8


def test_cancel_is_seen_between_steps():
    b = ScriptedBackend(vocab=1000)
    ev = threading.Event()
    seen = []

    def on_text(t):
        seen.append(t)
        if len(seen) == 3:
            ev.set()

    r = generate(b, [1], GREEDY, max_tokens=500, on_text=on_text, cancel=ev)
    assert r.finish_reason == "cancelled" and r.stats.completion_tokens == 3


def test_ignore_eos():
    b = ScriptedBackend()
    r = generate(b, b.tokenize("y"), GREEDY, max_tokens=3, ignore_eos=True)
    assert r.stats.completion_tokens == 3 and r.finish_reason == "length"


def test_stop_matcher_holds_back_only_possible_prefixes():
    m = StopMatcher(["</end>"])
    assert m.feed("hello <") == ("hello ", False)
    assert m.feed("/e") == ("", False)
    assert m.feed("x") == ("</ex", False)
    assert m.feed("</end> tail") == ("", True)


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0


# The wire format of a reply's stats (docs/protocol.md): these keys, in this order.
STATS_KEYS = ["backend", "model", "prompt_tokens", "cached_prompt_tokens", "completion_tokens", "ttft_ms",
              "prefill_ms", "queue_ms", "tokens_per_second", "total_ms", "context_length", "context_used",
              "context_full", "finish_reason", "drafter", "drafted", "accepted", "acceptance_rate"]


def test_stats_are_a_dataclass_with_the_wire_format_as_dict():
    b = ScriptedBackend()
    r = generate(b, b.tokenize("abc"), GREEDY, max_tokens=5)
    d = r.stats.as_dict()
    assert list(d) == STATS_KEYS
    assert d["model"] == "s" and d["backend"] == "scripted" and d["completion_tokens"] == 5
    assert (d["drafter"], d["drafted"], d["accepted"], d["acceptance_rate"]) == ("off", 0, 0, None)
    assert d["context_used"] == len(b.cached_tokens) == 3 + 4 and d["finish_reason"] == "length"
    assert generate(b, b.tokenize("abc"), GREEDY, max_tokens=2, label="my-alias").stats.model == "my-alias"
    # the daemon adds what only it knows; tool_calls appears only when set
    more = dataclasses.replace(r.stats, completion_tokens=12, tool_calls=2).as_dict()
    assert list(more) == STATS_KEYS + ["tool_calls"] and more["completion_tokens"] == 12 and more["tool_calls"] == 2
    assert d["tokens_per_second"] == more["tokens_per_second"]


def test_plain_decoding_is_a_generator_that_appends_what_was_taken():
    b = ScriptedBackend()
    prompt = b.tokenize("abc")
    logits = b.forward(prompt)[-1]
    history = list(prompt)
    tokens = plain_tokens(b, logits, Sampler(GREEDY), history)
    assert [next(tokens) for _ in range(3)] == [4, 5, 6]
    tokens.close()
    # 4 and 5 were taken (the caller asked for more after them) and evaluated; 6 was not
    assert history == prompt + [4, 5] and b.cached_tokens == prompt + [4, 5]
