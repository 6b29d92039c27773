"""Config loading: defaults, the example file, and errors that name file, line and key."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest
import yaml

from assistant import config as cfg
from assistant import paths
from assistant.config import (
    Config,
    ConfigError,
    GenerationDefaults,
    ModelEntry,
    check_backends,
    dump_effective,
    load_config,
    parse_config,
)
from backends import BUILTIN_BACKENDS

EXAMPLE = Path(__file__).parents[1] / "config.example.yaml"


@pytest.fixture(autouse=True)
def isolated_config_dir(tmp_path, monkeypatch):
    """Point the default config location at an empty temp dir (on every OS)."""
    home = tmp_path / "config-home"
    monkeypatch.setattr(paths, "config_dir", lambda: home)
    monkeypatch.delenv("ASSISTANT_CONFIG", raising=False)
    return home


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def error_for(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# --- defaults ---------------------------------------------------------------


def test_no_file_gives_defaults():
    config = load_config()
    assert config.source is None
    assert config.model == "smollm2-135m"
    assert config.backend == "auto"
    assert config.context == "auto" and config.threads == "auto"
    assert config.max_loaded_models == 1
    assert config.preload is True
    assert config.system_prompt is None
    assert config.log_level == "info"
    assert config.max_line_bytes == 16 * 1024 * 1024
    assert config.generation == GenerationDefaults(
        temperature=0.7, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0, max_tokens=512, seed=None
    )
    assert config.models == {}
    assert config == Config()


def test_file_at_default_location_is_read(isolated_config_dir):
    isolated_config_dir.mkdir()
    (isolated_config_dir / "config.yaml").write_text("model: gemma3-270m\n")
    config = load_config()
    assert config.model == "gemma3-270m"
    assert config.source == isolated_config_dir / "config.yaml"


@pytest.mark.parametrize("text", ["", "# only comments\n", "---\n"])
def test_empty_file_gives_defaults(tmp_path, text):
    path = write(tmp_path, text)
    config = load_config(path)
    assert config.source == path
    assert dataclasses.replace(config, source=None) == Config()


def test_example_file_loads_and_equals_defaults():
    config = load_config(EXAMPLE)
    assert config.source == EXAMPLE
    assert config.to_dict() == Config().to_dict()


def test_example_file_documents_every_key():
    text = EXAMPLE.read_text()
    keys = list(cfg.SCHEMA) + [f"  {k}:" for k in cfg.GENERATION_FIELDS]
    for key in keys:
        assert key.strip() in text, f"{key.strip()} is not in config.example.yaml"
    for key in cfg.MODEL_FIELDS:
        assert f"#   {key}" in text, f"models.*.{key} is not documented"
    # Each top-level key is preceded by a comment line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line and not line.startswith((" ", "#")):
            assert lines[i - 1].startswith("#"), f"no comment above {line!r}"


def test_example_models_block_is_valid_when_uncommented(tmp_path):
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# models:")
    block = []
    for line in lines[start:]:  # the contiguous commented block that starts there
        if not (line.startswith("# ") or line == "#"):
            break
        block.append(line[2:])
    config = load_config(write(tmp_path, "\n".join(block) + "\n"))
    gemma = config.models["gemma"]
    assert gemma.path == str(Path("~/models/gemma-3-4b-it-Q4_K_M.gguf").expanduser())
    assert gemma.context == 8192
    assert "{% for m in messages %}" in config.models["gemma-mlx"].chat_template


def test_dataclasses_match_schema():
    def names(cls):
        return [f.name for f in dataclasses.fields(cls) if f.name not in ("source", "given", "lines")]  # not keys

    assert names(Config) == list(cfg.SCHEMA)
    assert names(GenerationDefaults) == list(cfg.GENERATION_FIELDS)
    assert names(ModelEntry) == list(cfg.MODEL_FIELDS)


# --- values -------------------------------------------------------------------


def test_values_are_read_and_typed(tmp_path):
    config = load_config(write(tmp_path, """
        model: gemma
        backend: llama.cpp
        context: 8192
        threads: 6
        preload: false
        system_prompt: |
          Be brief.
          Be kind.
        generation:
          temperature: 0        # an int is fine for a float field
          top_p: 1
          seed: 42
        models:
          gemma:
            path: ~/models/gemma.gguf
            backend: mlx
            context: 16384
    """))
    assert config.context == 8192 and config.threads == 6 and config.preload is False
    assert config.system_prompt == "Be brief.\nBe kind.\n"
    assert config.generation.temperature == 0.0 and isinstance(config.generation.temperature, float)
    assert config.generation.top_p == 1.0 and config.generation.seed == 42
    assert config.generation.max_tokens == 512  # untouched keys keep defaults
    assert config.models == {
        "gemma": ModelEntry(path=str(Path.home() / "models/gemma.gguf"), backend="mlx", context=16384)
    }


def test_to_dict_round_trip(tmp_path):
    original = load_config(write(tmp_path, """
        model: gemma
        context: 2048
        system_prompt: "Line one.\\nLine two."
        generation: {temperature: 0.2, seed: 7}
        models:
          gemma: {path: /models/g.gguf, threads: 2, chat_template: "{{ messages }}\\n"}
    """))
    data = original.to_dict()
    assert data["generation"]["seed"] == 7
    assert data["models"]["gemma"]["threads"] == 2

    dumped = dump_effective(original)
    assert yaml.safe_load(dumped) == data
    again = load_config(write(tmp_path, dumped, "again.yaml"))
    assert again.to_dict() == data
    assert dataclasses.replace(again, source=None) == dataclasses.replace(original, source=None)


def test_dump_effective_of_defaults_lists_every_key():
    data = yaml.safe_load(dump_effective(Config()))
    assert list(data) == list(cfg.SCHEMA)
    assert list(data["generation"]) == list(cfg.GENERATION_FIELDS)


def test_null_section_means_defaults(tmp_path):
    config = load_config(write(tmp_path, "generation:\n  # temperature: 1.0\nmodels:\n"))
    assert config.generation == GenerationDefaults() and config.models == {}


# --- errors -------------------------------------------------------------------


def test_invalid_yaml_names_file_line_and_column(tmp_path):
    err = error_for(tmp_path, """
        model: smollm2-135m
        generation:
          temperature: 0.7
         top_p: 0.9
    """)
    assert err.path == tmp_path / "config.yaml"
    assert err.line == 4 and err.column is not None
    assert str(err).startswith(f"{tmp_path / 'config.yaml'}:4:")
    assert "invalid YAML" in str(err)


def test_unknown_key_names_key_line_and_suggestion(tmp_path):
    err = error_for(tmp_path, """
        backend: auto

        modle: gemma
    """)
    message = str(err)
    assert message.startswith(f"{tmp_path / 'config.yaml'}:3: unknown key 'modle'")
    assert "known keys: backend, context," in message
    assert "did you mean 'model'?" in message
    assert err.line == 3


def test_unknown_nested_key(tmp_path):
    err = error_for(tmp_path, """
        generation:
          temprature: 0.5
    """)
    assert str(err).startswith(f"{tmp_path / 'config.yaml'}:2: generation: unknown key 'temprature'")
    assert "did you mean 'temperature'?" in str(err)


def test_wrong_type_names_key_line_and_expectation(tmp_path):
    err = error_for(tmp_path, """
        model: smollm2-135m
        max_loaded_models: two
    """)
    assert str(err) == (f"{tmp_path / 'config.yaml'}:2: max_loaded_models: "
                        f"expected an integer >= 1, got 'two'")
    assert err.key == "max_loaded_models" and err.line == 2


def test_nested_key_line_number(tmp_path):
    err = error_for(tmp_path, """
        # comment
        model: smollm2-135m
        backend: auto
        context: auto
        threads: auto
        generation:
          temperature: hot
    """)
    assert str(err) == (f"{tmp_path / 'config.yaml'}:7: generation.temperature: "
                        f"expected a number >= 0, got 'hot'")


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("context: 100", "context", "expected 'auto' or an integer >= 256, got 100"),
        ("threads: 0", "threads", "expected 'auto' or an integer >= 1, got 0"),
        ("max_line_bytes: 10", "max_line_bytes", "expected an integer >= 1024, got 10"),
        ("generation:\n  top_p: 0", "generation.top_p", "expected a number > 0 and <= 1, got 0"),
        ("generation:\n  top_p: 1.5", "generation.top_p", "expected a number > 0 and <= 1, got 1.5"),
        ("generation:\n  min_p: 1", "generation.min_p", "expected a number >= 0 and < 1, got 1"),
        ("generation:\n  repeat_penalty: 0.0", "generation.repeat_penalty", "expected a number > 0, got 0.0"),
        ("generation:\n  temperature: -0.1", "generation.temperature", "expected a number >= 0, got -0.1"),
        ("generation:\n  temperature: .inf", "generation.temperature", "expected a number >= 0, got inf"),
        ("generation:\n  max_tokens: 0", "generation.max_tokens", "expected an integer >= 1, got 0"),
    ],
)
def test_out_of_range_values(tmp_path, text, key, expected):
    err = error_for(tmp_path, text + "\n")
    assert err.key == key
    assert err.detail == expected
    assert err.line == text.count("\n") + 1


def test_bool_is_not_an_int(tmp_path):
    err = error_for(tmp_path, "generation:\n  top_k: true\n")
    assert err.key == "generation.top_k" and err.detail == "expected an integer >= 0, got true"


def test_float_is_not_an_int(tmp_path):
    err = error_for(tmp_path, "generation:\n  max_tokens: 12.5\n")
    assert err.detail == "expected an integer >= 1, got 12.5"


def test_string_is_not_a_bool(tmp_path):
    err = error_for(tmp_path, "preload: 'yes'\n")
    assert err.key == "preload" and err.detail == "expected true or false, got 'yes'"


def test_number_written_as_text_gets_a_hint(tmp_path):
    err = error_for(tmp_path, "generation:\n  min_p: 1e-3\n")
    assert "got '1e-3'" in err.detail and "1.0e-3" in err.detail


def test_bad_choice_suggests_close_match(tmp_path):
    err = error_for(tmp_path, "log_level: warn\n")
    assert err.key == "log_level"
    assert err.detail.startswith("expected one of debug, info, warning, error, got 'warn'")
    assert "did you mean 'warning'?" in err.detail


def test_null_for_non_nullable_key(tmp_path):
    err = error_for(tmp_path, "model:\n")
    assert err.key == "model" and err.detail == "expected a string, got null"


def test_section_of_wrong_shape(tmp_path):
    err = error_for(tmp_path, "generation: [1, 2]\n")
    assert err.key == "generation" and err.detail == "expected a mapping, got a list"


@pytest.mark.parametrize("text", ["- model\n- backend\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    err = error_for(tmp_path, text)
    assert "top level must be a mapping" in str(err)
    assert str(err).startswith(str(tmp_path / "config.yaml") + ":1:")


def test_model_entry_without_path(tmp_path):
    err = error_for(tmp_path, """
        models:
          ok:
            path: /m/ok.gguf
          gemma:
            context: 8192
    """)
    assert str(err) == (f"{tmp_path / 'config.yaml'}:4: models.gemma: "
                        f"missing required key 'path' (a string)")


def test_model_entry_bad_field(tmp_path):
    # Backend names are checked once plugins have registered theirs (check_backends), with the file's line.
    config = load_config(write(tmp_path, """
        models:
          gemma:
            path: /m/g.gguf
            backend: cuda
    """))
    with pytest.raises(ConfigError) as info:
        check_backends(config, BUILTIN_BACKENDS)
    err = info.value
    assert err.key == "models.gemma.backend" and err.line == 4
    assert "expected one of auto, llama.cpp, mlx, remote or null, got 'cuda'" in err.detail


def test_model_entry_unknown_field(tmp_path):
    err = error_for(tmp_path, "models:\n  gemma:\n    path: /m/g.gguf\n    contxt: 8192\n")
    assert err.key == "models.gemma" and err.line == 4
    assert "did you mean 'context'?" in err.detail


def test_model_alias_must_be_a_mapping(tmp_path):
    err = error_for(tmp_path, "models:\n  gemma: ~/models/g.gguf\n")
    assert err.key == "models.gemma" and err.line == 2
    assert err.detail.startswith("expected a mapping")


def test_keys_must_be_strings(tmp_path):
    err = error_for(tmp_path, "models:\n  1: {path: /m.gguf}\n")
    assert err.key == "models" and err.detail == "keys must be strings, got 1"


# --- where the file comes from ---------------------------------------------


def test_env_override(tmp_path, monkeypatch):
    path = write(tmp_path, "model: from-env\n", "env.yaml")
    monkeypatch.setenv("ASSISTANT_CONFIG", str(path))
    config = load_config()
    assert config.model == "from-env" and config.source == path


def test_env_pointing_at_missing_file_is_an_error(tmp_path, monkeypatch):
    missing = tmp_path / "nope.yaml"
    monkeypatch.setenv("ASSISTANT_CONFIG", str(missing))
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_config()
    assert str(info.value).startswith(str(missing))


def test_explicit_missing_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: config file not found"


def test_directory_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)


# --- the schema mechanism ------------------------------------------------------


def test_list_fields_validate_items():
    """Lists (for future keys such as plugin_dirs) go through the same checker."""
    schema = cfg.Field("section", fields={"dirs": cfg.Field("list", item=cfg.Field("str", expand_user=True))})
    loader = yaml.SafeLoader("dirs:\n  - ~/plugins\n  - 3\n")
    root = loader.get_single_node()
    checker = cfg._Checker(loader, Path("x.yaml"))
    with pytest.raises(ConfigError) as info:
        checker.value(schema, root, "", None)
    assert str(info.value) == "x.yaml:3: dirs[1]: expected a string, got 3"

    loader = yaml.SafeLoader("dirs:\n  - ~/plugins\n")
    values = cfg._Checker(loader, None).value(schema, loader.get_single_node(), "", None)
    assert values == {"dirs": [str(Path.home() / "plugins")]}


def test_expected_text_comes_from_the_schema():
    assert cfg.SCHEMA["context"].expected() == "'auto' or an integer >= 256"
    assert cfg.GENERATION_FIELDS["seed"].expected() == "an integer >= -1 or null"  # -1: a random seed per request
    assert cfg.SCHEMA["backend"].expected() == "one of auto, llama.cpp, mlx, remote"


def test_the_keys_a_file_sets_are_known(tmp_path):
    """Config.given: the dotted keys the file sets (a null counts as unset),
    so a model's own recommendation can fill in only what the user left out."""
    config = load_config(write(tmp_path, """
        generation: {top_k: 5, seed: null}
        speculative:
          drafter: ngram
    """))
    assert {"generation.top_k", "speculative.drafter"} <= config.given
    assert "generation.temperature" not in config.given and "generation.seed" not in config.given
    assert Config().given == frozenset()


# --- backend names: read as any name, checked against the registry's ---------------------

PLUGIN_BACKENDS = """
    backend: scripted
    models:
      s:
        path: /m/s.bin
        backend: scripted
        paths:
          scripted: /m/s-for-scripted.bin
          mlx: /m/s-mlx
    profiles:
      here:
        platform: "*"
        backend: scripted
"""


def test_any_backend_name_is_read_and_kept(tmp_path):
    """A plugin registers its backends after the file is read (the file says where plugins are)."""
    config = load_config(write(tmp_path, PLUGIN_BACKENDS))
    assert config.backend == "scripted" and config.profiles["here"].backend == "scripted"
    assert config.models["s"].backend == "scripted"
    assert config.models["s"].paths == {"mlx": "/m/s-mlx", "scripted": "/m/s-for-scripted.bin"}
    # `config show` keeps the plugin's paths entry, and what it prints reads back the same
    again = parse_config(dump_effective(config))
    assert again.models["s"].paths == config.models["s"].paths and again.backend == "scripted"
    check_backends(config, [*BUILTIN_BACKENDS, "scripted"])  # registered: fine


@pytest.mark.parametrize(("line", "text", "key", "detail"), [
    (1, "backend: mlxx", "backend", "expected one of auto, llama.cpp, mlx, remote, got 'mlxx'; did you mean 'mlx'?"),
    (5, "    backend: scripted", "models.s.backend", "expected one of auto, llama.cpp, mlx, remote or null, got 'scripted'"),
    (7, "      scripted: /m/s.bin", "models.s.paths", "unknown key 'scripted' (known keys: llama.cpp, mlx)"),
    (12, "    backend: scripted", "profiles.here.backend",
     "expected one of auto, llama.cpp, mlx, remote or null, got 'scripted'"),
])
def test_unregistered_backend_names_file_line_key_and_known_names(tmp_path, line, text, key, detail):
    # Every key names a built-in but the one under test.
    lines = textwrap.dedent(PLUGIN_BACKENDS).lstrip("\n").replace("scripted", "llama.cpp").splitlines()
    assert len(lines[line - 1]) - len(lines[line - 1].lstrip()) == len(text) - len(text.lstrip())  # same place
    lines[line - 1] = text
    path = write(tmp_path, "\n".join(lines) + "\n")
    config = load_config(path)
    with pytest.raises(ConfigError) as info:
        check_backends(config, BUILTIN_BACKENDS)
    err = info.value
    assert (err.key, err.line, err.detail) == (key, line, detail)
    assert str(err) == f"{path}:{line}: {key}: {detail}"
    # the same file is fine once a plugin has registered the backend
    check_backends(config, [*BUILTIN_BACKENDS, "scripted", "mlxx"])


def test_check_backends_lists_plugin_backends_and_keeps_auto_out_of_paths(tmp_path):
    config = load_config(write(tmp_path, "backend: tensorrt\n"))
    with pytest.raises(ConfigError, match=r"expected one of auto, llama.cpp, mlx, remote, scripted, got 'tensorrt'"):
        check_backends(config, ["llama.cpp", "mlx", "remote", "scripted"])
    check_backends(load_config(write(tmp_path, "backend: auto\n")), ["llama.cpp"])  # auto is always known
    config = load_config(write(tmp_path, "models:\n  m:\n    path: /x\n    paths: {auto: /y}\n"))
    with pytest.raises(ConfigError, match=r":4: models\.m\.paths: unknown key 'auto'"):
        check_backends(config, ["auto", "llama.cpp"])  # a file is for one backend, not for "auto"
    # a config built in code has no file or line to name
    with pytest.raises(ConfigError) as info:
        check_backends(Config(backend="cuda"), BUILTIN_BACKENDS)
    assert str(info.value) == "backend: expected one of auto, llama.cpp, mlx, remote, got 'cuda'"


def test_backend_keys_still_check_their_shape_when_read(tmp_path):
    assert "backend: expected one of auto, llama.cpp, mlx, remote, got 3" in str(error_for(tmp_path, "backend: 3\n"))
    err = error_for(tmp_path, "models:\n  m:\n    path: /x\n    paths: {llama.cpp: 5}\n")
    assert (err.key, err.line) == ("models.m.paths.llama.cpp", 4) and "expected a string or null, got 5" in err.detail
    err = error_for(tmp_path, "models:\n  m:\n    path: /x\n    paths: {scripted: [a]}\n")
    assert err.key == "models.m.paths.scripted" and "expected a string or null, got a list" in err.detail


def test_builtin_backend_names_match_the_backends_package():
    assert cfg.BACKENDS == ("auto", *BUILTIN_BACKENDS)
