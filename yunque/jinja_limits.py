"""Time and size bounds for untrusted chat templates (the sandbox itself is in jinja_sandbox.py).

Jinja's sandbox stops a template from reaching the interpreter, not from running forever or
building gigabytes: `{% for i in range(99999) %}{% for j in range(99999) %}` never ends in
practice, `{{ 'x' * 10**9 }}` allocates a gigabyte in one C call, and a few nested list
literals (`[l, l, l, l]` four levels deep) stand for a string a million times longer than
the template. Three bounds together keep every render small and short:

- size: every string, list or dict the template builds (operators `* + ~ %`, list and dict
  literals, filters, method and function calls) and every value it prints is measured before
  it is built or converted to text; nothing may exceed MAX_CHARS characters, the rendered
  prompt included. Integers are bounded too (`**`, `*`), since their digits are memory.
- time: a watchdog thread raises `RenderTimeout` inside a render that runs past
  RENDER_SECONDS (checked between Python bytecodes, so any loop stops).
- depth: recursion (macros calling themselves) ends in RecursionError, reported as a failure.

A legitimate chat template renders a conversation in milliseconds and far below the limits.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import jinja2
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 1 << 22  # 4 Mi characters: ~1M tokens, above any context window this runs
MAX_INT_BITS = 1 << 16
RENDER_SECONDS = 3.0
_SEQ = (str, list, tuple)


class TemplateTooLarge(jinja2.TemplateError):
    """The template would build or print more than MAX_CHARS characters (or a huge integer)."""


class RenderTimeout(BaseException):  # noqa: N818  (BaseException: a template's own `except Exception` must not stop it)
    """Raised asynchronously inside a render that ran past RENDER_SECONDS."""


def weight(x: Any, limit: int | None = None) -> int:
    """An upper bound on the characters `str(x)` can produce (containers counted through),
    computed without building it; stops counting once past `limit`."""
    limit = MAX_CHARS if limit is None else limit
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple, set, frozenset)):
            total += 2 * len(v) + 2
            stack.extend(v)
        elif isinstance(v, dict):
            total += 4 * len(v) + 2
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, jinja2.utils.Namespace):
            total += 16
            stack.append(dict(v._Namespace__attrs))  # type: ignore[attr-defined]
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3 + 2
        else:
            total += 24  # numbers, None, Undefined, loop objects: short reprs
    return total


def _too_large(what: str, n: int | str) -> TemplateTooLarge:
    if isinstance(n, int):
        return TemplateTooLarge(f"{what} would make {n:,} characters (the limit is {MAX_CHARS:,})")
    return TemplateTooLarge(f"{what}: {n} (the limit is {MAX_CHARS:,} characters)")


def check(x: Any, what: str = "a value") -> Any:
    if isinstance(x, str):
        if len(x) > MAX_CHARS:
            raise _too_large(what, len(x))
    elif isinstance(x, int) and not isinstance(x, bool):
        if x.bit_length() > MAX_INT_BITS:
            raise _too_large(what, f"an integer of {x.bit_length():,} bits")
    elif not isinstance(x, (float, bool, type(None))):
        w = weight(x)
        if w > MAX_CHARS:
            raise _too_large(what, "too long")
    return x


def _ints(args: tuple, kwargs: dict) -> Iterator[int]:
    return (a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool))


def _check_format(fmt: str, args: Any, what: str) -> None:
    """printf- and str.format-style width and precision fields must stay within the limit."""
    specs = [m.group(1) for m in re.finditer(r"%(?:\([^)]*\))?([-#0 +]*[\d*]*(?:\.[\d*]*)?)", fmt)]
    specs += [m.group(1) for m in re.finditer(r"\{[^{}]*:([^{}]*)\}", fmt)]
    if any(len(d) > 7 or int(d) > MAX_CHARS for spec in specs for d in re.findall(r"\d+", spec)):
        raise _too_large(what, "a field wider than the limit")
    # a width taken from the arguments: `%*s` or `{:{}}`
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    if ("*" in fmt or "{" in fmt) and any(isinstance(n, int) and n > MAX_CHARS for n in values):
        raise _too_large(what, "a field wider than the limit")


def _replaced(s: str, old: Any, new: Any, count: Any = -1) -> int:
    old, new = str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and 0 <= count < n:
        n = count
    return len(s) + n * max(0, len(new) - len(old))


def _str_method(s: str, name: str, args: tuple, kwargs: dict) -> None:
    what = f"str.{name}()"
    if name in ("center", "ljust", "rjust", "zfill"):
        if any(n > MAX_CHARS for n in _ints(args[:1], {k: v for k, v in kwargs.items() if k == "width"})):
            raise _too_large(what, max(_ints(args[:1], kwargs)))
    elif name == "expandtabs":
        tab = next(_ints(args, kwargs), 8)
        if s.count("\t") * max(tab, 0) + len(s) > MAX_CHARS:
            raise _too_large(what, s.count("\t") * tab + len(s))
    elif name == "replace" and len(args) >= 2:
        n = _replaced(s, *args[:3])
        if n > MAX_CHARS:
            raise _too_large(what, n)
    elif name == "join" and args:
        if isinstance(args[0], (list, tuple, dict, set, frozenset, str)):
            n = weight(args[0]) + len(s) * len(args[0])
            if n > MAX_CHARS:
                raise _too_large(what, n)
    elif name == "format":
        _check_format(s, args + tuple(kwargs.values()), what)
    elif name == "format_map" and args:
        _check_format(s, args[0] if isinstance(args[0], dict) else args, what)


class BoundedCodeGenerator(CodeGenerator):
    """Routes `~` and list/tuple/dict literals through the environment's size checks."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _bounded(self, visit: Callable, node: Any, frame: Any) -> None:
        self.write("environment.bounded(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: Any, frame: Any) -> None:
        self._bounded(super().visit_List, node, frame)

    def visit_Dict(self, node: Any, frame: Any) -> None:
        self._bounded(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: Any, frame: Any) -> None:
        if node.ctx == "load":
            self._bounded(super().visit_Tuple, node, frame)
        else:  # an assignment target (`{% for a, b in ... %}`) is not a value
            super().visit_Tuple(node, frame)


def _filter_prechecks(name: str, args: tuple, kwargs: dict, env: Any) -> tuple[tuple, dict]:
    """Checks for the filters whose result can be much larger than their arguments (`args` without
    the context Jinja passes to some filters)."""
    what = f"the {name} filter"
    if name == "center" and any(n > MAX_CHARS for n in _ints(args[1:2], kwargs)):
        raise _too_large(what, max(_ints(args[1:2], kwargs)))
    if name == "indent" and args:
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        lines = str(args[0]).count("\n") + 1
        per = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        if lines * per + len(str(args[0])) > MAX_CHARS:
            raise _too_large(what, lines * per + len(str(args[0])))
    if name == "wordwrap" and args:
        s, width = str(args[0]), (args[1] if len(args) > 1 else kwargs.get("width", 79))
        wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring") or "\n"
        n = len(s) + (len(s) // max(width if isinstance(width, int) else 1, 1) + 1) * len(str(wrap))
        if n > MAX_CHARS:
            raise _too_large(what, n)
    if name == "format" and args:
        _check_format(str(args[0]), tuple(args[1:]) or kwargs, what)
    if name == "tojson":
        indent = args[2] if len(args) > 2 else kwargs.get("indent")
        if (
            isinstance(indent, (int, str))
            and not isinstance(indent, bool)
            and (len(indent) if isinstance(indent, str) else indent) > 16
        ):
            raise _too_large(what, "an indent over 16")
    if name == "replace" and len(args) >= 3:
        n = _replaced(str(args[0]), *args[1:4])
        if n > MAX_CHARS:
            raise _too_large(what, n)
    if name in ("batch", "slice") and any(n > jinja2.sandbox.MAX_RANGE for n in _ints(args[1:2], kwargs)):
        raise _too_large(what, f"more than {jinja2.sandbox.MAX_RANGE:,} pieces")
    if name == "join" and args:  # (value, d="", attribute=None): measure the items it will join
        value, rest = args[0], list(args[1:])
        attribute = rest[1] if len(rest) > 1 else kwargs.pop("attribute", None)
        if attribute is not None:
            value = map(make_attrgetter(env, attribute), value)
            rest = rest[:1]
        value = list(value)
        sep = rest[0] if rest else kwargs.get("d", "")
        n = weight(value) + len(str(sep)) * len(value)
        if n > MAX_CHARS:
            raise _too_large(what, n)
        args = (value, *rest)
    return args, kwargs


class _BoundedIterator:
    """A filter's lazy result (map, select, batch, ...), cut off once its items add up past the limit,
    so whatever consumes it (`join`, `list`, a loop) never holds more."""

    __slots__ = ("_it", "_total", "_what")

    def __init__(self, it: Iterator, what: str) -> None:
        self._it, self._total, self._what = it, 0, what

    def __iter__(self) -> _BoundedIterator:
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self._total += len(item) + 2 if type(item) is str else weight(item)
        if self._total > MAX_CHARS:
            raise _too_large(self._what, "too long")
        return item


_PRECHECKED = {"center", "indent", "wordwrap", "format", "tojson", "replace", "batch", "slice", "join"}
_CONTAINERS = (list, tuple, dict, set, frozenset, jinja2.utils.Namespace)


def _bounded_filter(name: str, fn: Callable) -> Callable:
    passes_context = getattr(fn, "jinja_pass_arg", None) is not None  # pass_eval_context / pass_environment
    prechecked = name in _PRECHECKED

    @functools.wraps(fn)  # keeps that mark, so Jinja keeps passing the context
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        head, args = (args[:1], args[1:]) if passes_context else ((), args)
        for a in (*args, *kwargs.values()):
            if type(a) is str:
                if len(a) > MAX_CHARS:
                    raise _too_large(f"the argument of the {name} filter", len(a))
            elif isinstance(a, _CONTAINERS):
                check(a, f"the argument of the {name} filter")
        if prechecked:
            env = getattr(head[0], "environment", head[0]) if head else None
            args, kwargs = _filter_prechecks(name, args, kwargs, env)
        out = fn(*head, *args, **kwargs)
        if type(out) is str:
            if len(out) > MAX_CHARS:
                raise _too_large(f"the result of the {name} filter", len(out))
        elif isinstance(out, (list, tuple, dict)):
            check(out, f"the result of the {name} filter")
        elif isinstance(out, Iterator) and not isinstance(out, _BoundedIterator):
            return _BoundedIterator(out, f"the items of the {name} filter")
        return out

    return wrapper


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every size check of this module wired in."""

    code_generator_class = BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, finalize=lambda v: check(v, "a printed value"), **kwargs)

    def wrap_filters(self) -> None:
        """Bound every filter registered so far (call after adding the template helpers)."""
        self.filters = {name: _bounded_filter(name, fn) for name, fn in self.filters.items()}

    def bounded(self, value: Any) -> Any:
        return check(value, "a list or dict literal")

    def bounded_concat(self, parts: tuple) -> str:
        n = sum(len(p) if isinstance(p, str) else weight(p) for p in parts)
        if n > MAX_CHARS:
            raise _too_large("a '~' concatenation", n)
        return "".join(str(p) for p in parts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        # Each case bounds the result from its operands, so the result itself needs no second look.
        if operator == "+":
            if type(left) is str and type(right) is str:  # the common case: string building
                if len(left) + len(right) > MAX_CHARS:
                    raise _too_large("str + str", len(left) + len(right))
            elif isinstance(left, _SEQ) and isinstance(right, _SEQ) and weight(left) + weight(right) > MAX_CHARS:
                raise _too_large(f"{type(left).__name__} + {type(right).__name__}", weight(left) + weight(right))
            return left + right
        if operator == "*":
            for a, b in ((left, right), (right, left)):
                if isinstance(a, _SEQ) and isinstance(b, int):
                    n = (len(a) if isinstance(a, str) else weight(a)) * max(b, 0)
                    if n > MAX_CHARS:
                        raise _too_large(f"{type(a).__name__} * {b}", n)
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and left.bit_length() + right.bit_length() > MAX_INT_BITS
            ):
                raise _too_large("an integer product", "an integer over the size limit")
        elif operator == "**":
            if (
                isinstance(left, int)
                and isinstance(right, int)
                and abs(left) > 1
                and right > 0
                and right * math.log2(abs(left)) > MAX_INT_BITS
            ):
                raise _too_large(f"{left} ** {right}", "an integer over the size limit")
        elif operator == "%" and isinstance(left, str):
            check(right, "the arguments of '%'")
            _check_format(left, right, "a '%' format")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        for a in (*args, *kwargs.values()):
            if isinstance(a, (str, list, tuple, dict, set, frozenset, jinja2.utils.Namespace)):
                check(a, "an argument of a call")
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _str_method(owner, getattr(target, "__name__", ""), args, kwargs)
        out = super().call(__context, __obj, *args, **kwargs)
        return check(out, f"the result of {getattr(target, '__name__', 'a call')}()")


# ---------------------------------------------------------------- the render-time watchdog


class _Watchdog:
    """One daemon thread per process that raises RenderTimeout in threads whose render is overdue.

    A render registers its thread and deadline and unregisters when done; the thread sleeps
    until the earliest deadline, so a stream of fast renders never wakes it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.cond = threading.Condition()
        self.deadlines: dict[int, float] = {}
        self.fired: set[int] = set()
        self.next_wake = math.inf
        threading.Thread(target=self._run, name="yunque-template-watchdog", daemon=True).start()

    def _run(self) -> None:
        with self.cond:
            while True:
                now = time.monotonic()
                for tid, deadline in list(self.deadlines.items()):
                    if deadline <= now:
                        del self.deadlines[tid]
                        self.fired.add(tid)
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(RenderTimeout))
                self.next_wake = min(self.deadlines.values(), default=math.inf)
                self.cond.wait(None if self.next_wake == math.inf else self.next_wake - now)

    def start(self, tid: int, deadline: float) -> None:
        with self.cond:
            self.fired.discard(tid)
            self.deadlines[tid] = deadline
            if deadline < self.next_wake:
                self.cond.notify()

    def stop(self, tid: int) -> bool:
        """Unregister; True if the timeout fired (a still-pending one is cancelled)."""
        with self.cond:
            self.deadlines.pop(tid, None)
            if tid not in self.fired:
                return False
            self.fired.discard(tid)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)  # clears it if not yet raised
            return True


_WATCHDOG: _Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def _forget_watchdog() -> None:
    global _WATCHDOG
    _WATCHDOG = None  # a forked child has no watchdog thread: the next render starts one


def _watchdog() -> _Watchdog | None:
    global _WATCHDOG
    wd = _WATCHDOG
    if wd is not None or not hasattr(ctypes, "pythonapi"):  # not CPython: the size bounds still hold
        return wd
    with _WATCHDOG_LOCK:
        if _WATCHDOG is None:
            if not hasattr(_watchdog, "fork_hook"):
                os.register_at_fork(after_in_child=_forget_watchdog)
                _watchdog.fork_hook = True  # type: ignore[attr-defined]
            _WATCHDOG = _Watchdog()
        return _WATCHDOG


def render_bounded(template: jinja2.Template, variables: dict[str, Any]) -> str:
    """`template.render(**variables)` within MAX_CHARS characters and RENDER_SECONDS seconds.

    Raises TemplateTooLarge, RenderTimeout, or whatever the template raised."""
    wd = _watchdog()
    tid = threading.get_ident()
    fired = False
    try:
        if wd is not None:
            wd.start(tid, time.monotonic() + RENDER_SECONDS)
        try:
            parts, n = [], 0
            try:
                for chunk in template.root_render_func(template.new_context(variables)):
                    n += len(chunk)
                    if n > MAX_CHARS:
                        raise _too_large("the rendered prompt", "too long")
                    parts.append(chunk)
            except Exception:
                template.environment.handle_exception()  # re-raises with the template's own line numbers
        finally:
            fired = wd is not None and wd.stop(tid)
    except RenderTimeout:
        fired = True
    if fired:
        raise RenderTimeout(f"did not finish within {RENDER_SECONDS:g} s (a loop that does not end?)")
    return "".join(parts)
