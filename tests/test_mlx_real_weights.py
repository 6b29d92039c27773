"""The MLX backend's "MLX model folder" path on real weights: the embedded SmolLM2,
converted to a Hugging Face folder (``scripts/convert_for_vllm.py``, the one
vLLM serves in ``test_vllm_remote``) and from there by mlx-lm's own
``mlx_lm.convert`` into MLX folders: float32, 8-bit and 4-bit (group 64, the
layout of the mlx-community models).

The float32 folder holds the Q4_1 values exactly, so it is the same model as
the GGUF: its greedy text is llama.cpp's (measured: 40 of 40 tokens on three
prompts; teacher-forced next-token agreement 98%). The quantized folders are
mlx-lm quantizing those values again, a second rounding: 8-bit stays close
(95% agreement measured), 4-bit much less so (60-80%: SmolLM2-135M quantized
twice is a different model, its greedy text parts at once), so for 4-bit the
test asserts that it loads as what it is and answers, not its words.

The conversion needs the scale environment (``scripts/scale-setup``: torch and
transformers, kept out of the main venv); where it cannot be made, the module
is skipped with the reason. mlx-lm runs in the main venv, as the backend does.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import yaml
from remote_servers import ScaleUnavailable, chat, converted_model, reporter, scale_python

from assistant.testing import DaemonProcess, isolated_env
from backends.base import LoadOptions

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(1800),
              pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="the mlx extra is not installed")]

STORY = [{"role": "user", "content": "Write a very long story about a cat who travels the world."}]
ARITHMETIC = [{"role": "user", "content": "What is 2 + 3?"}]
# The story as SmolLM2 (llama.cpp, greedy) goes on with it: the text the next-token agreement is read on.
CONTINUATION = ("Once upon a time, in a land far, far away, there was a cat named Luna. Luna was a curious and "
                "adventurous cat who loved exploring the world. She had a tail that was a little bit different, "
                "and she loved to travel.")


@pytest.fixture(scope="module")
def hf_folder(request):
    try:
        return converted_model(scale_python(say=reporter(request.config)))
    except ScaleUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def folders(hf_folder, tmp_path_factory):
    """MLX folders made by mlx-lm's converter: float32 (as the source), 8-bit, 4-bit."""
    from mlx_lm import convert

    base = tmp_path_factory.mktemp("mlx-real")
    out = {"f32": base / "smollm2-f32", "q8": base / "smollm2-q8", "q4": base / "smollm2-q4"}
    convert(str(hf_folder), str(out["f32"]))
    convert(str(hf_folder), str(out["q8"]), quantize=True, q_bits=8)
    convert(str(hf_folder), str(out["q4"]), quantize=True, q_bits=4)
    return out


@pytest.fixture(scope="module")
def gguf():
    from assistant.config.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="module")
def llama(gguf):
    from backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend()
    b.load(str(gguf), LoadOptions(n_ctx=512, n_threads=1))  # one thread: robust on a busy 2-core box
    yield b
    b.unload()


@pytest.fixture(scope="module")
def mlx(folders):
    """One MLXBackend per folder, loaded once."""
    from backends.mlx_backend import MLXBackend

    loaded = {}
    for name, folder in folders.items():
        loaded[name] = MLXBackend()
        loaded[name].load(str(folder), LoadOptions(n_ctx=512))
    yield loaded
    for b in loaded.values():
        b.unload()


def greedy(backend, messages, n: int):
    from assistant.inference.generation import generate
    from assistant.inference.sampling import SamplingParams

    backend.truncate(0)
    prompt = backend.tokenize(backend.apply_chat_template(messages), special=True)
    return generate(backend, prompt, SamplingParams(temperature=0.0), max_tokens=n)


def picks(backend, tokens: list[int], start: int) -> np.ndarray:
    """The backend's argmax after each of ``tokens[start:]``, fed ``tokens`` (teacher forcing)."""
    backend.truncate(0)
    return backend.forward(tokens, logits_at=list(range(start, len(tokens)))).argmax(-1)


def test_the_folders_load_as_what_they_are(mlx, folders):
    from backends.mlx_folder import folder_summary

    want = {"f32": "float32", "q8": "8-bit MLX (group 64)", "q4": "4-bit MLX (group 64)"}
    for name, backend in mlx.items():
        info = backend.info
        assert info.backend == "mlx" and info.architecture == "llama" and info.quantization == want[name]
        assert info.vocab_size == 49152 and info.template_source == "model" and info.path == str(folders[name])
        assert folder_summary(folders[name])["quantization"] == want[name]
    config = json.loads((folders["f32"] / "config.json").read_text())
    # mlx-lm's llama reads rope_theta at the top (without it: 10000, and other text); the converter writes it
    assert config["rope_theta"] == 100000.0


def test_float32_folder_gives_llamacpps_greedy_text(mlx, llama):
    for messages, n in ((ARITHMETIC, 16), (STORY, 24)):
        ref, ours = greedy(llama, messages, n), greedy(mlx["f32"], messages, n)
        assert ours.text == ref.text and ours.finish_reason == ref.finish_reason, (ref.text, ours.text)
    assert ours.text.startswith("Once upon a time") and ours.stats.backend == "mlx"
    # the same template, the same tokens
    assert mlx["f32"].tokenize(mlx["f32"].apply_chat_template(STORY), special=True) == \
        llama.tokenize(llama.apply_chat_template(STORY), special=True)


def test_next_token_agreement_with_llamacpp_by_quantization(mlx, llama):
    tokens = llama.tokenize(llama.apply_chat_template(STORY + [{"role": "assistant", "content": CONTINUATION}],
                                                      add_generation_prompt=False), special=True)
    start = len(llama.tokenize(llama.apply_chat_template(STORY), special=True)) - 1
    ref = picks(llama, tokens, start)
    agree = {name: float(np.mean(picks(mlx[name], tokens, start) == ref)) for name in ("f32", "q8", "q4")}
    print(f"\nnext-token agreement with llama.cpp over {len(tokens) - start} positions: {agree}")
    assert agree["f32"] >= 0.95 and agree["q8"] >= 0.9
    assert agree["q4"] >= 0.4  # quantized twice: the same model roughly, not token for token


def test_quantized_folders_answer(mlx):
    assert greedy(mlx["q8"], ARITHMETIC, 16).text == "2 + 3 = 5"
    q4 = greedy(mlx["q4"], STORY, 12)
    assert q4.text.startswith("Once upon a time") and q4.stats.completion_tokens == 12


async def test_an_mlx_folder_alias_answers_through_the_daemon(folders, tmp_path):
    """A ``backend: mlx`` alias on the float32 folder, beside the built-in model on llama.cpp."""
    config = {"threads": 2, "context": 2048, "speculative": {"drafter": "off"},
              "models": {"smol-mlx": {"path": str(folders["f32"]), "backend": "mlx"}}}
    home = tmp_path / "daemon"
    home.mkdir()
    d = DaemonProcess(home, config_text=yaml.safe_dump(config), env=isolated_env(home)).start()
    try:
        deltas, far = await chat(d, prompt="What is 2 + 3?", model="smol-mlx", temperature=0, max_tokens=16)
        _, local = await chat(d, prompt="What is 2 + 3?", model="smollm2-135m", temperature=0, max_tokens=16)
    finally:
        d.stop()
    assert far["text"] == local["text"] == "2 + 3 = 5" and "".join(deltas) == far["text"]
    assert far["stats"]["backend"] == "mlx" and local["stats"]["backend"] == "llama.cpp"
    assert far["stats"]["prompt_tokens"] == local["stats"]["prompt_tokens"]
    assert far["stats"]["completion_tokens"] == local["stats"]["completion_tokens"]
