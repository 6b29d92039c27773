"""Typed request parameters, checked at the edge with one error format.

Each RPC method that takes parameters declares them as a dataclass whose
fields are made with ``arg()``; ``parse(cls, params)`` returns an instance
or raises INVALID_PARAMS naming the parameter and what was expected:

    @dataclass
    class SessionsList:
        limit: int = arg(int, 100, check=lambda v: v > 0, expected="a positive integer")

Rules, the same for every method: a missing or ``null`` parameter takes its
default (or is "missing parameter 'x'" when it has none); ``true``/``false``
never pass for a number; unknown parameters are ignored, as JSON-RPC
servers commonly do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from assistant.protocol import ErrorCode, RPCError

T = TypeVar("T")


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()
NUMBER = (int, float)


@dataclass(frozen=True)
class ArgSpec:
    types: type | tuple[type, ...]
    default: Any = REQUIRED
    check: Callable[[Any], bool] | None = None
    expected: str = ""

    def describe(self) -> str:
        if self.expected:
            return self.expected
        types = self.types if isinstance(self.types, tuple) else (self.types,)
        return " or ".join(t.__name__ for t in types)


def arg(types: type | tuple[type, ...], default: Any = REQUIRED, *, check: Callable[[Any], bool] | None = None,
        expected: str = "") -> Any:
    """A parameter field: its JSON types, default (``REQUIRED`` for none), an extra check and
    the words for what is expected (used in the error)."""
    spec = ArgSpec(types, default, check, expected)
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
    if ok and spec.check is not None:
        ok = bool(spec.check(value))
    if not ok:
        raise invalid(f"parameter {name!r}: expected {spec.describe()}, got {value!r}")
    return value


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


# -- the core methods' parameters ------------------------------------------------


@dataclass
class Initialize:
    protocol_version: int | None = arg(int, None)
    client: str = arg(str, "?")


@dataclass
class Cancel:
    id: Any = arg((int, str), None)


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
    id: str = arg(str)


@dataclass
class SessionsList:
    limit: int = arg(int, 100, check=lambda v: v > 0, expected="a positive integer")


@dataclass
class SessionsCreate:
    id: str | None = arg(str, None)
    title: str | None = arg(str, None)
    model: str | None = arg(str, None)
    system: str | None = arg(str, None)
    settings: dict | None = arg(dict, None)


@dataclass
class SessionsRewind:
    id: str = arg(str)
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
    types: list | None = arg(list, None)


@dataclass
class Chat:
    """``chat``: the conversation, where it is kept, the model and how to decode.

    Sampling keys left out take the config's and the model's defaults (see
    ``chat_settings``), so their defaults here are None."""

    prompt: str | None = arg(str, None)
    messages: Any = arg(object, None)  # checked by conversation.check_messages
    session: str | None = arg(str, None)
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
    repeat_penalty: float | None = arg(NUMBER, None, check=lambda v: v > 0, expected="a number > 0")
    seed: int | None = arg(int, None)
    max_tokens: int | None = arg(int, None, check=lambda v: v >= 1, expected="an integer >= 1")
    draft: str | None = arg(str, None)
    max_draft: Any = arg(object, None)  # checked by the speculative package (its own message)
    draft_model: str | None = arg(str, None, check=bool, expected="a model alias or path")
