"""Switching backends in a running daemon, and profiles applied by the daemon.

The real daemon, the real SmolLM2 weights, llama.cpp and MLX (mlx[cpu]).
MLX runs SmolLM2 at a few tokens/s here, so MLX replies are kept short.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import textwrap

import pytest

from assistant.client import Client
from assistant.protocol import ErrorCode, RPCError
from conftest import TEST_CONFIG, run_cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="the mlx extra is not installed"),
]

GREEDY = {"temperature": 0.0, "seed": 1}
QUESTION = "Tell me the capital of France."


def _loaded(status: dict) -> dict[str, dict]:
    return {m["name"]: m for m in status["models"]}


async def test_models_load_switches_backend_without_restart(daemon_factory, isolated_home):
    d = daemon_factory().start()
    async with await Client.connect(d.socket, client_name="test") as c:
        first = await (await c.chat(prompt=QUESTION, max_tokens=12, **GREEDY)).result()
        assert first["stats"]["backend"] == "llama.cpp" and "Paris" in first["text"]

        loaded = await c.call("models.load", {"model": "smollm2-135m", "backend": "mlx", "context": 512})
        assert loaded["backend"] == "mlx" and loaded["info"]["backend"] == "mlx"
        assert loaded["info"]["quantization"] == "Q4_1" and loaded["info"]["context_length"] == 512
        r = await (await c.chat(prompt=QUESTION, max_tokens=8, **GREEDY)).result()
        assert r["stats"]["backend"] == "mlx" and r["text"].startswith("The capital of France is Paris")
        assert [m["backend"] for m in (await c.call("status"))["models"]] == ["mlx"]

        # back to llama.cpp, same daemon (pid unchanged)
        pid = (await c.call("status"))["pid"]
        back = await c.call("models.load", {"model": "smollm2-135m", "backend": "llama.cpp"})
        assert back["backend"] == "llama.cpp"
        r = await (await c.chat(prompt=QUESTION, max_tokens=12, **GREEDY)).result()
        assert r["stats"]["backend"] == "llama.cpp" and r["text"] == first["text"]
        st = await c.call("status")
        assert st["pid"] == pid and [m["backend"] for m in st["models"]] == ["llama.cpp"]

        # chat itself takes a backend: it reloads the model with it first
        r = await (await c.chat(prompt=QUESTION, max_tokens=3, backend="mlx", **GREEDY)).result()
        assert r["stats"]["backend"] == "mlx"


async def test_bad_loads_fail_clearly_and_the_loaded_model_stays(daemon_factory, isolated_home):
    from assistant.config.models import resolve_model

    not_a_model = isolated_home / "holiday-photos"
    not_a_model.mkdir()
    (not_a_model / "beach.jpg").write_bytes(b"\xff\xd8\xff" + b"\0" * 100)
    alien = isolated_home / "alien-model"
    alien.mkdir()
    (alien / "config.json").write_text(json.dumps({"model_type": "frobnicator9000"}))
    (alien / "model.safetensors").write_bytes(b"\0" * 16)
    (alien / "tokenizer.json").write_text("{}")
    gemma = resolve_model("gemma3-270m").path  # Q4_K_M, assembled once per session

    d = daemon_factory().start()
    async with await Client.connect(d.socket, client_name="test") as c:
        await (await c.chat(prompt=QUESTION, max_tokens=2, **GREEDY)).result()
        before = _loaded(await c.call("status"))["smollm2-135m"]
        assert before["requests_done"] == 1  # a reload would start a new worker at 0

        cases = [
            ({"model": str(not_a_model), "backend": "mlx"}, ErrorCode.MODEL_LOAD_FAILED, "is not a model folder"),
            ({"model": str(alien), "backend": "mlx"}, ErrorCode.MODEL_LOAD_FAILED, "'frobnicator9000'"),
            ({"model": str(gemma), "backend": "mlx"}, ErrorCode.MODEL_LOAD_FAILED, "Q4_K_M"),
            ({"model": "smollm2-135m", "backend": "tensorrt"}, ErrorCode.BACKEND_UNAVAILABLE, "tensorrt"),
            ({"model": str(not_a_model), "backend": "llama.cpp"}, ErrorCode.MODEL_LOAD_FAILED, "is a directory"),
        ]
        for params, code, words in cases:
            with pytest.raises(RPCError) as err:
                await c.call("models.load", params)
            assert err.value.code == code, (params, err.value.message)
            assert words in err.value.message, err.value.message
            after = _loaded(await c.call("status"))
            assert list(after) == ["smollm2-135m"], (params, after)
            kept = after["smollm2-135m"]
            assert kept["backend"] == "llama.cpp" and kept["state"] == "ready"
            assert kept["requests_done"] == 1 and kept["info"] == before["info"]  # the same load, not a reload
        r = await (await c.chat(prompt=QUESTION, max_tokens=12, **GREEDY)).result()
        assert "Paris" in r["text"] and r["stats"]["backend"] == "llama.cpp"
        assert _loaded(await c.call("status"))["smollm2-135m"]["requests_done"] == 2


async def test_daemon_applies_the_matching_profile(daemon_factory, isolated_home):
    host = socket.gethostname()
    config = TEST_CONFIG.replace("context: 2048\n", "") + textwrap.dedent(f"""
        models:
          smol:
            path: /nonexistent/smollm2.gguf
            paths:
              mlx: smollm2-135m
              llama.cpp: smollm2-135m
        profiles:
          somewhere-else:
            hostname: "not-{host}"
            context: 300
          this-machine:
            hostname: "{host}"
            backend: mlx
            model: smol
            context: 640
    """)
    d = daemon_factory(config_text=config).start()
    async with await Client.connect(d.socket, client_name="test") as c:
        r = await (await c.chat(prompt=QUESTION, max_tokens=3, **GREEDY)).result()
        assert r["model"] == "smol" and r["stats"]["backend"] == "mlx"
        m = _loaded(await c.call("status"))["smol"]
        assert m["backend"] == "mlx" and m["info"]["context_length"] == 640
    # and the CLI switches the same alias to llama.cpp (its own file for llama.cpp) without a restart
    out = run_cli("models", "load", "smol", "--backend", "llama.cpp", "--json", socket_path=d.socket, config=d.config)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["backend"] == "llama.cpp"
    ask = run_cli("ask", QUESTION, "--json", "-t", "0", "-n", "3", "--backend", "mlx",
                  socket_path=d.socket, config=d.config)
    assert ask.returncode == 0, ask.stderr
    assert json.loads(ask.stdout)["stats"]["backend"] == "mlx"
