"""Per-machine profiles, per-backend model files and the backend choice (pure functions, no model)."""

from __future__ import annotations

import json
import textwrap
from dataclasses import astuple

import pytest

from backends import BUILTIN_BACKENDS

from assistant.machine import hardware
from assistant.config import Config, ConfigError, Profile, check_backends, parse_config
from assistant.machine.choice import choose_backend
from assistant.machine.hardware import Machine
from assistant.config.models import ModelNotFoundError, resolve_model
from assistant.machine.profiles import apply_profile, check_profiles, matches, select_profile
from backends.base import BackendUnavailable, ModelLoadError
from conftest import run_cli


def machine(**changes) -> Machine:
    base = dict(os="linux", arch="x86_64", platform_tag="linux-x86_64", hostname="build-box.example.com",
                cpu_model="x", physical_cores=8, logical_cores=16, ram_total_bytes=32 << 30,
                ram_available_bytes=16 << 30, apple_silicon=False, chip=None)
    base.update(changes)
    return Machine(**base)


def mac(**changes) -> Machine:
    return machine(**{**dict(os="darwin", arch="arm64", platform_tag="darwin-arm64", hostname="Ada-MBP.local",
                             apple_silicon=True, chip="Apple M2 Pro", gpu=["metal"], performance_cores=8,
                             unified_memory=True), **changes})


def config(text: str) -> Config:
    return parse_config(textwrap.dedent(text))


PROFILES = """
backend: auto
model: smollm2-135m
threads: auto
context: auto
profiles:
  ada-laptop:
    hostname: ada-mbp
    context: 8192
  macs:
    platform: darwin-arm64
    backend: mlx
    model: gemma
    threads: 8
  builders:
    hostname: "build-*"
    platform: "linux-*"
    backend: llama.cpp
    threads: 16
    context: 16384
"""


# -- the backend choice -------------------------------------------------------


def test_auto_picks_llama_cpp_here_even_with_mlx_installed():
    here = hardware.probe()
    available = hardware.backend_availability()
    name, why = astuple(choose_backend("auto", here, available))
    if here.os == "darwin" and here.arch == "arm64":
        pytest.skip("this test describes a non-Apple machine")
    assert name == "llama.cpp" and "only picked on Apple Silicon" in why
    assert here.unified_memory is False


def test_auto_picks_mlx_for_a_faked_apple_silicon_machine():
    available = {"llama.cpp": (True, "found"), "mlx": (True, "mlx-lm found")}
    name, why = astuple(choose_backend("auto", mac(), available))
    assert name == "mlx" and "Apple Silicon" in why
    # the same machine without mlx-lm: llama.cpp, and the reason says why
    name, why = astuple(choose_backend("auto", mac(), {**available, "mlx": (False, "mlx-lm not installed")}))
    assert name == "llama.cpp" and "mlx-lm not installed" in why
    # a pinned backend wins over the machine
    assert choose_backend("llama.cpp", mac(), available).name == "llama.cpp"


# -- matching ---------------------------------------------------------------------


def test_match_by_hostname_is_case_insensitive_and_accepts_the_short_name():
    p = Profile(hostname="ada-mbp")
    assert matches(p, mac())[0]  # "Ada-MBP.local": short name, any case
    assert matches(Profile(hostname="ADA-MBP.LOCAL"), mac())[0]
    assert not matches(p, machine(hostname="ada-mbp2"))[0]
    ok, why = matches(Profile(hostname="build-*"), machine())
    assert ok and "build-box.example.com" in why


def test_match_by_platform_glob_and_os():
    assert matches(Profile(platform="darwin-arm64"), mac())[0]
    assert matches(Profile(platform="darwin-*"), mac())[0]
    assert matches(Profile(platform="darwin"), mac())[0]
    assert not matches(Profile(platform="darwin-arm64"), machine())[0]
    assert not matches(Profile(platform="darwin-arm64"), mac(arch="x86_64", platform_tag="darwin-x86_64"))[0]
    ok, why = matches(Profile(platform="linux-arm64"), machine())
    assert not ok and "linux-x86_64 does not match 'linux-arm64'" in why


def test_both_selectors_must_match():
    p = Profile(hostname="build-*", platform="darwin-*")
    assert not matches(p, machine())[0]
    assert matches(Profile(hostname="build-*", platform="linux-*"), machine())[0]


def test_first_match_in_file_order_wins():
    cfg = config(PROFILES)
    assert list(cfg.profiles) == ["ada-laptop", "macs", "builders"]
    # Ada's Mac matches both "ada-laptop" and "macs": the first one written applies, alone.
    name, _profile, why = select_profile(cfg.profiles, mac())
    assert name == "ada-laptop" and "hostname" in why
    effective, choice = apply_profile(cfg, mac())
    assert choice.name == "ada-laptop" and choice.settings == {"context": 8192}
    assert effective.context == 8192 and effective.backend == "auto"  # "macs" did not apply
    # another Mac gets "macs"
    effective, choice = apply_profile(cfg, mac(hostname="studio.local"))
    assert choice.name == "macs"
    assert (effective.backend, effective.model, effective.threads, effective.context) == ("mlx", "gemma", 8, "auto")


def test_apply_sets_backend_model_threads_context_and_leaves_the_config_alone():
    cfg = config(PROFILES)
    effective, choice = apply_profile(cfg, machine())
    assert choice.name == "builders" and "platform linux-x86_64 matches" in choice.reason
    assert (effective.backend, effective.threads, effective.context, effective.model) == \
        ("llama.cpp", 16, 16384, "smollm2-135m")
    assert (cfg.backend, cfg.threads, cfg.context) == ("auto", "auto", "auto")  # not mutated
    assert effective.generation == cfg.generation and effective.source == cfg.source


def test_no_match_and_no_profiles():
    cfg = config(PROFILES)
    other = machine(hostname="pi", os="linux", arch="arm64", platform_tag="linux-arm64")
    effective, choice = apply_profile(cfg, other)
    assert choice.name is None and "no profile matches pi (linux-arm64)" in choice.reason
    assert effective is cfg
    effective, choice = apply_profile(Config(), machine())
    assert choice.name is None and choice.reason == "no profiles in the config"


def test_profile_naming_an_unknown_backend_is_a_clear_error():
    with pytest.raises(ConfigError) as err:  # reading accepts any name: plugins may register it
        check_backends(config("""
            profiles:
              mac:
                platform: darwin-arm64
                backend: tensorrt
        """), BUILTIN_BACKENDS)
    msg = str(err.value)
    assert "profiles.mac.backend" in msg and "tensorrt" in msg and "llama.cpp" in msg and err.value.line == 5
    # A config built in code, or a backend no longer registered, is caught when the profile is applied.
    cfg = Config(profiles={"mac": Profile(platform="darwin-arm64", backend="tensorrt")})
    with pytest.raises(ConfigError, match=r"profiles\.mac\.backend: unknown backend 'tensorrt'"):
        apply_profile(cfg, mac())
    with pytest.raises(ConfigError, match="unknown backend 'mlx'"):
        check_profiles(Config(profiles={"m": Profile(platform="x", backend="mlx")}), known_backends=["llama.cpp"])


def test_profile_backends_are_checked_against_the_registry_names_with_their_line():
    cfg = config("""
        profiles:
          mac:
            platform: darwin-arm64
            backend: scripted
    """)
    with pytest.raises(ConfigError) as err:
        apply_profile(cfg, mac())  # the built-ins only
    assert (err.value.key, err.value.line) == ("profiles.mac.backend", 5)  # the text starts with a newline
    assert err.value.detail == "unknown backend 'scripted' (known: auto, llama.cpp, mlx, remote)"
    effective, choice = apply_profile(cfg, mac(), known_backends=["llama.cpp", "mlx", "scripted"])
    assert effective.backend == "scripted" and choice.name == "mac"


def test_profile_without_selector_and_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match=r"profiles\.x: a profile needs hostname or platform"):
        config("profiles:\n  x:\n    backend: mlx\n")
    with pytest.raises(ConfigError, match=r"profiles\.x\.threads: expected 'auto' or an integer >= 1"):
        config("profiles:\n  x:\n    platform: linux-*\n    threads: 0\n")
    with pytest.raises(ConfigError, match=r"profiles\.x: unknown key 'hostnme'.*did you mean 'hostname'"):
        config("profiles:\n  x:\n    hostnme: box\n")


# -- a model alias with a file per backend -----------------------------------------


@pytest.fixture
def two_files(tmp_path):
    gguf = tmp_path / "gemma.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    folder = tmp_path / "gemma-mlx"
    folder.mkdir()
    return gguf, folder


def test_alias_resolves_the_file_of_the_chosen_backend(two_files, tmp_path):
    gguf, folder = two_files
    cfg = config(f"""
        models:
          gemma:
            path: {gguf}
            context: 4096
            paths:
              mlx: {folder}
    """)
    assert cfg.models["gemma"].paths == {"mlx": str(folder)}
    assert resolve_model("gemma", cfg).path == gguf
    assert resolve_model("gemma", cfg, backend="mlx").path == folder
    assert resolve_model("gemma", cfg, backend="llama.cpp").path == gguf  # no entry: path
    spec = resolve_model("gemma", cfg)
    mlx_spec = spec.for_backend("mlx", check=False)
    assert mlx_spec.path == folder and mlx_spec.context == 4096 and spec.path == gguf
    assert spec.for_backend("llama.cpp", check=False).path == gguf


def test_alias_whose_default_path_is_missing_still_serves_its_backend_file(two_files, tmp_path):
    _gguf, folder = two_files
    cfg = config(f"""
        models:
          gemma:
            path: {tmp_path / 'not-on-this-machine.gguf'}
            paths: {{mlx: {folder}}}
    """)
    spec = resolve_model("gemma", cfg)  # no error yet: the backend decides
    assert spec.missing and spec.for_backend("mlx", check=False).path == folder
    with pytest.raises(ModelNotFoundError, match="not-on-this-machine.gguf"):
        spec.for_backend("llama.cpp", check=False)
    cfg.models["gemma"].paths = {"mlx": str(tmp_path / "gone")}
    with pytest.raises(ModelNotFoundError, match="the file for mlx was not found"):
        resolve_model("gemma", cfg).for_backend("mlx", check=False)


def test_per_backend_path_checks_and_errors(two_files):
    gguf, folder = two_files
    with pytest.raises(ConfigError, match=r"models\.g\.paths: unknown key 'mxl'.*did you mean 'mlx'") as err:
        check_backends(config(f"models:\n  g:\n    path: {gguf}\n    paths: {{mxl: {folder}}}\n"), BUILTIN_BACKENDS)
    assert err.value.line == 4
    cfg = config(f"models:\n  g:\n    path: {gguf}\n    paths: {{mlx: {folder}}}\n")
    # With check, the backend looks at the file first: an empty folder is no MLX model.
    with pytest.raises(ModelLoadError, match="is not a model folder"):
        resolve_model("g", cfg).for_backend("mlx")
    with pytest.raises(ModelLoadError, match="is a directory"):  # llama.cpp given the MLX folder
        resolve_model("g", cfg, backend="mlx").for_backend("llama.cpp")


def test_per_backend_path_of_a_plugin_backend_is_checked_by_its_class(two_files, tmp_path):
    gguf, _folder = two_files
    mine = tmp_path / "for-tiny.bin"
    mine.write_bytes(b"tiny")

    class Picky:  # what the registry holds under "tiny": only check_model matters here
        @classmethod
        def check_model(cls, path):
            if not path.endswith(".bin"):
                raise ModelLoadError(f"tiny wants a .bin file, not {path}")

    cfg = config(f"models:\n  g:\n    path: {gguf}\n    paths: {{tiny: {mine}}}\n")
    spec = resolve_model("g", cfg)
    assert spec.for_backend("tiny", backend_class=Picky).path == mine
    with pytest.raises(ModelLoadError, match="tiny wants a .bin file"):
        spec.for_backend("llama.cpp", backend_class=Picky)  # the alias's default path
    with pytest.raises(BackendUnavailable, match="unknown backend 'tiny'"):
        spec.for_backend("tiny")  # no class given: only the built-ins are known


def test_example_config_documents_profiles_and_paths():
    from conftest import ROOT

    text = (ROOT / "config.example.yaml").read_text()
    assert "\nprofiles: {}\n" in text and "paths" in text and "FIRST match applies" in text
    assert parse_config(text).profiles == {}


# -- assistant doctor ------------------------------------------------------------


def test_doctor_says_which_profile_applied(isolated_home):
    import socket

    cfg = isolated_home / "config.yaml"
    host = socket.gethostname()
    cfg.write_text(textwrap.dedent(f"""
        profiles:
          elsewhere:
            hostname: "not-{host}"
            context: 512
          here:
            hostname: "{host}"
            backend: llama.cpp
            context: 1024
    """))
    out = run_cli("doctor", "--json", config=cfg)
    report = json.loads(out.stdout)
    assert report["profile"]["name"] == "here" and host in report["profile"]["reason"]
    assert report["profile"]["settings"] == {"backend": "llama.cpp", "context": 1024}
    assert report["backend"]["configured"] == "llama.cpp" and report["model"]["context"] == 1024
    text = run_cli("doctor", config=cfg).stdout
    assert "profile:  here (profile 'here': hostname" in text
    cfg.write_text("backend: auto\n")
    assert "profile:  none (no profiles in the config)" in run_cli("doctor", config=cfg).stdout
