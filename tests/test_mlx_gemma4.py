"""Gemma 4 on the MLX backend (mlx[cpu] here), and its MTP assistant drafter.

What is checked, and how (tiny random-weight models the tests write:
tests/mlx_gemma4_files.py; no real Gemma 4 weights are reachable here):

- the target: a ``gemma4`` folder (the multimodal config layout) and a
  ``gemma4_text`` one load through mlx-lm; its own chat template (a system
  turn of its own, ``model`` for the assistant) and ``<turn|>`` ending a
  turn; the backend's logits, computed with the head applied only to the
  rows asked for, one full cache per layer that has K/V (two of the five
  layers share theirs) and the sliding window applied by the mask, equal
  mlx-lm's own whole-model forward at every position, token by token past the
  window; the shared generation loop and a chat through the real daemon.
- the drafter (mlx-vlm's ``gemma4_assistant``, skipped with the reason where
  mlx-vlm cannot be imported): drafts from the backend's cache equal those
  mlx-vlm's own Gemma 4 computes over the same weights (hidden state and
  K/V), also after speculative steps cut the cache back; greedy output and a
  seeded sampled request are plain decoding's; the controller off drafts on
  every step, on it switches a drafter that accepts nothing off; the stats
  say ``drafter: mtp``, kind ``assistant``, drafted and accepted.
- refusals before anything loads: a drafter that does not pair (each
  difference named), is missing, is a GGUF file, has no config or weights,
  or is truncated; and the model loaded before stays loaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest

from backends.base import LoadOptions, ModelLoadError

if importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("the mlx extra is not installed", allow_module_level=True)

from mlx_gemma4_files import TURN_END, assistant_config, write_assistant, write_target  # noqa: E402

from assistant.inference import speculative as S  # noqa: E402
from assistant.inference.generation import generate  # noqa: E402
from assistant.inference.sampling import SamplingParams  # noqa: E402
from backends.mlx_backend import MLXBackend  # noqa: E402

GREEDY = SamplingParams(temperature=0)
VLM_REASON = ("mlx-vlm (the [vlm] extra: the Gemma 4 assistant's model code) cannot be imported here; "
              "install it with: pip install --no-deps mlx-vlm==0.7.10 && pip install requests Pillow")


def _vlm_ok() -> bool:
    from backends.mlx_mtp import vlm_status

    return vlm_status()[0]


needs_vlm = pytest.mark.skipif(not _vlm_ok(), reason=VLM_REASON)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlx-gemma4")
    return write_target(d / "gemma-4-tiny"), write_assistant(d / "gemma-4-tiny-assistant")


@pytest.fixture(scope="module")
def plain(files):
    b = MLXBackend()
    b.load(str(files[0]), LoadOptions(n_ctx=512))
    yield b
    b.unload()


@pytest.fixture(scope="module")
def paired(files):
    if not _vlm_ok():
        pytest.skip(VLM_REASON)
    b = MLXBackend()
    b.load(str(files[0]), LoadOptions(n_ctx=512, mtp_model=str(files[1])))
    yield b
    b.unload()


def _prompt(b, text="is the cat in the hat?"):
    return b.tokenize(b.apply_chat_template([{"role": "user", "content": text}]))


# --------------------------------------------------------------------------
# the target


@pytest.mark.parametrize("model_type", ["gemma4", "gemma4_text"])
def test_gemma4_loads_with_its_template_and_turn_end(tmp_path, model_type):
    folder = write_target(tmp_path / "m", model_type=model_type)
    if model_type == "gemma4_text":  # the end of turn listed only in generation_config.json, as Google's are
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": 1}))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, TURN_END]}))
    b = MLXBackend()
    info = b.load(str(folder), LoadOptions(n_ctx=256))
    assert info.architecture == model_type and info.template_source == "model"
    assert TURN_END in info.eos_token_ids and b.is_eog(TURN_END) and b.token_bytes(TURN_END) == b""
    assert len(b._cache) == 3  # the two KV-shared layers take no cache of their own
    text = b.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "is"}, {"role": "user", "content": "the"}])
    assert text == ("<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\nis<turn|>\n"
                    "<|turn>user\nthe<turn|>\n<|turn>model\n")
    toks = b.tokenize(text)
    assert toks[0] == 2 and toks.count(4) == 5 and toks.count(TURN_END) == 4  # <bos>, <|turn> x5, <turn|> x4
    assert b.mtp_support()[0] is False and "speculative.mtp_model" in b.mtp_support()[1]
    assert b.mtp_kind() is None
    b.unload()


def test_logits_equal_mlx_lm_whole_model_past_the_sliding_window(plain):
    """Token by token through the backend (split head, full caches, window by
    mask) == one whole-sequence forward of mlx-lm's model, at every position."""
    import mlx.core as mx

    toks = _prompt(plain, "the cat is in the hat and the rain is on the tea")
    assert len(toks) > 3 * 8  # well past the sliding window of 8
    whole = np.array(plain._model(mx.array([toks])).astype(mx.float32))[0]
    plain.truncate(0)
    rows = [plain.forward(toks[:5], logits_at=range(5))]
    rows += [plain.forward([t]) for t in toks[5:]]
    np.testing.assert_allclose(np.concatenate(rows), whole, rtol=1e-4, atol=1e-4)
    assert plain.cached_tokens == toks
    plain.truncate(7)  # cut back inside the window, then on again
    np.testing.assert_allclose(plain.forward(toks[7:], logits_at=range(len(toks) - 7)), whole[7:],
                               rtol=1e-4, atol=1e-4)


def test_doctor_counts_only_layers_with_their_own_cache(files):
    from backends.mlx_folder import folder_summary

    s = folder_summary(files[0])
    # layers 0-1 sliding (head 32), layer 2 full (head 64), 1 KV head, K+V in 2 bytes; 3-4 shared
    assert s["architecture"] == "gemma4" and s["kv_bytes_per_token"] == (32 + 32 + 64) * 2 * 2
    assert s["has_chat_template"] and s["context_length"] == 4096


def test_generation_loop_reuses_the_prefix(plain):
    prompt = _prompt(plain)
    plain.truncate(0)
    one = generate(plain, prompt, GREEDY, max_tokens=10, ignore_eos=True)
    two = generate(plain, prompt, GREEDY, max_tokens=10, ignore_eos=True)
    assert one.tokens == two.tokens and len(one.tokens) == 10
    assert two.stats.cached_prompt_tokens == len(prompt) - 1 and two.stats.backend == "mlx"


# --------------------------------------------------------------------------
# the assistant drafter


def _reference_drafts(target_folder: Path, drafter, tokens: list[int], pending: int, n: int) -> list[int]:
    """What mlx-vlm's own Gemma 4 (its LanguageModel over the same weights,
    full caches) hands the drafter, and the drafter's greedy tokens from it."""
    import mlx.core as mx
    from mlx_vlm.models.cache import KVCache
    from mlx_vlm.models.gemma4.config import TextConfig
    from mlx_vlm.models.gemma4.language import LanguageModel

    cfg = json.loads((target_folder / "config.json").read_text())
    lm = LanguageModel(TextConfig.from_dict(cfg["text_config"]))
    weights = mx.load(str(target_folder / "model.safetensors"))
    lm.load_weights([(k.removeprefix("language_model."), v) for k, v in weights.items()], strict=False)
    lm.set_dtype(mx.float32)
    out = lm(mx.array([tokens]), cache=[KVCache() for _ in range(3)], return_hidden=True, return_shared_kv=True)
    hidden = lm.speculative_draft_hidden(out.hidden_states[-1][:, -1:, :])
    N = len(tokens)
    drafter.set_shared_kv(out.shared_kv_states, N, position=N - 1, kv_valid_len=N)
    got = drafter.draft_block(pending, hidden, None, n + 1, lambda logits: mx.argmax(logits, axis=-1), greedy=True)
    return [int(t) for t in got.reshape(-1).tolist()]


@needs_vlm
def test_drafts_read_the_targets_hidden_state_and_kv_as_mlx_vlm_does(paired, files):
    ok, why = paired.mtp_support()
    assert ok and paired.mtp_kind() == "assistant", why
    assert paired.info.choices["mtp"].startswith("assistant drafter gemma-4-tiny-assistant (2 layers, gemma4_assistant")
    toks = _prompt(paired, "the cat is in the hat and the rain is on the tea")  # past the window of 8
    paired.truncate(0)
    pending = int(paired.forward(toks)[-1].argmax())
    ours = paired.mtp_draft(toks + [pending], 5)
    assert len(ours) == 5 and paired.cached_tokens == toks  # drafting leaves the cache as it was
    assert ours == _reference_drafts(files[0], paired._mtp.model, toks, pending, 5)
    # after speculative steps (verify batches cut back by truncate) the state still matches
    paired.truncate(0)
    engine = S.SpeculativeEngine(S.MtpDrafter(paired), adaptive=False, exact=False, max_draft=3)
    out = generate(paired, toks, GREEDY, max_tokens=9, ignore_eos=True, speculative=engine)
    assert out.stats.drafted > 0
    cached, pending = paired.cached_tokens, out.tokens[-1]
    assert paired.mtp_draft(cached + [pending], 4) == _reference_drafts(files[0], paired._mtp.model, cached,
                                                                          pending, 4)
    assert paired.mtp_draft(cached + [pending, 7], 4) == []  # not the engine's state: nothing drafted
    assert paired.mtp_draft([9] * (len(cached) + 1), 4) == [] and paired.mtp_draft(cached + [pending], 0) == []
    # cut back behind the hidden rows kept (the last 80 of a forward): it still drafts, from zeros
    long = (toks * 5)[:120]
    paired.truncate(0)
    paired.forward(long)
    paired.truncate(5)
    assert len(paired.mtp_draft(long[:6], 3)) == 3 and paired.cached_tokens == long[:5]


@needs_vlm
def test_greedy_output_is_plain_decodings(paired, plain):
    prompt = _prompt(paired)
    plain.truncate(0)
    want = generate(plain, prompt, GREEDY, max_tokens=40, ignore_eos=True)
    for exact in (False, True):
        paired.truncate(0)
        engine = S.SpeculativeEngine(S.MtpDrafter(paired), adaptive=False, exact=exact, max_draft=4)
        got = generate(paired, prompt, GREEDY, max_tokens=40, ignore_eos=True, speculative=engine)
        assert got.tokens == want.tokens and got.text == want.text
        assert got.stats.drafter == "mtp" and got.stats.drafted > 0, got.stats  # controller off: it drafts
        assert got.stats.accepted <= got.stats.drafted and engine.drafter.kind == "assistant"
        assert paired.cached_tokens == prompt + got.tokens[:-1]
    auto = S.DrafterRegistry(S.BUILTIN_DRAFTERS).make("auto", S.DraftContext(target=paired))
    assert auto.name == "auto(ngram+mtp)" and auto.kind == "assistant"


@needs_vlm
def test_seeded_sampling_is_plain_sampling(paired, plain):
    params = SamplingParams(temperature=0.9, top_k=40, seed=7)
    prompt = _prompt(paired, "a cat in the rain")
    plain.truncate(0)
    want = generate(plain, prompt, params, max_tokens=30, ignore_eos=True)
    paired.truncate(0)
    engine = S.SpeculativeEngine(S.MtpDrafter(paired), adaptive=False, max_draft=3)
    got = generate(paired, prompt, params, max_tokens=30, ignore_eos=True, speculative=engine)
    assert got.tokens == want.tokens and got.stats.drafted > 0


@needs_vlm
def test_the_controller_switches_a_drafter_that_accepts_nothing_off(paired):
    prompt = _prompt(paired, "in the tea")
    costs = S.CostModel()
    paired.truncate(0)
    off = generate(paired, prompt, GREEDY, max_tokens=96, ignore_eos=True, speculative=S.SpeculativeEngine(
        S.MtpDrafter(paired), costs=costs, adaptive=False, max_draft=4))
    paired.truncate(0)
    on = generate(paired, prompt, GREEDY, max_tokens=96, ignore_eos=True, speculative=S.SpeculativeEngine(
        S.MtpDrafter(paired), costs=costs, max_draft=4))
    assert on.tokens == off.tokens
    # the engine off drafts 4 on every step it does not pause for (measured: 48 of 96 tokens)
    assert off.stats.drafted >= 40 and off.stats.accepted <= off.stats.drafted // 4  # random weights
    assert 0 < on.stats.drafted <= 20, on.stats  # a few drafts and a probe or two (measured: 7-9)


def test_without_a_drafter_the_mtp_drafter_is_refused(plain):
    with pytest.raises(S.DrafterError, match="speculative.mtp_model"):
        S.MtpDrafter(plain)


# --------------------------------------------------------------------------
# refusals, before anything loads


def _refusal_cases(files, tmp_path):
    """name -> (drafter path, what the error must say)."""
    target, good = files
    from gemma4_files import gemma4_vocab

    _, n_vocab = gemma4_vocab()

    def variant(name, **kw):
        return write_assistant(tmp_path / name, **kw)

    llama = json.loads((good / "config.json").read_text()) | {"model_type": "llama"}
    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 100])
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((good / "config.json").read_text())
    gguf = tmp_path / "mtp-gemma4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    os.mkfifo(tmp_path / "fifo")  # opening one would block: it must never be opened
    fifo_weights = tmp_path / "fifo-weights"
    fifo_weights.mkdir()
    (fifo_weights / "config.json").write_text((good / "config.json").read_text())
    os.mkfifo(fifo_weights / "model.safetensors")
    return {
        "hidden size": (variant("wide", backbone=48),
                        "output width (backbone_hidden_size) 48, the target's hidden size 64"),
        "vocabulary": (variant("vocab", config=assistant_config(n_vocab + 3)), f"vocabulary of {n_vocab + 3} tokens, "
                                                                               f"the target's {n_vocab}"),
        "architecture": (variant("llama", config=llama), "architecture llama, expected gemma4_assistant"),
        "head size": (variant("heads", global_head_dim=32), "full_attention head size 32, the target's 64"),
        "kv heads": (variant("kv", num_key_value_heads=2, num_attention_heads=4), "KV heads 2, the target's 1"),
        "missing": (tmp_path / "nowhere", "MTP drafter not found"),
        "gguf": (gguf, "is a GGUF file, which is llama.cpp's format"),
        "no config": (tmp_path, "has no config.json"),
        "no weights": (no_weights, "no weights (model*.safetensors)"),
        "truncated": (truncated, "is truncated"),
        "fifo": (tmp_path / "fifo", "is not a model folder"),
        "fifo weights": (fifo_weights, "model.safetensors is not a regular file"),
    }


CASES = ["hidden size", "vocabulary", "architecture", "head size", "kv heads", "missing", "gguf", "no config",
         "no weights", "truncated", "fifo", "fifo weights"]


@pytest.mark.parametrize("case", CASES)
def test_a_drafter_that_cannot_be_used_is_refused_and_the_loaded_model_stays(files, tmp_path, case, monkeypatch):
    path, says = _refusal_cases(files, tmp_path)[case]
    b = MLXBackend()
    b.load(str(files[0]), LoadOptions(n_ctx=128))
    before = b.info

    def no_reading(*a, **k):  # nothing of the target may be loaded again once the drafter is refused
        raise AssertionError("the target was read before the drafter was checked")

    monkeypatch.setattr("backends.mlx_backend._read_model", no_reading)
    with pytest.raises(ModelLoadError) as err:
        b.load(str(files[0]), LoadOptions(n_ctx=128, mtp_model=str(path)))
    assert says in str(err.value)
    assert b.info is before and b.forward([2, 7]).shape == (1, before.vocab_size)  # still loaded and serving
    b.unload()


@pytest.mark.parametrize("case", ["hidden size", "architecture", "kv heads", "no weights", "truncated"])
def test_the_daemon_refuses_an_mlx_drafter_before_loading(files, tmp_path, case):
    """``drafts.mtp_model_for`` (the daemon's pre-flight, and doctor's) pairs an MLX
    folder target's configured assistant from the config files, as the backend would."""
    from assistant.config import parse_config
    from assistant.config.models import resolve_model
    from assistant.daemon.drafts import mtp_model_for

    path, says = _refusal_cases(files, tmp_path)[case]
    config = parse_config(f"models:\n  g4:\n    path: {files[0]}\n    backend: mlx\n"
                          f"    speculative:\n      mtp_model: {path}\n")
    with pytest.raises(ModelLoadError) as err:
        mtp_model_for(config, "g4", resolve_model("g4", config), "mtp")
    assert says in str(err.value), str(err.value)
    good = parse_config(f"models:\n  g4:\n    path: {files[0]}\n    speculative:\n      mtp_model: {files[1]}\n")
    assert mtp_model_for(good, "g4", resolve_model("g4", good), "auto")[0] == str(files[1])


async def test_a_drafter_that_does_not_pair_unloads_nothing(files, tmp_path, monkeypatch):
    """One model slot and no room beside it, a loaded model, then an alias whose
    assistant does not pair: refused before the loaded model is taken out to make
    room (not unloaded and loaded again)."""
    from backends import BackendRegistry

    from assistant.config import parse_config
    from assistant.daemon.registry import ModelRegistry
    from assistant.machine import hardware
    from assistant.protocol import ErrorCode, RPCError

    wide = write_assistant(tmp_path / "wide", backbone=48)
    config = parse_config(f"max_loaded_models: 1\ncontext: 256\nspeculative:\n  drafter: mtp\nmodels:\n"
                          f"  g4:\n    path: {files[0]}\n    backend: mlx\n    speculative:\n      drafter: off\n"
                          f"  g4bad:\n    path: {files[0]}\n    backend: mlx\n    speculative:\n"
                          f"      mtp_model: {wide}\n")
    async def no_room(self, worker):
        return False

    monkeypatch.setattr(ModelRegistry, "_fits_beside", no_room)
    registry = ModelRegistry(config, hardware.probe(), BackendRegistry.builtin(), lambda *a, **k: None,
                             drafting_on=lambda n: n != "g4")
    try:
        first = await registry.get("g4")
        registry.release(first)
        with pytest.raises(RPCError) as err:
            await registry.get("g4bad")
        assert err.value.code == ErrorCode.MODEL_LOAD_FAILED and "output width (backbone_hidden_size) 48" in str(
            err.value.message)
        assert registry.models["g4"] is first and not first.retired  # never taken out
    finally:
        await registry.unload_all()


def test_pairing_is_read_from_the_config_files_alone(files, tmp_path):
    from backends.mlx_mtp import pair_folders

    ok = pair_folders(*files)
    assert ok.ok and ok.kind == "assistant" and ok.why().endswith(f"pairs with {files[0]}")
    bad = pair_folders(files[0], write_assistant(tmp_path / "bad", backbone=32, num_key_value_heads=2))
    assert not bad.ok and len(bad.differences) == 3, bad.differences  # width + KV heads of both kinds
    assert "does not pair with" in bad.why() and "; " in bad.why()


def test_a_target_that_is_not_gemma4_is_refused(files, tmp_path):
    from test_mlx_backend import make_mlx_folder, tiny_gguf

    llama = make_mlx_folder(tmp_path / "llama")
    with pytest.raises(ModelLoadError, match="the target's architecture is llama"):
        MLXBackend().load(str(llama), LoadOptions(n_ctx=64, mtp_model=str(files[1])))
    gguf = tiny_gguf(tmp_path / "tiny.gguf", "llama", "F32")
    with pytest.raises(ModelLoadError, match="only beside an MLX-format Gemma 4 model folder"):
        MLXBackend().load(str(gguf), LoadOptions(n_ctx=64, mtp_model=str(files[1])))


def test_missing_mlx_vlm_is_named_with_its_extra(files, monkeypatch):
    import backends.mlx_backend as B
    import backends.mlx_mtp as M

    installed = importlib.util.find_spec("mlx_vlm") is not None
    assert ("Gemma 4 MTP assistant: mlx-vlm " if installed else "no mlx-vlm") in MLXBackend.availability()[1]
    monkeypatch.setattr(M, "spec_found", lambda name: name != "mlx_vlm")
    monkeypatch.setattr(B, "spec_found", lambda name: name != "mlx_vlm")
    assert "no mlx-vlm: pip install 'local-assistant[vlm]'" in MLXBackend.availability()[1]
    with pytest.raises(ModelLoadError, match=r"needs mlx-vlm.*local-assistant\[vlm\]"):
        MLXBackend().load(str(files[0]), LoadOptions(n_ctx=64, mtp_model=str(files[1])))


# --------------------------------------------------------------------------
# through the daemon


@pytest.mark.slow
@needs_vlm
async def test_chat_through_the_daemon_drafts_with_the_assistant(daemon_factory, files):
    from assistant.client import Client

    target, drafter = files
    config = textwrap.dedent(f"""\
        threads: 2
        context: 512
        preload: true
        model: g4
        models:
          g4:
            path: {target}
            backend: mlx
            speculative:
              drafter: mtp
              max_draft: 3
              mtp_model: {drafter}
        """)
    d = daemon_factory(config_text=config).start()
    async with await Client.connect(d.socket, client_name="test") as c:
        r = await (await c.chat(prompt="is the cat in the hat?", max_tokens=12, temperature=0.0, seed=1)).result()
        stats = r["stats"]
        assert stats["backend"] == "mlx" and stats["model"] == "g4" and stats["drafter"] == "mtp" and stats["drafter_kind"] == "assistant", stats
        assert stats["completion_tokens"] > 0 and stats["drafted"] >= stats["accepted"] >= 0
        models = (await c.call("status"))["models"]
        assert models[0]["info"]["choices"]["mtp"].startswith("assistant drafter gemma-4-tiny-assistant")
