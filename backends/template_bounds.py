"""Bounds on what rendering a chat template may cost: time, output and value sizes.

A chat template comes with the model file, so a malicious GGUF can carry
one built to stall or exhaust the process (nested loops, ``'a' * 10**8``,
a self-doubling namespace). Jinja's sandbox stops it from reaching Python
internals but not from spending CPU and memory; this module adds the bounds
(:func:`environment` builds the environment, :func:`render` renders):

- **time**: a deadline per render. Every ``{% for %}`` iterates through
  :meth:`BoundedEnvironment.bounded_loop` (the parsed template is rewritten
  so), which checks it every 64 items, and every operator, call, filter and
  output hook below checks it too. Jinja has no other way to loop: a macro
  that recurses goes through the call hook (and Python's recursion limit).
  A trace function (sys.settrace) would do the same for any code but cost
  about 1 ms more per 50-message render; this costs about 0.2 ms.
- **output**: the output is streamed and stops once over ``max_chars``
  (``base_chars`` plus ``chars_per_input_char`` times the conversation's
  size, so a long conversation is never refused for its length).
- **values**: the operators that build big values (``*``, ``**``, ``+``,
  ``%``, ``~``), ``range``, the string methods and filters that grow a
  value by an argument (``center``, ``ljust``, ``replace``, ``join``,
  ``indent``, ``wordwrap``, ``format``, ...) and every value written out or
  turned into a string are checked *before* the value is made, so no single
  step allocates more than the bound. ``lipsum`` and ``urlize`` are removed
  (no chat template needs them, and both grow text by their arguments);
  ``sum`` adds step by step under the same checks.

Going over a bound raises :class:`TemplateBoundError` (a ``BackendError``).
Not bounded: one C-level step that is slow without being big (none is
known to be reachable within the value bounds), and memory held by many
values each under the bound (the time bound ends such a render).
"""

from __future__ import annotations

import collections.abc
import functools
import itertools
import re
import string
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.runtime import markup_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_environment

from .chat_template import TemplateBoundError


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may cost. The defaults leave a normal render (a few
    milliseconds, a few KB) orders of magnitude below every bound."""

    seconds: float = 2.0
    base_chars: int = 1 << 20           # output and any one value: 1 Mi characters...
    chars_per_input_char: int = 4       # ...plus 4 per character of the conversation
    max_range: int = 100_000            # items in one range()
    max_width: int = 100_000            # a width, count or repeat argument (center, batch, %9d...)
    max_int_bits: int = 1 << 16         # an integer made by * or ** (about 19,700 digits)
    max_source_chars: int = 256 * 1024  # the template's own source (real ones are under 30 KB)

    def max_chars(self, input_chars: int) -> int:
        return self.base_chars + self.chars_per_input_char * input_chars


DEFAULT_LIMITS = TemplateLimits()


# -- the budget of the render in progress ---------------------------------------------


class Budget:
    """The bounds of one render: its deadline and its size bound."""

    def __init__(self, limits: TemplateLimits, input_chars: int, *, timed: bool = True):
        self.limits = limits
        self.max_chars = limits.max_chars(input_chars)
        self.deadline = time.monotonic() + limits.seconds if timed else float("inf")

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateBoundError(f"the chat template ran longer than {self.limits.seconds:g} s")

    def check_size(self, n: int, what: str) -> None:
        if n > self.max_chars:
            raise TemplateBoundError(f"the chat template would make {what} of {n:,} characters "
                                     f"(the bound is {self.max_chars:,})")

    def check_width(self, n: Any, what: str) -> None:
        if isinstance(n, int) and n > self.limits.max_width:
            raise TemplateBoundError(f"the chat template asked for {what} of {n:,} "
                                     f"(the bound is {self.limits.max_width:,})")

    def check_value(self, value: Any, what: str) -> None:
        self.check_size(weight(value, self.max_chars), what)


_local = threading.local()
# Outside a render (compiling, a test poking at the environment): the default size bounds, no deadline.
_IDLE = Budget(DEFAULT_LIMITS, 0, timed=False)


def current() -> Budget:
    return getattr(_local, "budget", None) or _IDLE


@contextmanager
def bounded(limits: TemplateLimits, input_chars: int) -> Iterator[Budget]:
    """Make ``limits`` the bounds of what runs on this thread inside the block."""
    budget = Budget(limits, input_chars)
    previous = getattr(_local, "budget", None)
    _local.budget = budget
    try:
        yield budget
    finally:
        _local.budget = previous


def render(template: Any, variables: dict[str, Any], limits: TemplateLimits = DEFAULT_LIMITS) -> str:
    """Render ``template`` (compiled by :func:`environment`) within ``limits``, streaming its output."""
    input_chars = weight(variables, sys.maxsize)
    with bounded(limits, input_chars) as budget:
        parts: list[str] = []
        total = 0
        for chunk in template.generate(**variables):
            total += len(chunk)
            budget.check_size(total, "an output")
            parts.append(chunk)
        return "".join(parts)


# -- how big a value is once written out -------------------------------------------------


def weight(value: Any, limit: int) -> int:
    """About ``len(str(value))``, without making the string; stops counting past ``limit``.

    Shared parts are counted each time they appear (as str() would write
    them) but walked once, so a structure that doubles itself by reference
    costs as many steps as it has distinct parts.
    """
    memo: dict[int, int] = {}

    def walk(v: Any) -> int:
        if isinstance(v, (str, bytes, bytearray)):
            return len(v)
        if isinstance(v, int):
            return v.bit_length() // 3 + 2  # an over-estimate of its decimal digits
        if isinstance(v, (float, complex, type(None), range)):
            return 32
        children = _children(v)
        if children is None:
            return 64  # an object's repr: its type and address
        key = id(v)
        if key in memo:
            return memo[key]
        memo[key] = 8  # a cycle (str() writes "[...]")
        total = 2
        for child in children:
            total += walk(child) + 2
            if total > limit:
                break
        memo[key] = total
        return total

    try:
        return walk(value)
    except RecursionError:
        raise TemplateBoundError("the chat template made a value nested too deeply") from None


def _children(v: Any) -> Iterable[Any] | None:
    if isinstance(v, collections.abc.Mapping):
        return itertools.chain.from_iterable(v.items())
    if isinstance(v, (list, tuple, set, frozenset, collections.abc.MappingView)):
        return v
    if isinstance(v, Namespace):
        return _children(getattr(v, "_Namespace__attrs", {}))
    return None


def _check_result(budget: Budget, result: Any) -> None:
    if isinstance(result, (str, bytes, list, tuple, dict, set)):
        budget.check_size(len(result), "a value")


# -- operators ------------------------------------------------------------------------------

_SEQUENCES = (str, bytes, list, tuple)


def _check_mul(budget: Budget, left: Any, right: Any) -> None:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > budget.limits.max_int_bits:
            raise TemplateBoundError("the chat template multiplied integers too large")
        return
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, _SEQUENCES) and isinstance(n, int) and n > 0:
            budget.check_size(weight(seq, budget.max_chars) * n, "a repeated value")


def _check_pow(budget: Budget, base: Any, exponent: Any) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        if base.bit_length() * exponent > budget.limits.max_int_bits:
            raise TemplateBoundError(f"the chat template computed a power too large ({base.bit_length()}-bit "
                                     f"number to the {exponent:,})")


def _check_add(budget: Budget, left: Any, right: Any) -> None:
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        budget.check_size(weight(left, budget.max_chars) + weight(right, budget.max_chars), "a sum")


# %-format directives: the optional (key), flags, width, precision and conversion.
_PERCENT = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d*)(?:\.(\*|\d*))?[a-zA-Z%]")


def _percent_args(args: Any) -> list[Any]:
    if isinstance(args, tuple):
        return list(args)
    if isinstance(args, collections.abc.Mapping):
        return list(args.values())
    return [args]


def _check_percent(budget: Budget, fmt: Any, args: Any) -> None:
    """``fmt % args``: bound the widths and precisions, and the text the fields can make."""
    if not isinstance(fmt, str):
        return
    values = _percent_args(args)
    directives = _PERCENT.findall(fmt)
    widest = 0
    for width, precision in directives:
        for spec in (width, precision):
            if spec == "*":
                for v in values:
                    budget.check_width(v, "a %-format width")
            elif spec:
                budget.check_width(int(spec[:12]), "a %-format width")
                widest = max(widest, int(spec[:12]))
    fields = len(directives)
    biggest = max((weight(v, budget.max_chars) for v in values), default=0)
    budget.check_size(len(fmt) + fields * (biggest + widest), "a %-formatted string")


def _check_str_format(budget: Budget, fmt: str, args: tuple, kwargs: dict) -> None:
    """``fmt.format(...)``: the same for str.format's specs (nested ``{}`` specs are arguments)."""
    fields = widest = 0
    nested = False
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        fields += 1
        nested = nested or "{" in (spec or "")
        for digits in re.findall(r"\d+", spec or ""):
            budget.check_width(int(digits[:12]), "a format width")
            widest = max(widest, int(digits[:12]))
    values = [*args, *kwargs.values()]
    if nested:  # "{:{}}": a width can come from the arguments
        for v in values:
            budget.check_width(v, "a format width")
        widest = max([widest, *(v for v in values if isinstance(v, int))])
    biggest = max((weight(v, budget.max_chars) for v in values), default=0)
    budget.check_size(len(fmt) + fields * (biggest + widest), "a formatted string")


_BINOP_CHECKS: dict[str, Callable[[Budget, Any, Any], None]] = {
    "*": _check_mul, "**": _check_pow, "+": _check_add, "%": _check_percent,
}


# -- string methods and filters that grow a value by an argument ----------------------------


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _grow_width(budget: Budget, s: Any, args: tuple, kwargs: dict) -> None:
    budget.check_width(_arg(args, kwargs, 0, "width", 0), "a width")


def _grow_expandtabs(budget: Budget, s: Any, args: tuple, kwargs: dict) -> None:
    tab = _arg(args, kwargs, 0, "tabsize", 8)
    if isinstance(tab, int):
        budget.check_width(tab, "a tab size")
        budget.check_size(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * tab, "an expanded string")


def _grow_replace(budget: Budget, s: Any, args: tuple, kwargs: dict) -> None:
    old, new = _arg(args, kwargs, 0, "old"), _arg(args, kwargs, 1, "new")
    count = _arg(args, kwargs, 2, "count", -1)
    if not isinstance(s, (str, bytes)) or type(old) is not type(s) or type(new) is not type(s):
        return  # the call itself says what is wrong
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.check_size(len(s) + hits * max(len(new) - len(old), 0), "a replaced string")


def _grow_translate(budget: Budget, s: Any, args: tuple, kwargs: dict) -> None:
    table = _arg(args, kwargs, 0, "table")
    if isinstance(s, str) and isinstance(table, collections.abc.Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
        budget.check_size(len(s) * max(longest, 1), "a translated string")


def _grow_join(budget: Budget, sep: Any, items: list, what: str = "a joined string") -> None:
    size = sum(weight(x, budget.max_chars) for x in items)
    budget.check_size(size + weight(sep, budget.max_chars) * max(len(items) - 1, 0), what)


_METHOD_CHECKS: dict[str, Callable[[Budget, Any, tuple, dict], None]] = {
    "center": _grow_width, "ljust": _grow_width, "rjust": _grow_width, "zfill": _grow_width,
    "expandtabs": _grow_expandtabs, "replace": _grow_replace, "translate": _grow_translate,
}


def _check_method(budget: Budget, obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Checks a str/bytes method call before it runs; returns the args (join's iterable made a list)."""
    # The sandbox hands out str.format wrapped (functools.update_wrapper): look through it.
    method = getattr(obj, "__wrapped__", obj)
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, (str, bytes)):
        return args
    name = getattr(method, "__name__", "")
    if name == "join" and args:
        items = list(args[0])
        _grow_join(budget, owner, items)
        return (items, *args[1:])
    if name in ("format", "format_map") and isinstance(owner, str):
        mapping = args[0] if name == "format_map" and args else None
        _check_str_format(budget, owner, () if mapping is not None else args,
                          dict(mapping) if isinstance(mapping, collections.abc.Mapping) else kwargs)
        return args
    check = _METHOD_CHECKS.get(name)
    if check is not None:
        check(budget, owner, args, kwargs)
    return args


def _filter_indent(budget: Budget, vals: tuple, kwargs: dict) -> None:
    s, width = vals[0], _arg(vals, kwargs, 1, "width", 4)
    step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    budget.check_width(step, "an indent")
    if isinstance(s, str):
        budget.check_size(len(s) + (s.count("\n") + 1) * step, "an indented string")


def _filter_wordwrap(budget: Budget, vals: tuple, kwargs: dict) -> None:
    s, wrap = vals[0], _arg(vals, kwargs, 3, "wrapstring") or "\n"
    if isinstance(s, str) and isinstance(wrap, str):
        budget.check_size(len(s) + (len(s) + 1) * len(wrap), "a wrapped string")


def _filter_join(budget: Budget, vals: tuple, kwargs: dict) -> tuple:
    items = list(vals[0])
    _grow_join(budget, _arg(vals, kwargs, 1, "d", ""), items)
    return (items, *vals[1:])


def _filter_replace(budget: Budget, vals: tuple, kwargs: dict) -> None:
    _grow_replace(budget, vals[0], vals[1:], kwargs)


def _filter_format(budget: Budget, vals: tuple, kwargs: dict) -> None:
    _check_percent(budget, vals[0], kwargs or tuple(vals[1:]))


def _filter_counts(name: str, index: int) -> Callable[[Budget, tuple, dict], None]:
    def check(budget: Budget, vals: tuple, kwargs: dict) -> None:
        budget.check_width(_arg(vals, kwargs, index, name, 0), f"a {name}")
    return check


# Checks before a filter runs; those returning a tuple replace the filter's arguments.
_FILTER_CHECKS: dict[str, Callable[[Budget, tuple, dict], Any]] = {
    "center": _filter_counts("width", 1), "indent": _filter_indent, "wordwrap": _filter_wordwrap,
    "join": _filter_join, "replace": _filter_replace, "format": _filter_format,
    "batch": _filter_counts("linecount", 1), "slice": _filter_counts("slices", 1),
    "truncate": _filter_counts("length", 1),
}

# Filters that never write their value out as text: no need to weigh it first.
_STRUCTURAL_FILTERS = frozenset({
    "abs", "attr", "batch", "count", "d", "default", "dictsort", "first", "float", "groupby", "int", "items",
    "last", "length", "list", "map", "max", "min", "random", "reject", "rejectattr", "reverse", "round",
    "select", "selectattr", "slice", "sort", "sum", "unique", "filesizeformat", "wordcount",
})


def _bounded_filter(name: str, func: Callable) -> Callable:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # context / env / eval ctx
    check = _FILTER_CHECKS.get(name)
    weigh = name not in _STRUCTURAL_FILTERS

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja passes what the filter asks for
    def bounded_filter(*args: Any, **kwargs: Any) -> Any:
        budget = current()
        budget.check_time()
        head, vals = args[:skip], args[skip:]
        if vals and weigh:
            budget.check_value(vals[0], f"the value given to the {name!r} filter")
        if vals and check is not None:
            replaced = check(budget, vals, kwargs)
            if replaced is not None:
                args = (*head, *replaced)
        result = func(*args, **kwargs)
        _check_result(budget, result)
        return result

    return bounded_filter


@pass_environment
def _sum(environment: "BoundedEnvironment", iterable: Iterable, attribute: Any = None, start: Any = 0) -> Any:
    """Jinja's ``sum``, one checked ``+`` at a time (builtin sum() of lists is quadratic and unchecked)."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        total = environment.call_binop(None, "+", total, item)
    return total


def _range(*args: int) -> range:
    """``range`` with at most ``max_range`` items (Jinja's own raises OverflowError past 100,000)."""
    rng = range(*args)
    budget = current()
    try:
        n = len(rng)
    except OverflowError:
        n = sys.maxsize
    if n > budget.limits.max_range:
        raise TemplateBoundError(f"the chat template asked for a range of {n:,} items "
                                 f"(the bound is {budget.limits.max_range:,})")
    return rng


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}``: weighed before it is written out."""
    if not isinstance(value, str):
        current().check_value(value, "an output value")
    return value


def _concat(parts: Iterable[str]) -> str:
    """Output buffers (macros, ``{% set %}`` blocks, filter blocks) joined under the bound."""
    budget = current()
    out: list[str] = []
    total = 0
    for part in parts:
        total += len(part)
        budget.check_size(total, "a block's output")
        out.append(part)
    return "".join(out)


# -- the environment ------------------------------------------------------------------------


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to a bounded join (Jinja's own str_join/markup_join is not interceptable)."""

    def visit_Concat(self, node, frame) -> None:  # noqa: N802 - Jinja's visitor naming
        if frame.eval_ctx.volatile:
            escape = "context.eval_ctx.autoescape"
        else:
            escape = repr(bool(frame.eval_ctx.autoescape))
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write(f"), {escape})")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the bounds of this module on every operator, call and filter."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(_BINOP_CHECKS)

    def __init__(self, **options: Any):
        # optimized=False: no constant folding, which would run filters and
        # operators at compile time, outside every bound.
        super().__init__(optimized=False, finalize=_finalize, **options)
        self.concat = _concat
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)
        self.filters.pop("urlize", None)
        self.filters["sum"] = _sum

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Parse, then make every ``{% for %}`` iterate through :meth:`bounded_loop`."""
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_loop"), [loop.iter], [], None, None,
                                   lineno=loop.lineno)
        tree.set_environment(self)
        return tree

    @staticmethod
    def bounded_loop(iterable: Iterable) -> Iterator:
        """A loop's items, with the deadline checked every 64: loops are where time goes (calls,
        operators and filters check it themselves)."""
        budget = getattr(_local, "budget", None) or _IDLE
        for i, item in enumerate(iterable):
            if not i & 63 and time.monotonic() > budget.deadline:
                budget.check_time()
            yield item

    def bound_filters(self) -> None:
        """Wrap every filter (call once all are added) in its checks."""
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        # This runs for every operator of every render: the common case stays inline.
        budget = getattr(_local, "budget", None) or _IDLE
        if time.monotonic() > budget.deadline:
            budget.check_time()
        if operator == "+" and type(left) is str and type(right) is str:
            if len(left) + len(right) > budget.max_chars:
                budget.check_size(len(left) + len(right), "a sum")
            return left + right
        _BINOP_CHECKS[operator](budget, left, right)
        result = self.binop_table[operator](left, right)
        _check_result(budget, result)
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's
        budget = current()
        budget.check_time()
        args = _check_method(budget, __obj, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        _check_result(budget, result)
        return result

    def bounded_concat(self, parts: tuple, autoescape: bool) -> str:
        """``a ~ b ~ ...``: each part weighed before it becomes text."""
        budget = current()
        budget.check_time()
        total = 0
        for part in parts:
            total += len(part) if isinstance(part, str) else weight(part, budget.max_chars)
            budget.check_size(total, "a concatenation")
        return markup_join(parts) if autoescape else "".join(map(str, parts))


def environment(*, filters: dict[str, Callable] | None = None, globals: dict[str, Any] | None = None,
                **options: Any) -> BoundedEnvironment:
    """A bounded sandbox with extra ``filters`` and ``globals``; every filter wrapped in its checks."""
    env = BoundedEnvironment(**options)
    env.filters.update(filters or {})
    env.globals.update(globals or {})
    env.bound_filters()
    return env
