"""Time, memory and recursion bounds for rendering untrusted chat templates.

A chat template is a program written by whoever made the model file (or by the caller, through
`chat_template=`). Jinja's sandbox keeps it away from Python objects but not from running for
minutes (`{{ 9 ** 9 ** 99 }}`, nested loops), exhausting memory (`'x' * 10 ** 10`, doubling a
string in a loop) or the stack (a macro calling itself). `BoundedEnvironment` closes those holes
from inside the render, so the thread never needs to be killed: every loop iteration, call,
operator, filter, test and output write checks a per-render `_Budget`, and every operation that
can amplify its inputs (`*`, `**`, `%`, `~`, `+`, padding, `replace`, `join`, format widths,
`range`) is checked *before* it computes. A template that crosses a bound stops with an
`InvalidParamsError` that names the bound.

"Size" below is the number of characters of a string, or of items of a list, tuple or dict
counted through nested containers (so `[x, x]` holding one big `x` counts it twice; this is what
stops a template from doubling a shared list until printing it never ends); an integer counts
one per byte. "Input" is what the template is given: messages, tools and template variables,
measured in values (`items`) and in items plus characters (`size`); the limits that real
templates approach grow with it, so long conversations keep rendering.

Limits:
  - RENDER_SECONDS (2 s) + RENDER_SECONDS_PER_INPUT_ITEM (10 us) per input item: wall clock.
  - MAX_LOOP_ITERATIONS (100,000) + LOOP_ITERATIONS_PER_INPUT_ITEM (64) per input item:
    `{% for %}` iterations in total, recursive loops included.
  - MAX_CALL_DEPTH (64): nested macro, `caller()`, `loop()` and block calls (recursion).
  - MAX_RANGE (100,000): items of one `range()`, `batch` or `slice` count (Jinja's own bound).
  - MAX_INT_BITS (4,096): bits of an integer result.
  - MAX_VALUE_SIZE (1 Mi) + 2 x input size: size of any single value the template builds.
  - MAX_NESTING (64): nesting depth of lists and dicts, built or given.
  - MAX_ALLOCATED (16 Mi) + 8 x input size: size of all values built in one render.
  - MAX_OUTPUT_CHARS (8 Mi) + 4 x input size: characters written, counting text written into
    macros and `{% set %}` blocks as well as the prompt itself.
  - MAX_INPUT_ITEMS (1,000,000): values in the input.
  - MAX_TEMPLATE_CHARS (256 Ki), MAX_TEMPLATE_TOKENS (16 Ki): length of the template source, in
    characters and in Jinja tokens; compiling costs about 50 us a token, real templates have at
    most a few thousand.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import string
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import jinja2
import jinja2.nodes as nodes
from jinja2.runtime import LoopContext, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from llama_engine.errors import InvalidParamsError

__all__ = [
    "LOOP_ITERATIONS_PER_INPUT_ITEM",
    "MAX_ALLOCATED",
    "MAX_CALL_DEPTH",
    "MAX_INPUT_ITEMS",
    "MAX_INT_BITS",
    "MAX_LOOP_ITERATIONS",
    "MAX_NESTING",
    "MAX_OUTPUT_CHARS",
    "MAX_RANGE",
    "MAX_TEMPLATE_CHARS",
    "MAX_TEMPLATE_TOKENS",
    "MAX_VALUE_SIZE",
    "RENDER_SECONDS",
    "RENDER_SECONDS_PER_INPUT_ITEM",
    "BoundedEnvironment",
    "InputStats",
    "limit_error",
    "render_bounded",
]

RENDER_SECONDS = 2.0
RENDER_SECONDS_PER_INPUT_ITEM = 1e-5
MAX_LOOP_ITERATIONS = 100_000
LOOP_ITERATIONS_PER_INPUT_ITEM = 64
MAX_CALL_DEPTH = 64
MAX_RANGE = 100_000
MAX_INT_BITS = 4096
MAX_VALUE_SIZE = 1 << 20
MAX_NESTING = 64
MAX_ALLOCATED = 16 << 20
MAX_OUTPUT_CHARS = 8 << 20
MAX_INPUT_ITEMS = 1_000_000
MAX_TEMPLATE_CHARS = 256 << 10
MAX_TEMPLATE_TOKENS = 16 << 10

_PRINTF_WIDTH = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d+))?")
_DIGITS = re.compile(r"\d+")


def limit_error(what: str) -> InvalidParamsError:
    """The error for a template that crossed a bound: what it did, and what to do about it."""
    return InvalidParamsError(
        f"the chat template {what}; chat templates are untrusted code and run within fixed "
        "bounds, so fix the template or pass a working one as chat_template="
    )


@dataclasses.dataclass(slots=True)
class InputStats:
    """What the template is given: `items` values, `chars` characters of strings among them."""

    items: int = 0
    chars: int = 0

    @property
    def size(self) -> int:
        return self.items + self.chars


class _Budget:
    """One render's limits and what it has used of them. Lives in `_BUDGET` while rendering."""

    __slots__ = (
        "allocated",
        "deadline",
        "depth",
        "iterations",
        "max_allocated",
        "max_iterations",
        "max_output",
        "max_value",
        "output",
        "seconds",
        "sizes",
    )

    def __init__(self, stats: InputStats) -> None:
        self.seconds = RENDER_SECONDS + RENDER_SECONDS_PER_INPUT_ITEM * stats.items
        self.deadline = time.monotonic() + self.seconds
        self.max_iterations = MAX_LOOP_ITERATIONS + LOOP_ITERATIONS_PER_INPUT_ITEM * stats.items
        self.max_value = MAX_VALUE_SIZE + 2 * stats.size
        self.max_allocated = MAX_ALLOCATED + 8 * stats.size
        self.max_output = MAX_OUTPUT_CHARS + 4 * stats.size
        self.iterations = self.allocated = self.output = self.depth = 0
        # id -> (container, size, depth); the container is kept so its id is not reused.
        # Lists, tuples and dicts cannot change under the immutable sandbox, so sizes stay true.
        self.sizes: dict[int, tuple[object, int, int]] = {}

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise limit_error(f"ran longer than its {self.seconds:.1f} s time limit")

    def iterate(self) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise limit_error(f"ran more than {self.max_iterations:,} loop iterations")
        self.tick()

    def expect(self, size: int, what: str) -> None:
        """Refuse, before computing it, a value of `size` that `what` would build."""
        if size > self.max_value:
            raise limit_error(
                f"{what} into a value of {size:,} items/characters (the limit is "
                f"{self.max_value:,})"
            )

    def emit(self, text: str) -> str:
        self.output += len(text)
        if self.output > self.max_output:
            raise limit_error(f"wrote more than {self.max_output:,} characters of output")
        self.tick()
        return text

    def charge(self, value: Any) -> Any:
        """Account for `value`, just built by the template; refuse it if it is too big."""
        if type(value) is str:  # the common case, kept cheap
            size = shallow = len(value)
        else:
            size = self.measure(value)[0]
            shallow = len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0
        if size > self.max_value:
            raise limit_error(f"built a value of more than {self.max_value:,} items/characters")
        self.allocated += shallow
        if self.allocated > self.max_allocated:
            raise limit_error(
                f"built more than {self.max_allocated:,} items/characters of values in total"
            )
        return value

    def measure(self, value: Any) -> tuple[int, int]:
        """(size, nesting depth) of `value`, refusing values over the size or nesting bound."""
        if isinstance(value, str | bytes):
            return len(value), 0
        if isinstance(value, int):
            bits = value.bit_length()
            if bits > MAX_INT_BITS:
                raise limit_error(
                    f"computed an integer of {bits:,} bits (the limit is {MAX_INT_BITS:,})"
                )
            return 1 + bits // 8, 0
        if isinstance(value, Namespace):
            return self._measure_children(_namespace_attrs(value), 0)
        if not isinstance(value, list | tuple | dict):
            return 1, 0
        hit = self.sizes.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1], hit[2]
        size, depth = self._measure_children(value, 0)
        self.sizes[id(value)] = (value, size, depth)
        return size, depth

    def _measure_children(
        self, value: list[Any] | tuple[Any, ...] | dict[Any, Any], level: int
    ) -> tuple[int, int]:
        if level > MAX_NESTING:
            raise limit_error(f"nested lists or dicts more than {MAX_NESTING} levels deep")
        children: Iterable[Any] = value
        if isinstance(value, dict):
            children = (x for kv in value.items() for x in kv)
        size, depth = len(value), 0
        for child in children:
            if isinstance(child, Namespace):
                raise limit_error(
                    "stored a namespace() inside a list, dict or another namespace, which is "
                    "not supported"
                )
            if isinstance(child, list | tuple | dict) and id(child) not in self.sizes:
                child_size, child_depth = self._measure_children(child, level + 1)
                self.sizes[id(child)] = (child, child_size, child_depth)
            else:
                child_size, child_depth = self.measure(child)
            size += child_size
            depth = max(depth, child_depth + 1)
            if size > self.max_value:
                raise limit_error(f"built a value of more than {self.max_value:,} items/characters")
        if depth > MAX_NESTING:
            raise limit_error(f"nested lists or dicts more than {MAX_NESTING} levels deep")
        return size, depth

    def take(self, iterable: Iterable[Any]) -> list[Any]:
        """`iterable` as a list, refusing one longer than the value bound."""
        if isinstance(iterable, list):
            return iterable
        items: list[Any] = []
        for item in iterable:
            items.append(item)
            if len(items) & 1023 == 0:
                self.expect(len(items), "collected an iterable")
                self.tick()
        return items


_BUDGET: ContextVar[_Budget | None] = ContextVar("llama_chat_template_budget", default=None)


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:  # also what keeps Jinja from folding guarded calls at compile time
        raise RuntimeError("chat templates render only through ChatTemplate.render")
    return budget


def _namespace_attrs(ns: Namespace) -> dict[str, Any]:
    attrs: dict[str, Any] = object.__getattribute__(ns, "_Namespace__attrs")
    return attrs


def check_stored(value: Any) -> None:
    """Refuse storing `value` on a namespace when it is too big or is itself a namespace."""
    budget = _BUDGET.get()
    if budget is None:
        return
    if isinstance(value, Namespace):
        raise limit_error("stored a namespace() inside another namespace, which is not supported")
    budget.measure(value)


# -- pre-checks for operations that amplify their inputs ------------------------------------------
def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _text_size(budget: _Budget, value: Any) -> int:
    return budget.measure(value)[0]


def _check_printf(budget: _Budget, fmt: str, args: Any, what: str) -> None:
    values = (
        list(args.values())
        if isinstance(args, Mapping)
        else (list(args) if isinstance(args, tuple) else [args])
    )
    widest = max((_text_size(budget, v) for v in values), default=0)
    widths = sum(int(w or 0) + int(p or 0) for w, p in _PRINTF_WIDTH.findall(fmt))
    if "*" in fmt:
        widths += sum(abs(v) for v in values if isinstance(v, int))
    budget.expect(len(fmt) + fmt.count("%") * widest + widths, what)


def _check_str_format(
    budget: _Budget, fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> None:
    specs = [spec or "" for _, name, spec, _ in string.Formatter().parse(fmt) if name is not None]
    values = [*args, *kwargs.values()]
    widest = max((_text_size(budget, v) for v in values), default=0)
    widths = sum(int(d) for spec in specs for d in _DIGITS.findall(spec))
    if any("{" in spec for spec in specs):
        widths += sum(abs(v) for v in values if isinstance(v, int))
    budget.expect(len(fmt) + len(specs) * widest + widths, "formatted a string with format()")


def _check_replace(budget: _Budget, s: str | bytes, old: Any, new: Any, count: Any) -> None:
    if not isinstance(old, str | bytes) or not isinstance(new, str | bytes):
        return
    try:
        hits = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]
    except TypeError:
        return
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    budget.expect(len(s) + hits * max(0, len(new) - len(old)), "replaced text")


def _join_size(budget: _Budget, items: list[Any], sep: Any) -> int:
    sep_len = len(sep) if isinstance(sep, str | bytes) else _text_size(budget, sep)
    return sum(_text_size(budget, x) for x in items) + sep_len * max(0, len(items) - 1)


def _arg(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str, default: Any = None
) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_str_method(
    budget: _Budget, s: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, ...]:
    """Pre-check a call of the str (or bytes) method `name` on `s`; returns the call's args."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _as_int(_arg(args, kwargs, 0, "width"))
        if width is not None:
            budget.expect(width, f"padded a string with {name}()")
    elif name == "expandtabs":
        tabsize = _as_int(_arg(args, kwargs, 0, "tabsize", 8)) or 0
        tabs = s.count("\t" if isinstance(s, str) else b"\t")  # type: ignore[arg-type]
        budget.expect(len(s) + tabs * max(tabsize, 0), "expanded tabs")
    elif name == "replace" and len(args) >= 2:
        _check_replace(budget, s, args[0], args[1], _arg(args, kwargs, 2, "count", -1))
    elif name == "join" and args:
        items = budget.take(args[0])
        budget.expect(_join_size(budget, items, s), "joined strings")
        return (items, *args[1:])
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.expect(len(s) * max(1, longest), "translated a string")
    elif name == "format" and isinstance(s, str):
        _check_str_format(budget, s, args, kwargs)
    elif name == "format_map" and isinstance(s, str) and args and isinstance(args[0], Mapping):
        _check_str_format(budget, s, (), args[0])
    return args


# Filter pre-checks: (budget, args without Jinja's context/environment argument, kwargs) -> args.
_FilterCheck = Callable[[_Budget, tuple[Any, ...], dict[str, Any]], tuple[Any, ...]]


def _check_center(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    width = _as_int(_arg(args, kw, 1, "width", 80))
    if width is not None:
        budget.expect(width, "padded a string with center")
    return args


def _check_indent(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    text = str(args[0]) if args else ""
    width = _arg(args, kw, 1, "width", 4)
    unit = len(width) if isinstance(width, str) else (_as_int(width) or 0)
    budget.expect(len(text) + (text.count("\n") + 1) * max(unit, 0), "indented text")
    return args


def _check_format(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    if args:
        _check_printf(budget, str(args[0]), kw or tuple(args[1:]), "formatted a string")
    return args


def _check_wordwrap(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    text = str(args[0]) if args else ""
    width = max(1, _as_int(_arg(args, kw, 1, "width", 79)) or 1)
    wrap = _arg(args, kw, 3, "wrapstring")
    wrap_len = len(wrap) if isinstance(wrap, str) else 1
    budget.expect(len(text) + (len(text) // width + 1) * wrap_len, "wrapped text")
    return args


def _check_replace_filter(
    budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]
) -> tuple[Any, ...]:
    if len(args) >= 3:
        _check_replace(budget, str(args[0]), args[1], args[2], _arg(args, kw, 3, "count"))
    return args


def _check_join(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    if not args:
        return args
    items = budget.take(args[0])
    budget.expect(_join_size(budget, items, _arg(args, kw, 1, "d", "")), "joined strings")
    return (items, *args[1:])


def _check_count(name: str, index: int, field: str) -> _FilterCheck:
    def check(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
        count = _as_int(_arg(args, kw, index, field))
        if count is not None and count > MAX_RANGE:
            raise limit_error(
                f"asked the {name} filter for {count:,} groups (the limit is {MAX_RANGE:,})"
            )
        return args

    return check


def _check_sum(budget: _Budget, args: tuple[Any, ...], kw: dict[str, Any]) -> tuple[Any, ...]:
    start = _arg(args, kw, 2, "start", 0)
    if not args or isinstance(start, int | float):
        return args
    items = budget.take(args[0])  # summing sequences copies the running total at every step
    total = _text_size(budget, start) + sum(_text_size(budget, x) for x in items)
    budget.expect(total * max(1, len(items)), "summed sequences")
    return (items, *args[1:])


_FILTER_CHECKS: dict[str, _FilterCheck] = {
    "center": _check_center,
    "indent": _check_indent,
    "format": _check_format,
    "wordwrap": _check_wordwrap,
    "replace": _check_replace_filter,
    "join": _check_join,
    "batch": _check_count("batch", 1, "linecount"),
    "slice": _check_count("slice", 1, "slices"),
    "sum": _check_sum,
}


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
    check = _FILTER_CHECKS.get(name)

    @functools.wraps(func)  # keeps `jinja_pass_arg`, so Jinja passes the same arguments
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        if check is not None:
            args = (*args[:skip], *check(budget, args[skip:], kwargs))
        return budget.charge(func(*args, **kwargs))

    return guarded


def _guard_test(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _budget().tick()
        return func(*args, **kwargs)

    return guarded


# -- functions the instrumented template calls ----------------------------------------------------
def _iterate(iterable: Any) -> Iterator[Any]:
    """What a `{% for %}` loops over: `iterable`, counting every iteration against the budget."""
    budget = _budget()
    for item in iterable:
        budget.iterate()
        yield item


def _value(value: Any) -> Any:
    """A list, tuple or dict literal (the call hook measures and charges it)."""
    return value


@jinja2.pass_context
def _concat(context: jinja2.runtime.Context, *parts: Any) -> str:
    """`a ~ b ~ ...`, refused before joining when the result would be too big."""
    budget = _budget()
    texts = [p if isinstance(p, str) else str(p) for p in parts]
    budget.expect(sum(map(len, texts)), "joined strings with '~'")
    return (markup_join if context.eval_ctx.autoescape else str_join)(texts)


def _range(*args: Any) -> range:
    try:
        size = len(range(*args))
    except OverflowError:
        size = MAX_RANGE + 1
    if size > MAX_RANGE:
        raise limit_error(f"asked for a range() of {size:,} items (the limit is {MAX_RANGE:,})")
    return range(*args)


def _finalize(value: Any) -> Any:
    """Every `{{ ... }}` and every piece of literal text passes here on its way out."""
    budget = _budget()
    if not isinstance(value, str):
        budget.measure(value)
        value = str(value)
    return budget.emit(value)


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so loops, literals, `~` and literal text reach the budget."""

    def __init__(self, environment: jinja2.Environment) -> None:
        self.environment = environment

    def _call(self, name: str, args: list[nodes.Expr], like: nodes.Node) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None)
        call.set_lineno(like.lineno or 1)
        call.set_environment(self.environment)
        return call

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = self._call("llama_iter", [node.iter], node)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        # Literal text is folded in at compile time and never reaches `finalize`; as a Const it
        # goes through `finalize` at run time like any other output, and is counted.
        node.nodes = [
            nodes.Const(child.data, lineno=child.lineno, environment=self.environment)
            if isinstance(child, nodes.TemplateData)
            else child
            for child in node.nodes
        ]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return self._call("llama_concat", list(node.nodes), node)

    def _literal(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        return self._call("llama_value", [node], node)

    visit_List = _literal
    visit_Dict = _literal

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        if node.ctx != "load":  # an assignment or loop target, not a value
            return self.generic_visit(node)
        return self._literal(node)


_BINOPS = ("+", "-", "*", "/", "//", "%", "**")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every loop, call, operator, filter and write budgeted.

    Add filters, tests and globals, then call `seal()` once; compile with `compile_bounded` and
    render with `render_bounded`.
    """

    intercepted_binops = frozenset(_BINOPS)
    llama_iter = staticmethod(_iterate)
    llama_value = staticmethod(_value)
    llama_concat = staticmethod(_concat)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=_finalize, **options)
        self.globals["range"] = _range
        self.globals.pop("lipsum", None)  # lorem ipsum of any length; no chat template uses it

    def seal(self) -> None:
        """Wrap every filter and test so that each application is budgeted."""
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _guard_test(f) for name, f in self.tests.items()}

    def count_tokens(self, source: str, limit: int) -> int:
        """Jinja tokens in `source`, counting no further than `limit` + 1 (compiling is costly)."""
        count = 0
        for _ in self.lex(source):
            count += 1
            if count > limit:
                break
        return count

    def compile_bounded(self, source: str) -> jinja2.Template:
        tree = self.parse(source)
        tree = _Instrument(self).visit(tree)
        return self.from_string(tree)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(target, types.BuiltinMethodType | types.MethodType):  # Markup's are Python
            if isinstance(owner, str | bytes):
                args = _check_str_method(budget, owner, target.__name__, args, kwargs)
            elif isinstance(owner, int) and target.__name__ == "to_bytes":
                length = _as_int(_arg(args, kwargs, 0, "length", 1))
                if length is not None:
                    budget.expect(length, "converted an integer to bytes")
        elif isinstance(obj, LoopContext) and args:  # `loop(children)` in a recursive loop
            args = (_iterate(args[0]), *args[1:])
        budget.depth += 1
        try:
            if budget.depth > MAX_CALL_DEPTH:
                raise limit_error(
                    f"nested macro or caller() calls more than {MAX_CALL_DEPTH} deep "
                    "(runaway recursion)"
                )
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.charge(result)

    def call_binop(
        self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any
    ) -> Any:
        budget = _budget()
        budget.tick()
        if operator == "+" and type(left) is str and type(right) is str:  # most template math
            budget.expect(len(left) + len(right), "joined values with '+'")
            return budget.charge(left + right)
        _check_binop(budget, operator, left, right)
        return budget.charge(self.binop_table[operator](left, right))


def _check_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "**" and ints:
        if right > 0 and abs(left) > 1:
            bits = (abs(left).bit_length() - 1) * right + 1  # at least this many
            if bits > MAX_INT_BITS:
                raise limit_error(
                    f"computed {_short(left)} ** {_short(right)}, an integer of about "
                    f"{bits:,} bits (the limit is {MAX_INT_BITS:,})"
                )
    elif operator == "*":
        if ints:
            bits = left.bit_length() + right.bit_length() - 1
            if bits > MAX_INT_BITS:
                raise limit_error(
                    f"computed a product of about {bits:,} bits (the limit is {MAX_INT_BITS:,})"
                )
        elif isinstance(right, int) and isinstance(left, str | bytes | list | tuple):
            budget.expect(budget.measure(left)[0] * right, "repeated a value with '*'")
        elif isinstance(left, int) and isinstance(right, str | bytes | list | tuple):
            budget.expect(budget.measure(right)[0] * left, "repeated a value with '*'")
    elif operator == "+":
        if isinstance(left, str | bytes | list | tuple) and isinstance(
            right, str | bytes | list | tuple
        ):
            budget.expect(
                budget.measure(left)[0] + budget.measure(right)[0], "joined values with '+'"
            )
    elif operator == "%" and isinstance(left, str):
        _check_printf(budget, left, right, "formatted a string with '%'")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:10]}...{text[-10:]}"


def render_bounded(template: jinja2.Template, variables: dict[str, Any], stats: InputStats) -> str:
    """Render `template` (compiled by a sealed `BoundedEnvironment`) within the bounds."""
    token = _BUDGET.set(_Budget(stats))
    try:
        return template.render(variables)
    finally:
        _BUDGET.reset(token)
