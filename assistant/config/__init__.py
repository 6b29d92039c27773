"""YAML configuration: loading, validation, defaults and the effective view.

One declarative schema (``SCHEMA``, a tree of :class:`Field`) drives all
three jobs: the validator walks it, the defaults come from it, and
``Config.to_dict()`` / :func:`dump_effective` (``assistant config show``)
follow its order. To add a key, add a ``Field`` here and a field with the
same name to the dataclass of its section; ``Config(**values)`` fails loudly
if the two ever disagree.

Validation walks the YAML node tree (``yaml.compose``) rather than the loaded
dict, so every error can name the line it is about::

    /home/u/.config/assistant/config.yaml:7: generation.temperature: expected a number >= 0, got 'hot'
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from assistant import paths
from assistant.protocol import DEFAULT_MAX_LINE_BYTES
from assistant.keymap import ACTIONS as TUI_ACTIONS

# The built-in backends (backends.BUILTIN_BACKENDS), for messages and docs. A
# plugin may register more, so a file naming another one is read all the same
# and checked by check_backends once the plugins have registered theirs.
BACKENDS = ("auto", "llama.cpp", "mlx", "remote")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MODEL = "smollm2-135m"

_NULL_TAG = "tag:yaml.org,2002:null"


class ConfigError(Exception):
    """A config file that cannot be used.

    ``str(err)`` reads ``FILE:LINE: dotted.key: what was wrong``; the parts are
    also kept as attributes (``path``, ``line``, ``column``, ``key``,
    ``detail``) for callers that want to present them differently.
    """

    def __init__(
        self,
        detail: str,
        *,
        path: Path | None = None,
        line: int | None = None,
        column: int | None = None,
        key: str | None = None,
    ) -> None:
        self.detail = detail
        self.path = path
        self.line = line
        self.column = column
        self.key = key
        where = [str(path)] if path is not None else []
        if line is not None:
            where.append(str(line))
            if column is not None:
                where.append(str(column))
        parts = [":".join(where)] if where else []
        if key:
            parts.append(key)
        parts.append(detail)
        super().__init__(": ".join(parts))


# --------------------------------------------------------------------------
# The schema


@dataclass(frozen=True)
class Field:
    """One config key.

    ``kind`` is a scalar type (``str``, ``int``, ``float``, ``bool``) or a
    container: ``section`` (fixed keys in ``fields``, built into ``cls`` when
    given), ``map`` (user-chosen keys, each value checked against ``item``)
    or ``list`` (each element checked against ``item``).
    """

    kind: str
    default: Any = None
    doc: str = ""
    choices: tuple[str, ...] = ()
    # Names a registry can add to: for a str, ``choices``; for a section, the
    # keys of ``fields`` (others are checked against ``item``). Both are then
    # the built-in names, other names pass here and check_backends checks them.
    open: bool = False
    min: float | None = None
    max: float | None = None
    min_open: bool = False  # the bound itself is excluded (x > min)
    max_open: bool = False
    nullable: bool = False
    auto: bool = False  # the string "auto" is accepted as well
    required: bool = False
    expand_user: bool = False  # expand ~ in a str value
    fields: Mapping[str, Field] | None = None
    item: Field | None = None
    cls: type | None = None

    def expected(self) -> str:
        """What a valid value looks like, in words, for error messages."""
        if self.kind == "any":
            text = "any value"
        elif self.kind in ("section", "map"):
            text = "a mapping"
        elif self.kind == "list":
            text = "a list"
        elif self.kind == "duration":
            text = "a duration: seconds, or text such as 30s, 10m or 1h30m (-1: forever)"
        elif self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a string"
        else:
            text = ("an integer" if self.kind == "int" else "a number") + self._range()
        if self.auto:
            text = "'auto' or " + text
        if self.nullable:
            text += " or null"
        return text

    def _range(self) -> str:
        bounds = []
        if self.min is not None:
            bounds.append(f"{'>' if self.min_open else '>='} {_num(self.min)}")
        if self.max is not None:
            bounds.append(f"{'<' if self.max_open else '<='} {_num(self.max)}")
        return (" " + " and ".join(bounds)) if bounds else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


GENERATION_FIELDS: dict[str, Field] = {
    "temperature": Field("float", 0.7, "Sampling temperature; 0 picks the most likely token (greedy).", min=0),
    "top_p": Field("float", 0.95, "Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p.",
                   min=0, min_open=True, max=1),
    "top_k": Field("int", 40, "Keep only the k most likely tokens; 0 disables.", min=0),
    "min_p": Field("float", 0.05, "Drop tokens less likely than min_p times the most likely one; 0 disables.",
                   min=0, max=1, max_open=True),
    "repeat_penalty": Field("float", 1.0, "Penalty for repeating recent tokens; 1.0 disables.", min=0, min_open=True),
    "max_tokens": Field("int", 512, "Most tokens generated for one reply.", min=1),
    "seed": Field("int", None, "Random seed for sampling; null (or -1, as llama.cpp takes it) picks a new one "
                  "per request.", nullable=True, min=-1),
}


@dataclass
class GenerationDefaults:
    """Sampling defaults; a request may override each of them."""

    temperature: float = GENERATION_FIELDS["temperature"].default
    top_p: float = GENERATION_FIELDS["top_p"].default
    top_k: int = GENERATION_FIELDS["top_k"].default
    min_p: float = GENERATION_FIELDS["min_p"].default
    repeat_penalty: float = GENERATION_FIELDS["repeat_penalty"].default
    max_tokens: int = GENERATION_FIELDS["max_tokens"].default
    seed: int | None = GENERATION_FIELDS["seed"].default


SPECULATIVE_FIELDS: dict[str, Field] = {
    # kind "any": YAML reads a bare `off` as false; _drafter_name() takes that for "off".
    "drafter": Field("any", "auto", "Speculative decoding: auto, ngram, draft, mtp, off, or a drafter a plugin "
                     "registers. auto uses prompt lookup where the answer copies its input, the draft model "
                     "(if set) elsewhere, else the model's MTP layers (if it has them); a request's draft "
                     "parameter overrides it."),
    "max_draft": Field("int", 64, "Most tokens drafted per verify step (the engine adapts below it).",
                       min=1, max=64),
    "draft_model": Field("str", None, "Draft model for the draft drafter (and auto): an alias or a GGUF path "
                         "with the same tokenizer as the model; null: none.", nullable=True),
    "ngram_min": Field("int", 2, "Prompt lookup: shortest n-gram (tokens) matched against earlier text.",
                       min=1, max=32),
    "ngram_max": Field("int", 8, "Prompt lookup: longest n-gram (tokens) matched; the longest match wins.",
                       min=1, max=32),
    "mtp_model": Field("str", None, "MTP drafter model for the mtp drafter (and auto): a separate assistant "
                       "model such as Gemma 4's mtp-*.gguf; null: the model's own NextN layers, or an "
                       "mtp-*.gguf beside the model file that pairs with it.", nullable=True, expand_user=True),
}


@dataclass
class SpeculativeDefaults:
    """Speculative decoding defaults; per model (models.NAME.speculative) and per request they can change."""

    drafter: str = SPECULATIVE_FIELDS["drafter"].default
    max_draft: int = SPECULATIVE_FIELDS["max_draft"].default
    draft_model: str | None = SPECULATIVE_FIELDS["draft_model"].default
    ngram_min: int = SPECULATIVE_FIELDS["ngram_min"].default
    ngram_max: int = SPECULATIVE_FIELDS["ngram_max"].default
    mtp_model: str | None = SPECULATIVE_FIELDS["mtp_model"].default

    def __post_init__(self) -> None:
        self.drafter = _drafter_name(self.drafter)
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) is larger than ngram_max ({self.ngram_max})")


def _drafter_name(value: Any) -> str | None:
    """A drafter name from YAML: `off` unquoted reads as false, which means off."""
    if value is False:
        return "off"
    if value is None or (isinstance(value, str) and value):
        return value
    raise ValueError(f"drafter: expected a drafter name (auto, ngram, draft, mtp, off, ...), got {value!r}")


MODEL_SPECULATIVE_FIELDS: dict[str, Field] = {
    "drafter": Field("any", None, "Drafter for this model; null uses the top-level speculative.drafter."),
    "draft_model": Field("str", None, "Draft model for this model; null uses the top-level "
                         "speculative.draft_model.", nullable=True),
    "max_draft": Field("int", None, "Most tokens drafted per step; null uses the top-level "
                       "speculative.max_draft.", min=1, max=64, nullable=True),
    "mtp_model": Field("str", None, "MTP drafter model for this model; null uses the top-level "
                       "speculative.mtp_model.", nullable=True, expand_user=True),
}


@dataclass
class ModelSpeculative:
    """Per-model speculative decoding settings (null: the top-level ones)."""

    drafter: str | None = None
    draft_model: str | None = None
    max_draft: int | None = None
    mtp_model: str | None = None

    def __post_init__(self) -> None:
        self.drafter = _drafter_name(self.drafter)


MODEL_FIELDS: dict[str, Field] = {
    "path": Field("str", None, "Model file (GGUF) or MLX model directory; ~ is expanded. Required "
                  "except for backend: remote.", nullable=True, expand_user=True),
    "backend": Field("str", None, "Backend for this model; null uses the top-level backend.",
                     choices=BACKENDS, open=True, nullable=True),
    "context": Field("int", None, "Context window for this model; null uses the top-level context.",
                     min=256, nullable=True),
    "threads": Field("int", None, "Decode threads for this model; null uses the top-level threads.",
                     min=1, nullable=True),
    "chat_template": Field("str", None, "A Jinja chat template that replaces the one in the model file.",
                           nullable=True),
    "paths": Field("section", doc="A file per backend (an MLX folder for mlx, a GGUF for llama.cpp); the "
                   "chosen backend's entry replaces path.",
                   fields={b: Field("str", None, f"Model for the {b} backend; null uses path.", nullable=True,
                                    expand_user=True) for b in BACKENDS if b not in ("auto", "remote")},
                   open=True, item=Field("str", None, "Model for this backend; null uses path.", nullable=True,
                                         expand_user=True)),
    "speculative": Field("section", doc="Speculative decoding for this model: drafter, draft_model, max_draft, "
                         "mtp_model (null: the top-level speculative settings).", fields=MODEL_SPECULATIVE_FIELDS,
                         cls=ModelSpeculative),
    "mmproj": Field("str", None, "Media projector (llama.cpp's mmproj-*.gguf) for images and audio read "
                    "natively; ~ is expanded, a relative path is relative to this file; null: a mmproj-*.gguf "
                    "beside the model file that pairs with it, if any. One that does not belong to the model "
                    "is refused at load.", nullable=True, expand_user=True),
    "url": Field("str", None, "backend: remote: the OpenAI-compatible base URL (e.g. http://gpu-box:8000/v1).",
                 nullable=True),
    "model": Field("str", None, "backend: remote: the model's name on that server; null: the alias.",
                   nullable=True),
    "api_key_env": Field("str", None, "backend: remote: the environment variable holding the server's API "
                         "key; null: none sent.", nullable=True),
}


@dataclass
class ModelEntry:
    """A user-defined model alias (``models:`` in the config file)."""

    path: str | None = None
    backend: str | None = None
    context: int | None = None
    threads: int | None = None
    chat_template: str | None = None
    paths: dict[str, str] = field(default_factory=dict)  # backend -> its own file (others use path)
    speculative: ModelSpeculative = field(default_factory=ModelSpeculative)
    mmproj: str | None = None
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        self.paths = {b: p for b, p in (self.paths or {}).items() if p is not None}
        if self.backend == "remote":
            if not self.url:
                raise ValueError("backend: remote needs url: the server's OpenAI-compatible base URL")
            if not re.match(r"^https?://[^/\s]+", self.url):
                raise ValueError(f"url: expected an http:// or https:// URL, got {self.url!r}")
        elif self.path is None and not self.paths:
            raise ValueError("missing required key 'path' (a string)")


PROFILE_FIELDS: dict[str, Field] = {
    "hostname": Field("str", None, "Matches this machine's hostname (glob, case-insensitive; the short name "
                      "before the first dot matches too).", nullable=True),
    "platform": Field("str", None, "Matches '<os>-<arch>' as `assistant doctor` shows it, e.g. darwin-arm64 or "
                      "linux-x86_64 (glob).", nullable=True),
    "backend": Field("str", None, "Backend on this machine; null keeps the top-level backend.",
                     choices=BACKENDS, open=True, nullable=True),
    "model": Field("str", None, "Default model on this machine; null keeps the top-level model.", nullable=True),
    "threads": Field("int", None, "Decode threads on this machine; null keeps the top-level threads.",
                     min=1, auto=True, nullable=True),
    "context": Field("int", None, "Context window on this machine; null keeps the top-level context.",
                     min=256, auto=True, nullable=True),
}


@dataclass
class Profile:
    """Settings for the machines a profile matches (``profiles:`` in the config file)."""

    hostname: str | None = None
    platform: str | None = None
    backend: str | None = None
    model: str | None = None
    threads: int | str | None = None
    context: int | str | None = None

    def __post_init__(self) -> None:
        if self.hostname is None and self.platform is None:
            raise ValueError("a profile needs hostname or platform (or both) to say which machines it is for")


HTTP_FIELDS: dict[str, Field] = {
    "listen": Field("str", None, "Serve the OpenAI- and Ollama-compatible HTTP API here: 127.0.0.1:PORT, "
                    "[::1]:PORT, HOST:PORT (needs an API key) or unix:PATH; null: off.", nullable=True),
    "api_keys": Field("list", None, "Accepted API keys (Authorization: Bearer KEY). Required to listen on "
                      "anything but loopback or a Unix socket.", item=Field("str")),
    "api_key_file": Field("str", None, "A file with one accepted API key per line (kept out of the config "
                          "file); null: none.", nullable=True, expand_user=True),
    "allowed_hosts": Field("list", None, "Host header names accepted besides the loopback names (the "
                           "DNS-rebinding guard); '*' accepts any.", item=Field("str")),
    "cors_origins": Field("list", None, "Origins allowed to call the API from a browser (CORS); empty: none.",
                          item=Field("str")),
    "max_body_bytes": Field("int", 32 * 1024 * 1024, "Largest request body accepted (413 past it).", min=1024),
    "load_timeout": Field("float", 60.0, "Seconds a request waits for its model to load; past it the answer is "
                          "503 with Retry-After while the load goes on.", min=0.1),
    "read_timeout": Field("float", 30.0, "Seconds a client has to send a request's headers (from connecting or "
                          "from the end of its previous reply, so also how long an idle connection stays open), "
                          "and again its body; past it the connection is closed (408 for a body).", min=0.1),
}


@dataclass
class HttpSettings:
    """The HTTP API (``http:``): off unless ``listen`` is set."""

    listen: str | None = HTTP_FIELDS["listen"].default
    api_keys: list[str] = field(default_factory=list)
    api_key_file: str | None = HTTP_FIELDS["api_key_file"].default
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = HTTP_FIELDS["max_body_bytes"].default
    load_timeout: float = HTTP_FIELDS["load_timeout"].default
    read_timeout: float = HTTP_FIELDS["read_timeout"].default

    def __post_init__(self) -> None:
        self.api_keys = list(self.api_keys or [])
        self.allowed_hosts = list(self.allowed_hosts or [])
        self.cors_origins = list(self.cors_origins or [])


MEDIA_FIELDS: dict[str, Field] = {
    "max_bytes": Field("int", 20 * 1024 * 1024, "Largest image or audio file a message may carry (bytes); "
                       "checked before anything decodes it.", min=1),
    "max_pixels": Field("int", 40_000_000, "Most pixels (width x height) of an image; larger ones are refused "
                        "before they are decoded.", min=1),
    "max_audio_seconds": Field("float", 3600, "Longest audio a message may carry, in seconds.", min=0,
                               min_open=True),
    "fallback": Field("bool", True, "Where the model cannot read a medium itself, turn it into text with the "
                      "vision.ocr / audio.transcribe skills (marked as such); false: refuse it."),
}


@dataclass
class MediaSettings:
    """Images and audio in messages: the limits checked before decoding, and the fallback."""

    max_bytes: int = MEDIA_FIELDS["max_bytes"].default
    max_pixels: int = MEDIA_FIELDS["max_pixels"].default
    max_audio_seconds: float = MEDIA_FIELDS["max_audio_seconds"].default
    fallback: bool = MEDIA_FIELDS["fallback"].default


TUI_BINDING_FIELDS: dict[str, Field] = {
    a.id: Field("str", a.key, a.help or a.description) for a in TUI_ACTIONS
}

TUI_FIELDS: dict[str, Field] = {
    "theme": Field("str", "textual-dark", "Textual theme of the terminal UI (textual-dark, textual-light, nord, "
                   "gruvbox, dracula, tokyo-night, monokai, ...)."),
    "bindings": Field("section", doc="Keys of the terminal UI's actions: action -> key(s), Textual key names, "
                      "several separated by commas.", fields=TUI_BINDING_FIELDS),
}


@dataclass
class TuiSettings:
    """The terminal UI (``assistant`` / ``assistant tui``)."""

    theme: str = TUI_FIELDS["theme"].default
    bindings: dict[str, str] = field(default_factory=lambda: {k: f.default for k, f in TUI_BINDING_FIELDS.items()})


SCHEMA: dict[str, Field] = {
    "model": Field("str", DEFAULT_MODEL, "Default model: an alias (built-in or from models:) or a path."),
    "backend": Field("str", "auto", "Inference backend; auto picks mlx on Apple Silicon when mlx-lm is "
                     "installed, llama.cpp elsewhere; a plugin's backend by its name.", choices=BACKENDS, open=True),
    "context": Field("int", "auto", "Context window in tokens; auto sizes it from the model and free RAM.",
                     min=256, auto=True),
    "threads": Field("int", "auto", "CPU threads for decoding; auto uses the physical cores.", min=1, auto=True),
    "max_loaded_models": Field("int", 1, "Most models kept loaded at once; the least recently used is unloaded.",
                               min=1),
    "keep_alive": Field("duration", "5m", "How long a model stays loaded once nobody uses it: seconds, or a "
                        "duration such as 30s, 10m, 1h30m; -1 keeps it loaded, 0 unloads it right after each "
                        "request. A chat request's own keep_alive overrides it for that model."),
    "max_queued_requests": Field("int", 64, "Most requests waiting for one model; past it a new one is refused "
                                 "at once with a BUSY error. A person's requests count only against each other, "
                                 "never against background work.", min=1),
    "preload": Field("bool", True, "Load the default model when the daemon starts."),
    "system_prompt": Field("str", None, "System prompt for new sessions; null uses none.", nullable=True),
    "log_level": Field("str", "info", "Daemon log level.", choices=LOG_LEVELS),
    "max_line_bytes": Field("int", DEFAULT_MAX_LINE_BYTES, "Longest protocol line (one JSON message) accepted.",
                            min=1024),
    "send_stall_timeout": Field("float", 5.0, "Seconds a client's unsent replies may stay above 16 KiB before "
                                "its requests are cancelled and it is disconnected as not reading.", min=0.1),
    "generation": Field("section", doc="Sampling defaults.", fields=GENERATION_FIELDS, cls=GenerationDefaults),
    "speculative": Field("section", doc="Speculative decoding defaults.", fields=SPECULATIVE_FIELDS,
                         cls=SpeculativeDefaults),
    "models": Field("map", doc="Model aliases: name -> settings.",
                    item=Field("section", fields=MODEL_FIELDS, cls=ModelEntry)),
    "models_dir": Field("str", None, "Where `assistant models pull` puts models (a folder per alias, and "
                        "pulled.json naming them); ~ is expanded, a relative path is relative to this file; "
                        "null: models/ in the user data dir.", nullable=True, expand_user=True),
    "profiles": Field("map", doc="Per-machine settings: name -> hostname and/or platform to match, and the "
                      "backend, model, threads, context to use there. The first match in file order applies.",
                      item=Field("section", fields=PROFILE_FIELDS, cls=Profile)),
    "plugin_dirs": Field("list", None, "Folders of single-file plugins (*.py); empty means "
                         "plugins/ in the config dir. ASSISTANT_PLUGIN_DIR overrides it.",
                         item=Field("str", expand_user=True)),
    "plugins": Field("map", doc="Per-plugin settings: plugin name -> anything; handed to the plugin's hooks "
                     "as `settings`.", item=Field("any", None)),
    "media": Field("section", doc="Images and audio in messages: size limits and the OCR / transcript "
                   "fallback.", fields=MEDIA_FIELDS, cls=MediaSettings),
    "tui": Field("section", doc="The terminal UI: theme and key bindings.", fields=TUI_FIELDS, cls=TuiSettings),
    "http": Field("section", doc="The OpenAI- and Ollama-compatible HTTP API (off by default).",
                  fields=HTTP_FIELDS, cls=HttpSettings),
}


@dataclass
class Config:
    """The validated configuration, every key filled in."""

    model: str = SCHEMA["model"].default
    backend: str = SCHEMA["backend"].default
    context: int | str = SCHEMA["context"].default
    threads: int | str = SCHEMA["threads"].default
    max_loaded_models: int = SCHEMA["max_loaded_models"].default
    keep_alive: str | int | float = SCHEMA["keep_alive"].default
    max_queued_requests: int = SCHEMA["max_queued_requests"].default
    preload: bool = SCHEMA["preload"].default
    system_prompt: str | None = SCHEMA["system_prompt"].default
    log_level: str = SCHEMA["log_level"].default
    max_line_bytes: int = SCHEMA["max_line_bytes"].default
    send_stall_timeout: float = SCHEMA["send_stall_timeout"].default
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    speculative: SpeculativeDefaults = field(default_factory=SpeculativeDefaults)
    models: dict[str, ModelEntry] = field(default_factory=dict)
    models_dir: str | None = SCHEMA["models_dir"].default
    profiles: dict[str, Profile] = field(default_factory=dict)
    plugin_dirs: list[str] = field(default_factory=list)
    plugins: dict[str, Any] = field(default_factory=dict)
    media: MediaSettings = field(default_factory=MediaSettings)
    tui: TuiSettings = field(default_factory=TuiSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    # Not config keys: the file this came from (None when none existed), and
    # the dotted keys the file set (a default the user did not choose may give
    # way to a model's own recommendation, as for generation).
    source: Path | None = None
    given: frozenset[str] = field(default_factory=frozenset, compare=False, repr=False)
    # The line of each dotted key the file sets, for errors found after reading (check_backends).
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The effective config (defaults merged) as plain data, in schema order."""
        return _export(Field("section", fields=SCHEMA), self)


# --------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the config file.

    ``path=None`` means :func:`assistant.paths.config_path` (``$ASSISTANT_CONFIG``,
    then the user config dir). A missing file at the default location gives
    the defaults; a missing file that was named (argument or environment) is
    a :class:`ConfigError`, since the user clearly meant to use it.
    """
    explicit = path is not None or bool(os.environ.get("ASSISTANT_CONFIG"))
    file = paths.config_path(path) if path is not None else paths.config_path()
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise ConfigError("config file not found", path=file) from None
        return _validate(None, None, None)
    except IsADirectoryError:
        raise ConfigError("is a directory, not a config file", path=file) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=file) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", path=file) from None
    return parse_config(text, file)


def parse_config(text: str, path: Path | None = None) -> Config:
    """Validate config text; ``path`` is only used in messages and ``Config.source``."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            raise _yaml_error(e, path) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML: {e}", path=path) from None
        return _validate(root, loader, path)
    finally:
        loader.dispose()


def check_backends(config: Config, names: Iterable[str]) -> None:
    """Raise ``ConfigError`` for a backend the config names that is not in ``names``.

    ``names`` are the backend registry's names (the built-ins and what
    plugins registered); ``auto`` is always allowed in a ``backend:`` key.
    Checked: the top-level ``backend``, each model alias's ``backend`` and
    ``paths:`` keys, and each profile's ``backend``. Reading a file cannot
    check these, because the plugins it names in ``plugin_dirs`` and
    ``plugins`` register their backends only after it was read; run this
    once they have. The error names the file, line, key, the bad name and
    the known ones, as a reading error would."""
    known = [n for n in names if n != "auto"]
    choices = ("auto", *known)
    keys = [("backend", config.backend, SCHEMA["backend"])]
    keys += [(f"models.{alias}.backend", m.backend, MODEL_FIELDS["backend"]) for alias, m in config.models.items()]
    keys += [(f"profiles.{name}.backend", p.backend, PROFILE_FIELDS["backend"])
             for name, p in config.profiles.items()]
    for key, value, spec in keys:
        if value is not None and value not in choices:
            detail = _bad_value(dataclasses.replace(spec, choices=choices, open=False), value)
            raise ConfigError(detail, path=config.source, line=config.lines.get(key), key=key)
    with_files = [n for n in known if n != "remote"]  # a remote model has no file
    for alias, entry in config.models.items():
        for backend in entry.paths:
            if backend not in with_files:
                raise ConfigError(_unknown_key(backend, with_files), path=config.source, key=f"models.{alias}.paths",
                                  line=config.lines.get(f"models.{alias}.paths.{backend}"))


def dump_effective(config: Config) -> str:
    """The effective config as YAML (for ``assistant config show``); it loads back to the same config."""
    source = str(config.source) if config.source else "none (built-in defaults)"
    header = f"# Effective configuration (defaults filled in). Source: {source}\n"
    return header + yaml.dump(config.to_dict(), Dumper=_Dumper, sort_keys=False,
                              default_flow_style=False, allow_unicode=True)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (prompts, templates) as | blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    # PyYAML falls back to a quoted style by itself where a block cannot hold the text.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _yaml_error(e: yaml.MarkedYAMLError, path: Path | None) -> ConfigError:
    mark = e.problem_mark or e.context_mark
    detail = "invalid YAML: " + (e.problem or "syntax error")
    if e.context and e.context_mark is not None and e.problem_mark is not None:
        detail += f" ({e.context} at line {e.context_mark.line + 1})"
    if mark is None:
        return ConfigError(detail, path=path)
    return ConfigError(detail, path=path, line=mark.line + 1, column=mark.column + 1)


def _validate(root: yaml.Node | None, loader: yaml.SafeLoader | None, path: Path | None) -> Config:
    checker = _Checker(loader, path)
    if root is not None and not _is_null(root) and not isinstance(root, yaml.MappingNode):
        raise checker.error(root, None, f"the top level must be a mapping of keys, got {_kind_of(root)}")
    values = checker.section(SCHEMA, None if root is None or _is_null(root) else root, "", None)
    return Config(**values, source=path, given=frozenset(checker.given), lines=checker.lines)


class _Checker:
    """Walks the YAML node tree against the schema; raises ConfigError with a line."""

    def __init__(self, loader: yaml.SafeLoader | None, path: Path | None) -> None:
        self.loader = loader
        self.path = path
        self.given: set[str] = set()  # dotted keys present (and not null) in the file
        self.lines: dict[str, int] = {}  # dotted key -> line of the key (of the value where there is no key)

    def error(self, node: yaml.Node | None, key: str | None, detail: str,
              mark: yaml.Mark | None = None) -> ConfigError:
        mark = mark or (node.start_mark if node is not None else None)
        return ConfigError(detail, path=self.path, key=key or None,
                           line=mark.line + 1 if mark is not None else None)

    def value(self, spec: Field, node: yaml.Node | None, key: str, key_mark: yaml.Mark | None) -> Any:
        """Check one value (node None: the key was absent) and return it with defaults filled in."""
        if node is not None:
            self.lines[key] = (key_mark or node.start_mark).line + 1
            if not _is_null(node):
                self.given.add(key)
        if spec.kind == "section":
            # A section whose children are all commented out reads as null: same as absent.
            if node is not None and not _is_null(node) and not isinstance(node, yaml.MappingNode):
                raise self.error(node, key, f"expected {spec.expected()}, got {_kind_of(node)}")
            values = self.section(spec.fields or {}, None if node is None or _is_null(node) else node,
                                  key, key_mark, spec.item if spec.open else None)
            try:
                return spec.cls(**values) if spec.cls else values
            except ValueError as exc:  # a section's own check across its keys (__post_init__)
                raise self.error(node, key, str(exc), mark=key_mark) from None
        if spec.kind == "map":
            return {name: self.value(spec.item, vnode, _join(key, name), kmark)
                    for name, vnode, kmark in self.pairs(spec, node, key)}
        if spec.kind == "any":  # free-form data handed on as is (plugin settings)
            return spec.default if node is None else self.loader.construct_object(node, deep=True)
        if spec.kind == "list":
            if node is None or _is_null(node):
                return list(spec.default or [])
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(node, key, f"expected {spec.expected()}, got {_kind_of(node)}")
            return [self.value(spec.item, item, f"{key}[{i}]", item.start_mark)
                    for i, item in enumerate(node.value)]
        if node is None:
            if spec.required:
                raise self.error(None, key.rpartition(".")[0], f"missing required key "
                                 f"'{key.rpartition('.')[2]}' ({spec.expected()})", mark=key_mark)
            return spec.default
        return self.scalar(spec, node, key)

    def section(self, fields: Mapping[str, Field], node: yaml.MappingNode | None, key: str,
                key_mark: yaml.Mark | None, open_item: Field | None = None) -> dict[str, Any]:
        seen: dict[str, tuple[yaml.Node, yaml.Mark]] = {}
        others = {}  # keys an open section takes beyond its fields (a plugin's backend under paths:)
        for name, vnode, kmark in self.pairs(None, node, key):
            if name in fields:
                seen[name] = (vnode, kmark)
            elif open_item is not None:
                others[name] = self.value(open_item, vnode, _join(key, name), kmark)
            else:
                raise self.error(None, key, _unknown_key(name, fields), mark=kmark)
        out = {}
        for name, spec in fields.items():
            vnode, kmark = seen.get(name, (None, None))
            # An absent required key is reported at the line of its section's key.
            out[name] = self.value(spec, vnode, _join(key, name), kmark or key_mark)
        return {**out, **others}

    def pairs(self, spec: Field | None, node: yaml.Node | None, key: str):
        """(name, value node, key mark) for each entry of a mapping node; keys must be strings."""
        if node is None or _is_null(node):
            return []
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, f"expected {spec.expected() if spec else 'a mapping'}, "
                                        f"got {_kind_of(node)}")
        self.loader.flatten_mapping(node)  # resolve YAML merge keys (<<: *anchor)
        out = []
        for knode, vnode in node.value:
            name = self.loader.construct_object(knode, deep=True)
            if not isinstance(name, str):
                raise self.error(knode, key, f"keys must be strings, got {_describe(name)}")
            out.append((name, vnode, knode.start_mark))
        return out

    def scalar(self, spec: Field, node: yaml.Node, key: str) -> Any:
        value = self.loader.construct_object(node, deep=True)
        ok, value = _coerce(spec, value)
        if ok:
            return value
        raise self.error(node, key, _bad_value(spec, value))


def _bad_value(spec: Field, value: Any) -> str:
    """What is wrong with ``value`` for ``spec``, with a hint where one helps."""
    detail = f"expected {spec.expected()}, got {_describe(value)}"
    if spec.choices and isinstance(value, str):
        close = difflib.get_close_matches(value, spec.choices, n=1)
        if close:
            detail += f"; did you mean '{close[0]}'?"
    elif spec.kind in ("int", "float") and isinstance(value, str) and _looks_numeric(value):
        # PyYAML reads 1e-3 (no '.') and quoted numbers as text.
        detail += " (text, not a number: write it unquoted, with a '.' before any exponent, e.g. 1.0e-3)"
    return detail


def _coerce(spec: Field, value: Any) -> tuple[bool, Any]:
    """(valid?, value converted to the field's type)."""
    if value is None:
        return spec.nullable, value
    if spec.auto and value == "auto":
        return True, value
    if spec.kind == "duration":  # kept as written ("5m"); parse_duration reads it where it is used
        try:
            parse_duration(value)
        except ValueError:
            return False, value
        return True, value
    if spec.kind == "bool":
        return isinstance(value, bool), value
    if spec.kind == "str":
        if not isinstance(value, str) or (spec.choices and not spec.open and value not in spec.choices):
            return False, value
        return True, os.path.expanduser(value) if spec.expand_user else value
    # bool is a subclass of int: `top_k: true` must not read as 1.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False, value
    if spec.kind == "int" and not isinstance(value, int):
        return False, value
    if spec.kind == "float" and not math.isfinite(value):
        return False, value
    if spec.min is not None and (value < spec.min or (spec.min_open and value == spec.min)):
        return False, value
    if spec.max is not None and (value > spec.max or (spec.max_open and value == spec.max)):
        return False, value
    return True, float(value) if spec.kind == "float" else value


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|ms|s|m|h)")


def parse_duration(value: Any) -> float | None:
    """Seconds from a keep-alive value as Ollama takes it: a number of seconds, or
    text: a number, or Go-style units (``30s``, ``10m``, ``1h30m``, ``500ms``).
    Negative means forever (None). ValueError for anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"expected seconds or a duration such as '10m', got {_describe(value)}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            sign, body = (-1.0, text[1:]) if text[:1] == "-" else (1.0, text.lstrip("+"))
            parts = _DURATION_PART.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"expected seconds or a duration such as '10m' or '1h30m', got {text!r}") from None
            value = sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(value):
        raise ValueError(f"expected a finite duration, got {value!r}")
    return None if value < 0 else float(value)


def _unknown_key(name: str, known: Iterable[str]) -> str:
    known = list(known)  # a section's fields, or the backend names
    detail = f"unknown key '{name}' (known keys: {', '.join(sorted(known))})"
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        detail += f"; did you mean '{close[0]}'?"
    return detail


def _export(spec: Field, value: Any) -> Any:
    if spec.kind == "section":
        get = value.get if isinstance(value, dict) else (lambda n: getattr(value, n))
        out = {name: _export(f, get(name)) for name, f in (spec.fields or {}).items()}
        if spec.open and isinstance(value, dict):  # the keys beyond the built-in ones
            out.update((name, _export(spec.item, v)) for name, v in value.items() if name not in out)
        return out
    if spec.kind == "map":
        return {name: _export(spec.item, v) for name, v in value.items()}
    if spec.kind == "list":
        return [_export(spec.item, v) for v in value]
    return value


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _kind_of(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return repr(node.value)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace("_", ""))
    except ValueError:
        return False
    return True
