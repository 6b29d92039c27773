"""Typed request parameters, checked at the edge with one error format.

Each RPC method that takes parameters declares them as a dataclass whose
fields are made with ``arg()``; ``parse(cls, params)`` returns an instance
or raises INVALID_PARAMS naming the parameter and what was expected:

    @dataclass
    class SessionsList:
        limit: int = arg(int, 100, check=lambda v: v > 0, expected="a positive integer")

Rules, the same for every method: a missing or ``null`` parameter takes its
default (or is "missing parameter 'x'" when it has none); ``true``/``false``
never pass for a number; an integer must fit in 64 bits (signed) and a
number must be finite, whatever the field's own check, so no value that
SQLite, numpy or a C library cannot hold gets past the edge; unknown
parameters are ignored, as JSON-RPC servers commonly do.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from assistant.protocol import ErrorCode, RPCError

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
NUMBER = (int, float)
# Every integer parameter fits a signed 64-bit integer (SQLite's INTEGER, C's int64_t).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
SHOWN_CHARS = 80  # of a bad value, in an error (a megabyte string is not echoed back)


@dataclass(frozen=True)
class ArgSpec:
    types: type | tuple[type, ...]
    default: Any = REQUIRED
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    convert: Callable[[Any], Any] | None = None  # applied to a value that passed (e.g. seed -1 -> a random seed)

    def describe(self) -> str:
        if self.expected:
            return self.expected
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        return " or ".join(t.__name__ for t in types)


def arg(types: type | tuple[type, ...], default: Any = REQUIRED, *, check: Callable[[Any], bool] | None = None,
        expected: str = "", convert: Callable[[Any], Any] | None = None) -> Any:
    """A parameter field: its JSON types, default (``REQUIRED`` for none), an extra check,
    the words for what is expected (used in the error) and a conversion of a good value."""
    spec = ArgSpec(types, default, check, expected, convert)
    return field(default=None, metadata={"arg": spec})


def invalid(message: str) -> RPCError:
    """The one error for a bad parameter."""
    return RPCError(ErrorCode.INVALID_PARAMS, message)


def check_value(name: str, value: Any, spec: ArgSpec) -> Any:
    """``value`` of parameter ``name`` checked against ``spec`` (None/absent -> the default)."""
    if value is None:
        if spec.default is REQUIRED:
            raise invalid(f"missing parameter {name!r}")
        default = spec.default
        return list(default) if isinstance(default, list) else dict(default) if isinstance(default, dict) else default
    types = spec.types if isinstance(spec.types, tuple) else (spec.types,)
    # ``object`` takes any JSON value (checked later by the method); otherwise a
    # bool is never taken for a number, although Python's bool is an int.
    ok = object in types or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types))
    if ok and object not in types and not representable(value):
        raise invalid(f"parameter {name!r}: expected {spec.describe()} "
                      f"({'a finite number' if isinstance(value, float) else 'within 64 bits'}), "
                      f"got {shown(value)}")
    if ok and spec.check is not None:
        ok = bool(spec.check(value))
    if not ok:
        raise invalid(f"parameter {name!r}: expected {spec.describe()}, got {shown(value)}")
    return spec.convert(value) if spec.convert is not None else value


def representable(value: Any) -> bool:
    """An int within signed 64 bits, a finite float; anything else passes (its own checks apply)."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def shown(value: Any) -> str:
    """A bad value as an error shows it: its repr, clipped."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def parse(cls: type[T], params: dict[str, Any]) -> T:
    """An instance of the parameter dataclass ``cls`` from a request's params."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = f.metadata.get("arg")
        if spec is None:
            continue
        values[f.name] = check_value(f.name, params.get(f.name), spec)
    return cls(**values)


def strings(v: Any) -> bool:
    """A list of strings."""
    return all(isinstance(s, str) for s in v)


def nonempty(v: str) -> bool:
    """A string with something in it (ids: "" names nothing)."""
    return v != ""


def random_seed(seed: int) -> int:
    """A request's seed, ``-1`` meaning a fresh random one (as llama.cpp and Ollama take it)."""
    return secrets.randbits(63) if seed == -1 else seed


def response_format(value: dict) -> Any:
    """A request's ``response_format`` (OpenAI's shape) checked and compiled: a
    ``constraints.ResponseFormat``, or None for ``{"type": "text"}``. A bad one is
    INVALID_PARAMS saying what is wrong (``json_schema.schema.properties.age.type: ...``)."""
    from assistant.inference.constraints import ConstraintError, parse_response_format

    try:
        return parse_response_format(value)
    except ConstraintError as exc:
        raise invalid(f"parameter 'response_format': {exc}") from None


# -- the core methods' parameters ------------------------------------------------


@dataclass
class Initialize:
    protocol_version: int | None = arg(int, None)
    client: str = arg(str, "?")


@dataclass
class Cancel:
    id: Any = arg((int, float, str), None, expected="the id of a request in flight (a string or a number)")


@dataclass
class ModelsLoad:
    model: str | None = arg(str, None)
    backend: str | None = arg(str, None)
    context: int | None = arg(int, None, check=lambda v: v >= 64, expected="an integer >= 64")
    threads: int | None = arg(int, None, check=lambda v: v >= 1, expected="an integer >= 1")


@dataclass
class ModelsUnload:
    model: str = arg(str)


@dataclass
class SessionId:
    id: str = arg(str, check=nonempty, expected="a session id (a non-empty string)")


@dataclass
class SessionsList:
    limit: int = arg(int, 100, check=lambda v: v > 0, expected="a positive integer")


@dataclass
class SessionsCreate:
    id: str | None = arg(str, None, check=nonempty, expected="a session id (a non-empty string)")
    title: str | None = arg(str, None)
    model: str | None = arg(str, None)
    system: str | None = arg(str, None)
    settings: dict | None = arg(dict, None)


@dataclass
class SessionsExport:
    id: str = arg(str, check=nonempty, expected="a session id (a non-empty string)")
    # where to write the Markdown, its media copied into a media/ folder beside it; absent: only returned
    path: str | None = arg(str, None, check=lambda v: v.startswith(("/", "~")) and "\x00" not in v,
                           expected="an absolute path (or one starting with ~) of the Markdown file to write")


@dataclass
class SessionsRewind:
    id: str = arg(str, check=nonempty, expected="a session id (a non-empty string)")
    message_id: int = arg(int)


@dataclass
class SkillsCall:
    name: str = arg(str)
    arguments: dict = arg(dict, {})


@dataclass
class EventsSubscribe:
    types: list = arg(list, ["*"], check=strings, expected="a list of event type patterns")
    backlog: int = arg(int, 50, check=lambda v: v >= 0, expected="an integer >= 0")


@dataclass
class EventsUnsubscribe:
    types: list | None = arg(list, None, check=strings, expected="a list of event type patterns")


@dataclass
class Chat:
    """``chat``: the conversation, where it is kept, the model and how to decode.

    Sampling keys left out take the config's and the model's defaults (see
    ``chat_settings``), so their defaults here are None."""

    # the user's message: a string, or a list of content parts (text, image, audio; see
    # assistant.daemon.media.parts), checked by conversation.from_request
    prompt: Any = arg((str, list), None, expected="a string or a list of content parts")
    messages: Any = arg(object, None)  # checked by conversation.check_messages
    session: str | None = arg(str, None, check=nonempty, expected="a session id (a non-empty string)")
    system: str | None = arg(str, None)
    model: str | None = arg(str, None)
    backend: str | None = arg(str, None)
    stop: list = arg(list, [], check=strings, expected="a list of strings")
    ignore_eos: bool = arg(bool, False)
    tools: Any = arg(object, None)  # true | [skill names]; checked against the skills
    temperature: float | None = arg(NUMBER, None, check=lambda v: 0 <= v <= 100, expected="a number >= 0")
    top_p: float | None = arg(NUMBER, None, check=lambda v: 0 < v <= 1, expected="a number in (0, 1]")
    top_k: int | None = arg(int, None, check=lambda v: v >= 0, expected="an integer >= 0")
    min_p: float | None = arg(NUMBER, None, check=lambda v: 0 <= v < 1, expected="a number in [0, 1)")
    repeat_penalty: float | None = arg(NUMBER, None, check=lambda v: 0 < v <= 100, expected="a number in (0, 100]")
    # -1 is "a random seed", as llama.cpp and Ollama take it; no negative seed reaches numpy.
    seed: int | None = arg(int, None, check=lambda v: v >= -1, expected="an integer >= 0, or -1 for a random seed",
                           convert=random_seed)
    max_tokens: int | None = arg(int, None, check=lambda v: v >= 1, expected="an integer >= 1")
    draft: str | None = arg(str, None)
    max_draft: Any = arg(object, None)  # checked by the speculative package (its own message)
    draft_model: str | None = arg(str, None, check=bool, expected="a model alias or path")
    # who waits: a person (the default) goes ahead of background work (automations, plugins)
    priority: str | None = arg(str, None, check=lambda v: v in ("interactive", "background"),
                               expected="'interactive' or 'background'")
    keep_alive: Any = arg((int, float, str), None)  # seconds or "10m"; checked by chat_settings.keep_alive
    # false: media the model cannot read itself are refused (MEDIA_UNSUPPORTED), not turned into
    # OCR or transcript text (vision.describe asks so); absent: the config's media.fallback
    media_fallback: bool | None = arg(bool, None)
    # structured output: {"type": "json_object"} | {"type": "json_schema", "json_schema": {...}}, OpenAI's
    # shape; parsed into a constraints.ResponseFormat (None for "text") with its grammar built
    response_format: Any = arg(dict, None, expected="an object: {\"type\": \"json_object\"} or "
                               "{\"type\": \"json_schema\", \"json_schema\": {...}}", convert=response_format)
