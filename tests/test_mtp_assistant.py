"""Gemma 4's separate MTP drafter (``gemma4-assistant``) as the ``mtp`` drafter
on llama.cpp: pairing, drafting over the target's KV cache, the engine's
guarantees, the refusals and the sibling discovery.

No real Gemma 4 weights can be downloaded here: the tests write a tiny
random ``gemma4`` target (4 layers, hidden 64) and a 2-layer assistant
(tests/gemma4_files.py). Random weights prove the plumbing, not the quality:
the target accepts almost none of the assistant's guesses, which is what the
adaptive controller must notice.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from gemma4_files import AssistantShape, Gemma4Shape, gemma4_vocab, write_assistant, write_target

from assistant.inference import speculative as S
from assistant.inference.generation import generate
from assistant.inference.sampling import SamplingParams
from backends.base import LoadOptions, ModelLoadError

pytest.importorskip("llama_cpp")
import llama_cpp.llama_cpp as C  # noqa: E402

if not hasattr(C, "LLAMA_CONTEXT_TYPE_MTP"):
    pytest.skip("this llama-cpp-python has no MTP context API", allow_module_level=True)

from backends import mtp_pairing  # noqa: E402
from backends.llamacpp import LlamaCppBackend  # noqa: E402

GREEDY = SamplingParams(temperature=0)
DRAFTERS = S.DrafterRegistry(S.BUILTIN_DRAFTERS)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma4")
    return write_target(d / "gemma4-tiny.gguf"), write_assistant(d / "mtp-gemma4-tiny.gguf")


def _load(path, mtp_model=None, n_ctx=512):
    b = LlamaCppBackend()
    b.load(str(path), LoadOptions(n_ctx=n_ctx, n_threads=2, mtp_model=None if mtp_model is None else str(mtp_model),
                                  extra={"kv_type": "q8_0/f16", "name": "tiny-gemma4"}))
    return b


@pytest.fixture(scope="module")
def paired(files):
    b = _load(*files)
    yield b
    b.unload()


@pytest.fixture(scope="module")
def plain_target(files):
    """The same target loaded without a drafter: what plain decoding gives."""
    b = _load(files[0])
    yield b
    b.unload()


def _prompt(b, text="the tea is in the hat then the rain"):
    return b.tokenize(b.apply_chat_template([{"role": "user", "content": text}]))


def test_the_assistant_pairs_with_the_target_and_drafts_over_its_cache(paired, files):
    from llama_cpp import llama_cpp_ext as X

    ok, why = paired.mtp_support()
    assert ok and paired.mtp_kind() == "assistant", why
    assert "assistant drafter mtp-gemma4-tiny.gguf (2 layer(s)" in paired.info.choices["mtp"]
    mtp = paired._mtp
    assert X.llama_get_ctx_other(mtp.ctx) == paired._ctx  # paired with the target's context
    # a draft step decodes one row: the drafter's context has small batches, not the target's 512
    from backends.llamacpp_mtp_assistant import DRAFT_N_BATCH

    assert C.llama_n_batch(paired._ctx) == 512
    assert C.llama_n_batch(mtp.ctx) == C.llama_n_ubatch(mtp.ctx) == DRAFT_N_BATCH == 8
    prompt = _prompt(paired)
    paired.truncate(0)
    tok = int(np.argmax(paired.forward(prompt)[-1]))
    target_mem, drafter_mem = C.llama_get_memory(paired._ctx), C.llama_get_memory(mtp.ctx)
    first = paired.mtp_draft(prompt + [tok], 5)
    assert len(first) == 5 and all(0 <= t < paired.info.vocab_size for t in first)
    # it writes no KV of its own: its memory is a view of the target's, at the target's end
    assert C.llama_memory_seq_pos_max(target_mem, 0) == len(prompt) - 1
    assert C.llama_memory_seq_pos_max(drafter_mem, 0) == len(prompt) - 1
    assert paired.cached_tokens == prompt
    assert paired.mtp_draft(prompt + [tok], 5) == first  # drafts depend only on the text
    paired.truncate(7)
    paired.forward(prompt[7:])
    assert paired.mtp_draft(prompt + [tok], 5) == first  # ...also after a cut and a re-evaluation
    assert paired.mtp_draft(prompt + [tok, 7], 3) == []  # not the engine's state: nothing drafted


def test_greedy_output_is_plain_decodings_and_drafts_are_verified(paired, plain_target):
    prompt = _prompt(paired)
    plain_target.truncate(0)
    plain = generate(plain_target, prompt, GREEDY, max_tokens=60)
    costs = S.CostModel()
    eager = S.SpeculativeEngine(S.MtpDrafter(paired), costs=costs, adaptive=False, max_draft=4)
    auto = S.SpeculativeEngine(DRAFTERS.make("auto", S.DraftContext(target=paired)), costs=costs)
    assert auto.name == "auto(ngram+mtp)" and auto.drafter.kind == "assistant"
    for engine in (eager, auto):
        paired.truncate(0)
        spec = generate(paired, prompt, GREEDY, max_tokens=60, speculative=engine)
        assert spec.tokens == plain.tokens, engine.name
        assert spec.text == plain.text and spec.finish_reason == plain.finish_reason
    assert eager.drafter.kind == "assistant"
    paired.truncate(0)
    spec = generate(paired, prompt, GREEDY, max_tokens=60, speculative=S.SpeculativeEngine(
        S.MtpDrafter(paired), costs=costs, adaptive=False, max_draft=4))
    assert spec.stats.drafter == "mtp" and spec.stats.drafted > 0, spec.stats  # controller off: it drafts


def test_seeded_sampling_is_plain_sampling(paired, plain_target):
    """Greedy assistant drafts are point masses: a seeded sampled request gives
    the very text plain decoding gives."""
    params = SamplingParams(temperature=0.9, top_k=40, seed=7)
    prompt = _prompt(paired, "a cat in the rain")
    plain_target.truncate(0)
    plain = generate(plain_target, prompt, params, max_tokens=50)
    paired.truncate(0)
    engine = S.SpeculativeEngine(S.MtpDrafter(paired), adaptive=False, max_draft=3)
    spec = generate(paired, prompt, params, max_tokens=50, speculative=engine)
    assert spec.tokens == plain.tokens
    assert spec.stats.drafted > 0


def test_the_controller_switches_a_drafter_that_accepts_nothing_off(paired):
    """Random weights: the target accepts (almost) none of the drafts. With the
    controller on, drafting stops after a few tries and only probes now and then."""
    prompt = _prompt(paired, "in the tea")
    costs = S.CostModel()
    eager = S.SpeculativeEngine(S.MtpDrafter(paired), costs=costs, adaptive=False, max_draft=8)
    paired.truncate(0)
    off = generate(paired, prompt, GREEDY, max_tokens=300, speculative=eager)
    paired.truncate(0)
    engine = S.SpeculativeEngine(S.MtpDrafter(paired), costs=costs, max_draft=8)
    on = generate(paired, prompt, GREEDY, max_tokens=300, speculative=engine)
    assert on.tokens == off.tokens
    assert off.stats.accepted <= off.stats.drafted // 4  # what makes it a drafter to switch off
    assert off.stats.drafted > 100
    assert on.stats.drafted <= 40, on.stats  # a few drafts and probes (4 tokens each), not 300 x 8


@pytest.mark.parametrize("case", ["architecture", "hidden size", "vocabulary size", "vocabulary texts", "bos",
                                  "not gguf", "missing", "folder", "fifo"])
def test_a_drafter_that_does_not_pair_is_refused_before_anything_loads(files, tmp_path, monkeypatch, case):
    target, _ = files
    bad = tmp_path / "mtp-bad.gguf"
    expect = {
        "architecture": "its architecture is 'gemma4', not a separate MTP drafter (gemma4-assistant)",
        "hidden size": "hidden size: the drafter's embedding_length_out is 128, the target's embedding_length is 64",
        "vocabulary size": "vocabulary: 304 tokens, the target has 301",
        "vocabulary texts": "vocabulary: the same size (301 tokens) but different token texts",
        "bos": "vocabulary: bos_token_id 1, the target's is 2",
        "not gguf": "is not a GGUF file",
        "missing": "does not exist",
        "folder": "is not a regular file",
        "fifo": "is not a regular file",
    }[case]
    if case == "architecture":
        shutil.copy(target, bad)
    elif case == "hidden size":
        write_assistant(bad, AssistantShape(target_embd=128))
    elif case == "vocabulary size":
        write_assistant(bad, vocab=gemma4_vocab(extra_pieces=3))
    elif case == "vocabulary texts":
        meta, n = gemma4_vocab()
        meta["tokenizer.ggml.tokens"] = [("▁z" if t == "▁the" else t) for t in meta["tokenizer.ggml.tokens"]]
        write_assistant(bad, vocab=(meta, n))
    elif case == "bos":
        write_assistant(bad, meta_overrides={"tokenizer.ggml.bos_token_id": 1})
    elif case == "not gguf":
        bad.write_bytes(os.urandom(4096))
    elif case == "folder":
        bad.mkdir()
    elif case == "fifo":
        os.mkfifo(bad)  # opening it would block: refused without opening
    import backends.llamacpp_load as load

    def no_load(*a, **k):
        raise AssertionError("the target was loaded before the drafter was checked")

    monkeypatch.setattr(load, "load_model", no_load)
    monkeypatch.setattr(load, "load_assistant_model", no_load)
    b = LlamaCppBackend()
    with pytest.raises(ModelLoadError) as err:
        b.load(str(target), LoadOptions(n_ctx=256, n_threads=2, mtp_model=str(bad)))
    assert expect in str(err.value) and "MTP drafter" in str(err.value), str(err.value)
    assert b._loaded is None


def test_a_truncated_drafter_is_refused_before_the_target_loads(files, tmp_path, monkeypatch):
    target, drafter = files
    cut = tmp_path / "mtp-cut.gguf"
    cut.write_bytes(drafter.read_bytes()[: drafter.stat().st_size // 2])  # the header pairs; the weights end early
    import backends.llamacpp_load as load

    def no_load(*a, **k):
        raise AssertionError("the target was loaded before the drafter")

    monkeypatch.setattr(load, "load_model", no_load)
    b = LlamaCppBackend()
    with pytest.raises(ModelLoadError, match=r"MTP drafter: .*mtp-cut.gguf is truncated or corrupt"):
        b.load(str(target), LoadOptions(n_ctx=256, n_threads=2, mtp_model=str(cut)))


def test_a_sibling_that_pairs_is_found_and_the_others_are_said_why_not(files, tmp_path):
    target = shutil.copy(files[0], tmp_path / "gemma4-tiny.gguf")
    write_assistant(tmp_path / "mtp-a-wide.gguf", AssistantShape(target_embd=128))
    (tmp_path / "mtp-b-junk.gguf").write_bytes(b"not a model")
    write_assistant(tmp_path / "mtp-c-good.gguf")
    write_assistant(tmp_path / "mtp-d-also.gguf", seed=5)
    write_assistant(tmp_path / "other-drafter.gguf")  # not named mtp-*: not looked at
    found, lines = mtp_pairing.find_sibling(target)
    assert found == str(tmp_path / "mtp-c-good.gguf")
    text = "\n".join(lines)
    assert "mtp-a-wide.gguf: ignored: does not pair: hidden size" in text
    assert "mtp-b-junk.gguf: ignored: " in text and "not a GGUF file" in text
    assert "mtp-c-good.gguf: taken: pairs with gemma4-tiny.gguf" in text
    assert "mtp-d-also.gguf: pairs too, not taken" in text
    assert "other-drafter" not in text
    assert mtp_pairing.find_sibling(tmp_path / "nothing.gguf") == (None, [])


def test_a_target_whose_last_layers_the_drafter_cannot_read_is_refused(tmp_path):
    target = write_target(tmp_path / "t.gguf", Gemma4Shape(swa_pattern=(True, True, False, True)))
    drafter = write_assistant(tmp_path / "mtp-t.gguf")
    pairing = mtp_pairing.assistant_pairing(target, drafter)
    assert not pairing.ok
    assert "the target's last two layers are not a sliding-window layer followed by a full one" in pairing.why()


def test_per_layer_kv_heads_are_read_where_the_drafter_reads_them(tmp_path):
    """The real 12B writes ``head_count_kv`` per layer (48 entries; its drafter 4):
    the drafter's sliding layers are compared with the target's layer 46, its full
    one with layer 47. Sparse 12B-shaped headers (tests/gemma4_shapes.py)."""
    import dataclasses

    from gemma4_shapes import GEMMA4_12B_ASSISTANT, write_gemma4_12b, write_gemma4_12b_assistant

    target = write_gemma4_12b(tmp_path / "gemma-4-12b-it-Q4_K_M.gguf")
    write_gemma4_12b_assistant(tmp_path / "mtp-gemma-4-12b-it-Q8_0.gguf", vocab=True)
    found, lines = mtp_pairing.find_sibling(target)
    assert found == str(tmp_path / "mtp-gemma-4-12b-it-Q8_0.gguf"), lines
    assert "mtp-gemma-4-12b-it-Q8_0.gguf: taken" in lines[0]
    wrong = dataclasses.replace(GEMMA4_12B_ASSISTANT, kv_heads_full=2, head_dim_swa=128)
    bad = write_gemma4_12b_assistant(tmp_path / "other.gguf", vocab=True, shape=wrong)
    why = mtp_pairing.assistant_pairing(target, bad).why()
    assert ("KV heads of its full-attention layers (attention.head_count_kv): drafter 2, "
            "the target's layer 47 (which they read) has 1") in why, why
    assert ("K head size of its sliding-window layers (attention.key_length_swa): drafter 128, "
            "the target's layer 46 (which they read) has 256") in why, why
    assert "sliding-window layers (attention.head_count_kv)" not in why  # 8 and 8: those pair


def test_drafting_off_loads_no_drafter(files):
    target, drafter = files
    b = LlamaCppBackend()
    b.load(str(target), LoadOptions(n_ctx=256, n_threads=2, mtp_model=str(drafter), extra={"mtp": False}))
    try:
        assert b._mtp is None and b.mtp_kind() is None
        assert "not loaded: the model was loaded with drafting off" in b.info.choices["mtp"]
        with pytest.raises(S.DrafterError, match="cannot use the 'mtp' drafter"):
            DRAFTERS.make("mtp", S.DraftContext(target=b))
    finally:
        b.unload()


# -- through the daemon: configuration, sibling discovery, refusals -------------------------


@pytest.mark.slow
async def test_the_daemon_finds_configures_and_refuses_mtp_drafters(daemon_factory, files, tmp_path):
    from assistant.client import Client
    from assistant.protocol import ErrorCode, RPCError

    target, drafter = files
    beside, alone = tmp_path / "beside", tmp_path / "alone"
    beside.mkdir(), alone.mkdir()
    shutil.copy(target, beside / "gemma4-tiny.gguf")
    shutil.copy(drafter, beside / "mtp-gemma4-tiny.gguf")
    write_assistant(beside / "mtp-a-wide.gguf", AssistantShape(target_embd=128))  # a sibling that does not pair
    shutil.copy(target, alone / "gemma4-tiny.gguf")
    wide = write_assistant(alone / "wide.gguf", AssistantShape(target_embd=128))
    d = daemon_factory(config_text=(
        "threads: 2\ncontext: 512\npreload: true\nmodel: g4\nmax_loaded_models: 3\n"
        "speculative:\n  drafter: mtp\n  max_draft: 4\n"
        f"models:\n  g4:\n    path: {beside / 'gemma4-tiny.gguf'}\n"
        f"  g4cfg:\n    path: {alone / 'gemma4-tiny.gguf'}\n    speculative:\n      mtp_model: {drafter}\n"
        f"  g4bad:\n    path: {alone / 'gemma4-tiny.gguf'}\n    speculative:\n      mtp_model: {wide}\n"
        f"  g4gone:\n    path: {alone / 'gemma4-tiny.gguf'}\n    speculative:\n"
        f"      mtp_model: {alone / 'missing.gguf'}\n"
        f"  g4plain:\n    path: {alone / 'gemma4-tiny.gguf'}\n    speculative:\n      drafter: auto\n")).start()
    client = await Client.connect(d.socket, client_name="test")

    async def ask(**kw):
        return await (await client.chat(prompt="the tea is in the hat", temperature=0, max_tokens=40, **kw)).result()

    async def choices(name):
        loaded = {m["name"]: m for m in (await client.call("models.list"))["loaded"]}
        return loaded[name]["info"]["choices"].get("mtp", "")

    try:
        off = await ask(draft="off")
        on = await ask()
        assert on["stats"]["drafter"] == "mtp" and on["stats"]["drafter_kind"] == "assistant" and on["text"] == off["text"]
        assert "assistant drafter mtp-gemma4-tiny.gguf" in await choices("g4")  # found beside the model file
        err = d.stderr()
        assert "mtp-a-wide.gguf: ignored: does not pair: hidden size" in err, err[-3000:]
        assert "mtp-gemma4-tiny.gguf: taken" in err

        cfg = await ask(model="g4cfg")
        assert cfg["stats"]["drafter"] == "mtp" and cfg["text"] == off["text"]
        assert f"assistant drafter {drafter.name}" in await choices("g4cfg")
        plain = await ask(model="g4plain")  # auto, no sibling, nothing configured: prompt lookup alone
        assert plain["stats"]["drafter"] == "auto(ngram)" and plain["text"] == off["text"]

        for name, message in (("g4bad", "hidden size: the drafter's embedding_length_out is 128, the target's "
                                        "embedding_length is 64"),
                              ("g4gone", "does not exist")):
            with pytest.raises(RPCError) as exc:
                await ask(model=name)
            assert exc.value.code == ErrorCode.MODEL_LOAD_FAILED and message in exc.value.message, exc.value
        again = await ask()  # the daemon keeps serving the model it had
        assert again["text"] == off["text"]
        assert {"g4", "g4cfg", "g4plain"} <= {m["name"] for m in (await client.call("models.list"))["loaded"]}
    finally:
        await client.close()


@pytest.mark.slow
def test_doctor_says_which_mtp_drafter_it_found_and_why(files, tmp_path):
    from assistant.testing import run_cli

    target, drafter = files
    shutil.copy(target, tmp_path / "gemma4-tiny.gguf")
    shutil.copy(drafter, tmp_path / "mtp-gemma4-tiny.gguf")
    write_assistant(tmp_path / "mtp-a-wide.gguf", AssistantShape(target_embd=128))
    config = tmp_path / "config.yaml"
    config.write_text(f"model: g4\nmodels:\n  g4:\n    path: {tmp_path / 'gemma4-tiny.gguf'}\n")
    out = run_cli("doctor", config=config)
    assert f"mtp:      {tmp_path / 'mtp-gemma4-tiny.gguf'} (drafter auto)" in out.stdout, out.stdout + out.stderr
    assert "mtp-a-wide.gguf: ignored: does not pair: hidden size" in out.stdout
    assert "mtp-gemma4-tiny.gguf: taken: pairs with gemma4-tiny.gguf" in out.stdout

    config.write_text(f"model: g4\nspeculative:\n  mtp_model: {tmp_path / 'mtp-a-wide.gguf'}\n"
                      f"models:\n  g4:\n    path: {tmp_path / 'gemma4-tiny.gguf'}\n")
    out = run_cli("doctor", config=config)
    assert "mtp:      none (drafter auto)" in out.stdout, out.stdout
    assert "problem:  MTP drafter for model g4: MTP drafter" in out.stdout and "hidden size" in out.stdout
    assert "Traceback" not in out.stderr

    config.write_text(f"model: g4\nspeculative:\n  drafter: ngram\n"
                      f"models:\n  g4:\n    path: {tmp_path / 'gemma4-tiny.gguf'}\n")
    out = run_cli("doctor", config=config)
    assert "mtp:      none (drafter ngram)" in out.stdout and "not looked for: the 'ngram' drafter uses none" in out.stdout


def test_which_drafter_the_daemon_loads_a_model_with(files, tmp_path):
    """``drafts.mtp_model_for``: the decision behind the daemon's loads and doctor."""
    from assistant.config import load_config
    from assistant.config.models import resolve_model
    from assistant.daemon.drafts import mtp_model_for

    target, drafter = files
    shutil.copy(target, tmp_path / "g.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(drafter.read_bytes()[:-1000])
    os.mkfifo(tmp_path / "pipe.gguf")

    def decide(mtp_model, drafter_name="mtp"):
        cfg = tmp_path / "config.yaml"
        extra = f"    speculative:\n      mtp_model: {mtp_model}\n" if mtp_model else ""
        cfg.write_text(f"models:\n  g:\n    path: {tmp_path / 'g.gguf'}\n{extra}")
        config = load_config(cfg)
        return mtp_model_for(config, "g", resolve_model("g", config), drafter_name)

    assert decide(drafter) == (str(drafter), [f"{drafter.name}: configured (speculative.mtp_model)"])
    assert decide(drafter, "ngram") == (None, [f"speculative.mtp_model {drafter} not loaded: "
                                               "the drafter is 'ngram'"])
    assert decide(None) == (None, [])  # nothing configured, no sibling
    with pytest.raises(ModelLoadError, match=r"truncated model file: its tensors need [\d,]+ bytes but the file has"):
        decide(cut)
    with pytest.raises(ModelLoadError, match="is not a regular file or folder"):
        decide(tmp_path / "pipe.gguf")
    shutil.copy(drafter, tmp_path / "mtp-g.gguf")
    assert decide(None, "auto")[0] == str(tmp_path / "mtp-g.gguf")  # the sibling
    (tmp_path / "mtp-g.gguf").write_bytes(drafter.read_bytes()[:-1000])  # the sibling pairs but is cut short
    used, lines = decide(None, "auto")
    assert used is None and "mtp-g.gguf: ignored after all: " in lines[-1] and "truncated" in lines[-1]


@pytest.mark.parametrize("where", ["alias", "top level"])
def test_a_relative_mtp_model_is_the_config_files_folders(files, tmp_path, monkeypatch, where):
    """As relative model paths are: from the config file's folder, not the daemon's working directory."""
    from assistant.config import load_config
    from assistant.config.models import resolve_model
    from assistant.daemon.drafts import configured_mtp_model, mtp_model_for

    conf = tmp_path / "conf"
    (conf / "drafters").mkdir(parents=True)
    shutil.copy(files[0], conf / "g.gguf")
    drafter = shutil.copy(files[1], conf / "drafters" / "d.gguf")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec_text = "speculative:\n  mtp_model: drafters/d.gguf\n"
    cfg = conf / "config.yaml"
    if where == "alias":
        cfg.write_text("models:\n  g:\n    path: g.gguf\n    " + spec_text.replace("\n  ", "\n      "))
    else:
        cfg.write_text(spec_text + "models:\n  g:\n    path: g.gguf\n")
    config = load_config(cfg)
    assert configured_mtp_model(config, "g") == str(drafter)
    assert mtp_model_for(config, "g", resolve_model("g", config), "mtp")[0] == str(drafter)


# -- the memory plan in the daemon's loads ------------------------------------------------


async def test_the_daemon_sizes_the_context_with_the_memory_plan_drafter_included(files, tmp_path):
    """``context: auto`` through the registry (the daemon's one load path): the llama.cpp
    load picks the largest context whose plan (weights, the drafter, KV, compute, OS
    headroom) fits. RAM available = the plan at 1024 tokens, drafter included: 1024."""
    import dataclasses

    from backends import BackendRegistry
    from backends.gguf import read_header
    from backends.memory_plan import plan_for_load

    from assistant.config import parse_config
    from assistant.daemon.registry import ModelRegistry, _memory_needed
    from assistant.machine import hardware

    target = shutil.copy(files[0], tmp_path / "gemma4-tiny.gguf")
    drafter = shutil.copy(files[1], tmp_path / "mtp-gemma4-tiny.gguf")
    extra = {"kv_type": "q8_0/f16", "memory_plan": True}
    at_1024 = plan_for_load(target, 1024, extra, mtp_model=str(drafter)).needed
    without = plan_for_load(target, 1024, extra).needed
    assert at_1024 - without >= read_header(drafter).tensor_bytes  # the drafter is in the plan
    machine = dataclasses.replace(hardware.probe(), ram_total_bytes=64 << 30, ram_available_bytes=at_1024)
    config = parse_config(f"threads: 2\nspeculative:\n  drafter: mtp\nmodels:\n  g4:\n    path: {target}\n")
    registry = ModelRegistry(config, machine, BackendRegistry.builtin(), lambda *a, **k: None,
                             drafting_on=lambda n: True)
    try:
        worker = await registry.get("g4")
        info = worker.backend.info
        assert worker.options.extra["memory_plan"] is True and worker.options.mtp_model == str(drafter)
        assert info.context_length == 1024, info.choices["context"]
        assert info.choices["context"].startswith("1024: the largest context whose memory plan fits")
        assert "assistant drafter mtp-gemma4-tiny.gguf" in info.choices["mtp"]
        # sizing a second instance counts the drafter too, from the same plan
        model, kv = _memory_needed(worker.spec, dataclasses.replace(worker.options, n_ctx=1024))
        assert model + kv == at_1024
        registry.release(worker)
    finally:
        await registry.unload_all()


def test_sizing_a_folder_model_counts_its_drafter_folder(tmp_path):
    """An MLX folder with an assistant folder beside it: no GGUF plan, the two folders' weights."""
    from assistant.config.models import ModelSpec
    from assistant.daemon.registry import _memory_needed

    model, assistant = tmp_path / "g4-mlx", tmp_path / "g4-assistant-mlx"
    for d, n in ((model, 3000), (assistant, 1000)):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * n)
    spec = ModelSpec(name="g4", path=model)
    size, _ = _memory_needed(spec, LoadOptions(n_ctx=512, mtp_model=str(assistant)))
    assert size == 4000
    size, _ = _memory_needed(spec, LoadOptions(n_ctx=512, mtp_model=str(assistant), extra={"mtp": False}))
    assert size == 3000
