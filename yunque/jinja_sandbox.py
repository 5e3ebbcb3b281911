"""Running a checkpoint's chat template, which is untrusted code, the way transformers does.

Templates run in Jinja's immutable sandbox (no attribute writes, no list mutation, no
underscore attributes) with `trim_blocks`/`lstrip_blocks`, the `loopcontrols` extension, and
the helpers transformers gives templates: `raise_exception`, `strftime_now`, a `tojson` that
keeps non-ASCII and does not HTML-escape, a restricted `dict()` and `namespace()`, and the
`{% generation %}` tag. Rendering is bounded in time and size (see jinja_limits.py). Anything
that goes wrong in a template becomes one YunqueError that names the template line.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.utils
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols

from yunque.errors import YunqueError
from yunque.jinja_limits import BoundedSandbox, RenderTimeout, TemplateTooLarge, check, render_bounded

_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


class _TemplateRaised(jinja2.TemplateError):
    """The template itself rejected the messages via raise_exception()."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(str(message)[:2000])


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson HTML-escapes `<>&'`, which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return check(dict(*args, **kwargs), "dict()")

    def fromkeys(self, *args: Any) -> dict:
        return check(dict.fromkeys(*args), "dict.fromkeys()")


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names that could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with an underscore")


class _GenerationBlock(Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by transformers' assistant mask).

    The body renders unchanged, inside a call block so `set` scoping matches transformers; the
    mask is computed the same way for every template, so the markers carry no extra meaning.
    """

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _jinja_version() -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in jinja2.__version__.split(".")[:3])
    except (AttributeError, ValueError):
        return _MIN_JINJA


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox (cached: templates are reused for every sample)."""
    if _jinja_version() < _MIN_JINJA:
        raise YunqueError(f"chat templates need jinja2>=3.1.6 (sandbox fixes), found {jinja2.__version__}")
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.wrap_filters()
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(str(fmt)[:1000]),
        dict=_Dict(),
        namespace=_Namespace,
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise YunqueError(f"chat template line {e.lineno}: syntax error: {e.message}") from None
    except RecursionError:
        raise YunqueError("chat template: syntax error: nested too deeply") from None


def _template_line(exc: BaseException) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return f" line {lines[-1]}" if lines else ""


def render_template(source: str, variables: dict[str, Any]) -> str:
    """Render `source` with `variables`; any failure of the template becomes one clear YunqueError."""
    template = compile_template(source)
    try:
        return render_bounded(template, variables)
    except _TemplateRaised as e:
        raise YunqueError(f"chat template{_template_line(e)} rejected the messages: {e}") from None
    except TemplateTooLarge as e:
        raise YunqueError(f"chat template{_template_line(e)} exceeds its size limit: {e}") from None
    except RenderTimeout as e:
        raise YunqueError(f"chat template{_template_line(e)} {e}") from None
    except RecursionError:
        raise YunqueError("chat template failed: it recurses too deeply") from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        raise YunqueError(f"chat template{_template_line(e)} failed: {type(e).__name__}: {str(e)[:500]}") from None
