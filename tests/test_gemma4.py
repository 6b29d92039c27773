"""Gemma 4 loads and chats on llama.cpp: a tiny random ``gemma4`` target that
the test writes (tests/gemma4_files.py), its own chat template from the GGUF
(a system turn of its own, ``model`` for the assistant), its turn markers
as control tokens and ``<turn|>`` as end of generation; through the backend
and through the real daemon."""

from __future__ import annotations

import pytest

from gemma4_files import GEMMA4_CHAT_TEMPLATE, write_target

from assistant.client import Client
from assistant.inference.generation import generate
from assistant.inference.sampling import SamplingParams
from backends.base import LoadOptions

pytest.importorskip("llama_cpp")

from backends.llamacpp import LlamaCppBackend  # noqa: E402

MESSAGES = [{"role": "system", "content": "  be brief  "}, {"role": "user", "content": "the tea is in the hat"},
            {"role": "assistant", "content": "is it"}, {"role": "user", "content": "then the rain"}]


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    path = write_target(tmp_path_factory.mktemp("g4") / "gemma4-tiny.gguf")
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=512, n_threads=2, extra={"kv_type": "q8_0/f16"}))
    yield b
    b.unload()


def test_gemma4_loads_with_its_own_template_and_turn_tokens(gemma4):
    info = gemma4.info
    assert info.architecture == "gemma4" and info.template_source == "model"
    assert info.chat_template == GEMMA4_CHAT_TEMPLATE
    text = gemma4.apply_chat_template(MESSAGES)
    assert text == ("<bos><|turn>system\nbe brief<turn|>\n<|turn>user\nthe tea is in the hat<turn|>\n"
                    "<|turn>model\nis it<turn|>\n<|turn>user\nthen the rain<turn|>\n<|turn>model\n")
    no_system = gemma4.apply_chat_template(MESSAGES[1:2])
    assert no_system == "<bos><|turn>user\nthe tea is in the hat<turn|>\n<|turn>model\n"  # no empty system turn
    tokens = gemma4.tokenize(text)
    turn, end = gemma4.tokenize("<|turn>", add_bos=False), gemma4.tokenize("<turn|>", add_bos=False)
    assert len(turn) == 1 and len(end) == 1  # control tokens, one id each
    assert tokens[0] == info.bos_token_id and tokens.count(turn[0]) == 5 and tokens.count(end[0]) == 4
    assert gemma4.is_eog(end[0]) and end[0] in info.eos_token_ids  # <turn|> ends the reply, as in the real file
    assert gemma4.token_bytes(end[0]) == b""  # a control token prints nothing
    assert gemma4.detokenize(gemma4.tokenize("the rain", add_bos=False)) == "the rain"


def test_gemma4_without_a_template_falls_back_to_gemma4_turns(tmp_path):
    """Not Gemma 3's <start_of_turn>: the real template's <|turn> / <turn|> markers,
    a system turn of its own, and the reply opened as the real one opens it with
    thinking off (an empty thought channel)."""
    path = write_target(tmp_path / "gemma4-untemplated.gguf", chat_template=None)
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=256, n_threads=2))
    try:
        assert b.info.template_source == "fallback" and "fallback Gemma 4 turns" in b.info.choices["chat_template"]
        text = b.apply_chat_template(MESSAGES)
        assert text == ("<bos><|turn>system\nbe brief<turn|>\n<|turn>user\nthe tea is in the hat<turn|>\n"
                        "<|turn>model\nis it<turn|>\n<|turn>user\nthen the rain<turn|>\n"
                        "<|turn>model\n<|channel>thought\n<channel|>")
        assert b.apply_chat_template(MESSAGES[1:2]).startswith("<bos><|turn>user\n")  # no empty system turn
    finally:
        b.unload()


def test_the_python_tokenizer_ends_generation_at_gemma4s_turn_end():
    """The MLX backend's tokenizer (backends/tokenizer.py) counts Gemma 4's <turn|> as
    end of generation, as llama.cpp's vocabulary does, even without generation_config.json."""
    from backends.tokenizer import EOG_TEXTS, _eog_ids

    assert {"<turn|>", "<|tool_response>", "<eos>"} <= EOG_TEXTS
    assert _eog_ids({"<eos>": 1, "<|turn>": 4, "<turn|>": 5, "a": 9}, 1) == [1, 5]


def test_gemma4_generates_greedy_and_seeded_repeatably(gemma4):
    prompt = gemma4.tokenize(gemma4.apply_chat_template(MESSAGES))
    runs = []
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=0.8, seed=3)):
        for _ in range(2):
            gemma4.truncate(0)
            runs.append(generate(gemma4, prompt, params, max_tokens=24).tokens)
    assert runs[0] == runs[1] and runs[2] == runs[3] and len(runs[0]) > 0


@pytest.mark.slow
async def test_gemma4_chats_through_the_daemon(daemon_factory, gemma4, tmp_path):
    path = gemma4.info.path
    d = daemon_factory(config_text=f"threads: 2\ncontext: 512\npreload: true\nmodel: g4\n"
                                   f"models:\n  g4:\n    path: {path}\n").start()
    gemma4.truncate(0)
    prompt = gemma4.tokenize(gemma4.apply_chat_template(MESSAGES))
    expected = generate(gemma4, prompt, SamplingParams(temperature=0), max_tokens=20)
    client = await Client.connect(d.socket, client_name="test")
    try:
        r = await (await client.chat(messages=MESSAGES, temperature=0, max_tokens=20)).result()
        assert r["stats"]["prompt_tokens"] == len(prompt)  # the system message rendered as the template does
        assert r["text"] == expected.text and r["stats"]["completion_tokens"] == len(expected.tokens)
        loaded = {m["name"]: m for m in (await client.call("models.list"))["loaded"]}
        assert loaded["g4"]["info"]["architecture"] == "gemma4"
    finally:
        await client.close()
