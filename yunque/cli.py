"""Typed function signatures become the command line.

`build_parser(fn)` reads `fn`'s signature and docstring: parameters without a default
are positional, the others are `--flags` (`max_new_tokens` -> `--max-new-tokens`);
keyword-only parameters without a default (after `*`) are required `--flags`;
`bool` gives `--flag/--no-flag`, `list[str]` takes several values, `Literal[...]`
gives choices, `*args: str` collects the rest (e.g. `key=value` overrides). The
docstring's `Args:` section is the help text. No command has parsing logic of its own.
"""

from __future__ import annotations

import argparse
import inspect
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def _doc_args(fn: Callable) -> tuple[str, dict[str, str]]:
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n\n", 1)[0].strip()
    helps: dict[str, str] = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?)+)", doc, re.M)
    if m:
        current = None
        for line in m.group(1).splitlines():
            hit = re.match(r"\s+(\*{0,2}\w+):\s*(.*)", line)
            if hit and len(line) - len(line.lstrip()) <= 4:
                current = hit.group(1).lstrip("*")
                helps[current] = hit.group(2)
            elif current:
                helps[current] += " " + line.strip()
    return summary, helps


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _literal(help_: str) -> str:
    # argparse %-formats help strings (for %(default)s): a "1%" in a docstring would crash --help.
    return help_.replace("%", "%%")


def build_parser(fn: Callable, prog: str) -> argparse.ArgumentParser:
    summary, helps = _doc_args(fn)
    parser = argparse.ArgumentParser(prog=prog, description=summary)
    hints = get_type_hints(fn)
    for name, p in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        help_ = helps.get(name, "")
        if p.kind is p.VAR_POSITIONAL:
            parser.add_argument(name, nargs="*", help=_literal(help_))
            continue
        kw: dict[str, Any] = {"help": _literal(help_)}
        origin = get_origin(tp)
        if origin is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(get_args(tp)[0])
        elif origin in (list, tuple):
            item = (get_args(tp) or (str,))[0]
            kw["type"] = Path if item is Path else item
            kw["nargs"] = "+" if p.default is p.empty else "*"
        elif tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp if tp in (int, float, Path) else str
        if p.default is p.empty and p.kind is p.KEYWORD_ONLY:
            parser.add_argument("--" + name.replace("_", "-"), dest=name, required=True, **kw)
        elif p.default is p.empty:
            parser.add_argument(name, **kw)
        else:
            if p.default is not None and tp is not bool:
                kw["help"] = _literal(f"{help_} (default: {p.default})".strip())
            parser.add_argument("--" + name.replace("_", "-"), dest=name, default=p.default, **kw)
    return parser


def call_with_argv(fn: Callable, argv: list[str], prog: str) -> Any:
    # Intermixed: positionals may come after flags (`data prepare in.jsonl --out d pii.modes.email=keep`).
    ns = vars(build_parser(fn, prog).parse_intermixed_args(argv))
    sig = inspect.signature(fn)
    args, kwargs = [], {}
    for name, p in sig.parameters.items():
        if p.kind is p.VAR_POSITIONAL:
            args.extend(ns[name])
        elif p.default is p.empty and p.kind is not p.KEYWORD_ONLY:
            args.append(ns[name])
        else:
            kwargs[name] = ns[name]
    return fn(*args, **kwargs)
