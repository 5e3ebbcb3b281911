"""Strict loading of typed dataclass configs from YAML plus `key=value` overrides.

A config is a plain dataclass next to the code that reads it. A YAML file holds only
the values that differ from the defaults. Loading is strict: an unknown key, a wrong
type or an out-of-range value is a `ConfigError` that names the key (and the file and
line when it came from a file). Ranges are declared on the field:

    lr: float = field(default=3e-4, metadata={"gt": 0})
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from yunque.errors import ConfigError

T = TypeVar("T")

_RANGE_CHECKS = {
    "gt": (lambda v, b: v > b, "> {}"),
    "ge": (lambda v, b: v >= b, ">= {}"),
    "lt": (lambda v, b: v < b, "< {}"),
    "le": (lambda v, b: v <= b, "<= {}"),
}


_MAX_NODES = 100_000  # a config has dozens; aliases must not expand a small file into billions


def _yaml_with_lines(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Parse YAML safely and remember the line of every key path ("a.b.c" -> line)."""

    def fail(e: yaml.YAMLError) -> ConfigError:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        why = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        return ConfigError(f"{where}: invalid YAML: {why}")

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise fail(e) from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    lines: dict[str, int] = {}
    # Iterative, counting every node an alias brings in again: nesting or "billion laughs" aliases
    # end in one error here, not in a RecursionError or an endless walk later.
    stack: list[tuple[yaml.Node, str, int]] = [(node, "", 0)] if node is not None else []
    seen = 0
    while stack:
        n, path, depth = stack.pop()
        seen += 1
        if seen > _MAX_NODES or depth > 64:
            why = "nested too deeply" if depth > 64 else f"more than {_MAX_NODES:,} values (aliases expanding?)"
            raise ConfigError(f"{source}:{n.start_mark.line + 1}: invalid YAML: {why}")
        if isinstance(n, yaml.MappingNode):
            keys: set[str] = set()
            for k, v in n.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in keys:  # safe_load would keep the last one silently
                        raise ConfigError(f"{source}:{k.start_mark.line + 1}: {p}: key given twice")
                    keys.add(k.value)
                lines[p] = k.start_mark.line + 1
                stack.append((v, p, depth + 1))
        elif isinstance(n, yaml.SequenceNode):
            stack.extend((v, path, depth + 1) for v in n.value)
    try:
        return yaml.safe_load(text), lines
    except yaml.YAMLError as e:  # e.g. a tag such as !!python/object, which the safe loader refuses
        raise fail(e) from None
    except ValueError as e:  # an integer literal longer than Python converts
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert only where lossless (int -> float, str -> Path)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # Optional[X]: X's own message names the exact key that is wrong
            raise errors[0]
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, key): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return float(value)  # PyYAML (YAML 1.1) reads `1e-4` as a string; people mean the number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: number out of range, got {value!r:.60}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        # Longer than the OS takes: is_file()/is_dir() would raise instead of saying no.
        if (
            "\x00" in str(value)
            or len(str(value)) > 4096
            or any(len(part.encode("utf-8", "surrogateescape")) > 255 for part in Path(value).parts)
        ):
            raise ConfigError(f"{key}: not a usable path (too long, or a NUL byte): {str(value)[:80]!r}...")
        return Path(value)
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None:
        return
    for name, (ok, text) in _RANGE_CHECKS.items():
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{key}: must be {text.format(meta[name])}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, strictly. Nested dataclasses take nested mappings."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{key}: unknown key (known keys: {known})")
        kwargs[k] = _coerce(v, hints[k], key)
        _check_range(kwargs[k], fields[k].metadata, key)
    try:
        obj = cls(**kwargs)
    except ConfigError as e:  # a __post_init__ check (a library config) names its field, not where the config sits
        if not prefix or str(e).startswith(prefix + "."):
            raise
        raise ConfigError(f"{prefix}.{e}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()  # cross-field rules; raises ConfigError naming the field
    return obj


def to_dict(cfg: Any) -> Any:
    """A YAML/JSON-safe dict of a config (Paths become strings)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: typing.Iterable[str]) -> dict[str, Any]:
    """`["train.lr=1e-4", "lora.r=8"]` -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        k, v = item.split("=", 1)
        try:
            parsed = yaml.safe_load(v) if v != "" else ""
        except (yaml.YAMLError, ValueError):  # ValueError: an integer too long to convert
            parsed = v
        except RecursionError:
            raise ConfigError(f"override {k.strip()}: value nested too deeply") from None
        _set_path(out, k.strip(), parsed)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> T:
    """Defaults of `cls` <- YAML file at `path` <- `key=value` overrides; strict at every step."""
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = str(path) if path else "<overrides>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None
        data, lines = _yaml_with_lines(text, str(p))
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    data = _merge(data, parse_overrides(overrides))
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        msg = str(e)
        key = msg.split(":", 1)[0].split("[", 1)[0]
        if key in lines:
            raise ConfigError(f"{source}:{lines[key]}: {msg}") from None
        raise
