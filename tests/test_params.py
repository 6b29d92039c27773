"""The typed parameter layer (assistant.daemon.params): one error format for every method."""

from dataclasses import dataclass

import pytest

from assistant.daemon import methods, params
from assistant.protocol import ErrorCode, RPCError


@dataclass
class Example:
    name: str = params.arg(str)
    limit: int = params.arg(int, 10, check=lambda v: v > 0, expected="a positive integer")
    ratio: float | None = params.arg(params.NUMBER, None)
    flag: bool = params.arg(bool, False)
    tags: list = params.arg(list, [], check=params.strings, expected="a list of strings")


def _error(fn) -> RPCError:
    with pytest.raises(RPCError) as info:
        fn()
    assert info.value.code == ErrorCode.INVALID_PARAMS
    return info.value


def test_defaults_fill_missing_and_null_values():
    p = params.parse(Example, {"name": "x", "limit": None})
    assert (p.name, p.limit, p.ratio, p.flag, p.tags) == ("x", 10, None, False, [])


def test_a_mutable_default_is_not_shared_between_requests():
    a = params.parse(Example, {"name": "a"})
    a.tags.append("changed")
    assert params.parse(Example, {"name": "b"}).tags == []


def test_missing_required_parameter_is_named():
    assert _error(lambda: params.parse(Example, {})).message == "missing parameter 'name'"


@pytest.mark.parametrize("value", [True, "3", 1.5, [1]])
def test_wrong_type_names_parameter_and_value(value):
    err = _error(lambda: params.parse(Example, {"name": "x", "limit": value}))
    assert err.message == f"parameter 'limit': expected a positive integer, got {value!r}"


def test_bool_is_not_a_number_but_is_a_bool():
    _error(lambda: params.parse(Example, {"name": "x", "ratio": True}))
    assert params.parse(Example, {"name": "x", "flag": True}).flag is True


def test_check_failure_and_list_items():
    _error(lambda: params.parse(Example, {"name": "x", "limit": 0}))
    err = _error(lambda: params.parse(Example, {"name": "x", "tags": ["a", 1]}))
    assert "expected a list of strings" in err.message


def test_object_parameters_take_any_json_value():
    @dataclass
    class Any_:
        tools: object = params.arg(object, None)

    assert params.parse(Any_, {"tools": True}).tools is True
    assert params.parse(Any_, {"tools": ["a"]}).tools == ["a"]


def test_unknown_parameters_are_ignored():
    assert params.parse(Example, {"name": "x", "other": 1}).name == "x"


def test_every_core_method_is_registered_once_beside_its_handler():
    names = [m.name for m in methods.all_methods()]
    assert len(names) == len(set(names))
    assert {"initialize", "chat", "cancel", "sessions.rewind", "events.subscribe", "skills.call"} <= set(names)
    for m in methods.all_methods():
        # the handler lives in the module of its area (methods/<area>.py)
        assert m.handler.__module__.startswith("assistant.daemon.methods.")
        assert m.params is None or hasattr(m.params, "__dataclass_fields__")
