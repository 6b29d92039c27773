"""A model path's error names what was expected, never what the file contains.

``models.load`` and ``chat`` take a path as well as an alias, so whoever can
call them can point the daemon at any file it can read. The error must not
turn the daemon into a file oracle (issue: "/etc/shadow ... starts with
b'root'"): it says what a model file should be, not the bytes it found.
"""

from __future__ import annotations

import pytest

from assistant.protocol import ErrorCode, RPCError
from backends.gguf import read_metadata
from backends.llamacpp import LlamaCppBackend
from backends.mlx_backend import MLXBackend

SECRET = b"root:$6$saltsalt$secrethash:19000:0:99999:7:::\n"


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "shadow"
    path.write_bytes(SECRET * 8)
    return path


def _leaks(message: str, path) -> bool:
    message = message.replace(str(path), "<path>")  # the path itself may say anything (pytest-of-root)
    return any(part in message for part in ("root", "secret", "salt", "$6$"))


@pytest.mark.parametrize("check", [LlamaCppBackend.check_model, MLXBackend.check_model, read_metadata],
                         ids=["llama.cpp", "mlx", "gguf-reader"])
def test_backend_errors_do_not_quote_the_file(secret_file, check):
    with pytest.raises(Exception) as info:
        check(str(secret_file))
    message = str(info.value)
    assert "GGUF" in message  # says what was expected
    assert not _leaks(message, secret_file), message


@pytest.mark.slow
async def test_daemon_load_of_a_non_model_file_quotes_nothing(assistant_daemon_factory, secret_file):
    d = assistant_daemon_factory()
    async with await d.client() as c:
        for method, params in (("models.load", {"model": str(secret_file)}),
                               ("chat", {"model": str(secret_file), "prompt": "hi", "max_tokens": 1})):
            with pytest.raises(RPCError) as info:
                await c.call(method, params) if method != "chat" else await (await c.chat(**params)).result()
            assert info.value.code == ErrorCode.MODEL_LOAD_FAILED
            assert not _leaks(info.value.message, secret_file), info.value.message
        assert (await c.call("status"))["pid"] > 0  # still serving
