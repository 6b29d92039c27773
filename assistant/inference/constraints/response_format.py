"""``response_format``: what a request asks its reply to be, in OpenAI's shape.

    {"type": "text"}                      no constraint (the default)
    {"type": "json_object"}               any JSON object
    {"type": "json_schema",
     "json_schema": {"name": "...", "schema": {...}, "strict": true, "description": "..."}}

:func:`parse_response_format` checks a value of that shape and turns the
schema into an llguidance grammar once, at the edge, so a bad schema is
refused before anything is stored or queued. The errors say what is wrong
and, where the metaschema can tell, where (``json_schema.schema.properties.
age.type: 'nonsense' is not valid under any of the given schemas``). No
``$ref`` is ever fetched: only references inside the schema resolve.

``strict: true`` refuses schema keywords the grammar engine cannot enforce
(an unknown ``format``, say); without it (OpenAI's default, ``false``) they
are ignored, as OpenAI does outside strict mode, and listed in
``ResponseFormat.warnings``. Everything the engine does enforce holds for
every reply that ends on its own (``finish_reason: "stop"``); a reply cut by
``max_tokens`` or a stop string is a prefix of such a reply, no more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

TYPES = ("text", "json_object", "json_schema")
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
MAX_DEPTH = 64  # of objects and arrays in a schema: deeper is refused before any recursive code sees it
# Parsing runs where the request arrives (the daemon's event loop), so its cost is bounded
# by the size of the schema: values (objects, arrays, scalars) and object properties, which
# cost llguidance the most (measured on 2 cores: 1,000 properties 40 ms, 5,000 0.65 s; a
# 10,000-value enum 37 ms). OpenAI allows 5,000 properties; a schema that big is refused
# here, with the reason. Only a schema llguidance refuses goes through jsonschema's
# metaschema check too, for an error that names the place, and only a small one: that check
# costs about 0.3 ms per property.
MAX_NODES = 20_000
MAX_PROPERTIES = 1_000
META_CHECK_NODES = 2_000
# Whitespace between JSON tokens: none, a space, or one or two newlines and up to 20 spaces
# or tabs of indentation (llama.cpp's json-schema-to-grammar rule). Unbounded whitespace lets a
# small model fill the whole reply with newlines, a known failure of constrained JSON.
WHITESPACE = r"(\x20|\x0A{1,2}[\x20\x09]{0,20})?"


class ConstraintError(ValueError):
    """A bad ``response_format``, or a grammar that cannot go on (the message says which)."""


@dataclass(frozen=True)
class ResponseFormat:
    """A checked ``response_format`` that constrains the reply (``text`` is None instead).

    ``grammar`` is the llguidance grammar built from it; ``to_openai()`` gives
    back the request's own shape (for a backend that forwards it to a
    remote server rather than constraining locally)."""

    type: str  # "json_object" | "json_schema"
    schema: dict[str, Any] | None = None
    name: str | None = None
    description: str | None = None
    strict: bool = False
    grammar: str = field(default="", repr=False, compare=False)
    warnings: tuple[str, ...] = ()

    def to_openai(self) -> dict[str, Any]:
        """The value as OpenAI's API takes it."""
        if self.type == "json_object":
            return {"type": "json_object"}
        spec: dict[str, Any] = {"name": self.name, "strict": self.strict}
        if self.schema is not None:
            spec["schema"] = self.schema
        if self.description is not None:
            spec["description"] = self.description
        return {"type": "json_schema", "json_schema": spec}


def parse_response_format(value: Any) -> ResponseFormat | None:
    """``value`` (a request's ``response_format``) checked: None for ``text``, else a
    :class:`ResponseFormat` with its grammar built. Raises :class:`ConstraintError`
    naming what is wrong."""
    if not isinstance(value, dict):
        raise ConstraintError(f"expected an object with a 'type' ({_types()}), got {type(value).__name__}")
    kind = value.get("type")
    if kind not in TYPES:
        raise ConstraintError(f"'type' must be one of {_types()}, got {kind!r}"[:200])
    if kind == "text":
        return None
    if kind == "json_object":
        return _built(ResponseFormat("json_object"), {"type": "object"})
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ConstraintError("type 'json_schema' needs a 'json_schema' object: {\"name\": ..., \"schema\": {...}}")
    name, schema, strict = spec.get("name"), spec.get("schema"), spec.get("strict")
    description = spec.get("description")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConstraintError("json_schema.name must be 1 to 64 letters, digits, '_' or '-', "
                              f"got {_shown(name)}")
    if strict is not None and not isinstance(strict, bool):
        raise ConstraintError(f"json_schema.strict must be true, false or null, got {_shown(strict)}")
    if description is not None and not isinstance(description, str):
        raise ConstraintError(f"json_schema.description must be a string, got {_shown(description)}")
    if schema is not None and not isinstance(schema, dict):
        raise ConstraintError(f"json_schema.schema must be a JSON Schema object, got {type(schema).__name__}")
    fmt = ResponseFormat("json_schema", schema, name, description, bool(strict))
    # No schema: any JSON value (OpenAI makes the schema optional).
    return _built(fmt, schema if schema is not None else {})


def _built(fmt: ResponseFormat, schema: dict[str, Any]) -> ResponseFormat:
    """``fmt`` with the grammar of ``schema``; a schema that cannot be enforced is refused."""
    nodes = _check_size(schema)
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a hard dependency; a broken install says so
        raise ConstraintError("structured output needs the llguidance package, which is not installed") from None
    options = {"whitespace_pattern": WHITESPACE, "lenient": not fmt.strict}
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    except (ValueError, TypeError) as exc:
        raise ConstraintError(f"json_schema.schema: {exc}") from None
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        if nodes <= META_CHECK_NODES:
            _check_schema(schema)  # an invalid schema: say where
        raise ConstraintError(f"json_schema.schema cannot be enforced: {_clean(messages[0])}"
                              + (" (without strict, unsupported keywords are ignored)" if fmt.strict else ""))
    return ResponseFormat(fmt.type, fmt.schema, fmt.name, fmt.description, fmt.strict, grammar,
                          tuple(_clean(m) for m in messages))


def _check_schema(schema: dict[str, Any]) -> None:
    """The schema against its metaschema (``$schema``, default draft 2020-12); fetches nothing."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    err = jsonschema.exceptions.best_match(cls(cls.META_SCHEMA).iter_errors(schema))
    if err is not None:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise ConstraintError(f"json_schema.schema{where}: {_clean(err.message)}")


def _check_size(schema: Any) -> int:
    """The number of values in ``schema``; one nested deeper than MAX_DEPTH, with more
    than MAX_NODES values or MAX_PROPERTIES properties is refused (iteratively: no
    recursion to exhaust)."""
    stack, nodes, properties = [(schema, 1)], 0, 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if depth > MAX_DEPTH:
            raise ConstraintError(f"json_schema.schema is nested more than {MAX_DEPTH} levels deep")
        if nodes > MAX_NODES:
            raise ConstraintError(f"json_schema.schema has more than {MAX_NODES} values; make it smaller")
        if isinstance(node, dict):
            props = node.get("properties")
            properties += len(props) if isinstance(props, dict) else 0
            if properties > MAX_PROPERTIES:
                raise ConstraintError(f"json_schema.schema has more than {MAX_PROPERTIES} object properties "
                                      "in all; make it smaller")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    return nodes


def _types() -> str:
    return ", ".join(repr(t) for t in TYPES)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _clean(message: str) -> str:
    """One line, bounded: an engine's message as an error shows it."""
    text = " ".join(str(message).split())
    return text if len(text) <= 300 else text[:300] + "..."
