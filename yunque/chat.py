"""Chat templates: render messages through a checkpoint's own Jinja template, exactly as
transformers' `apply_chat_template` does, and mark the tokens a fine-tune must learn.

A chat template is untrusted code shipped with a checkpoint, so it runs in Jinja's
immutable sandbox with the same small set of helpers transformers exposes
(`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, `namespace`
without underscore attributes). Rendered text is then tokenized with
`add_special_tokens=False`: the template writes its own BOS, so adding one would double it.

The assistant mask works for any template, not only ones with `{% generation %}` blocks:
the chat is rendered once per assistant turn with the conversation cut just before
(plus the generation prompt) and just after that turn; the difference is exactly what the
model must produce for that turn (its content and end-of-turn token). Templates that
rewrite earlier turns (e.g. dropping old reasoning) fall back to locating the turn's
content in the full text. Character spans become token masks via the tokenizer's offsets.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterable

import jinja2
import jinja2.utils
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from yunque.errors import YunqueError

if TYPE_CHECKING:
    from yunque.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")
_MIN_JINJA = (3, 1, 6)  # older releases have known sandbox escapes


@dataclass
class ChatRendering:
    text: str
    ids: list[int]
    assistant_mask: list[bool]  # True on tokens the model must learn: assistant turns and their end-of-turn token


class _TemplateRaised(jinja2.TemplateError):
    """The template itself rejected the messages via raise_exception()."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes `<>&'`, which would change what the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Dict:
    """`dict(...)` for templates without handing them the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any) -> dict:
        return dict.fromkeys(*args)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's namespace, refusing underscore names that could reach interpreter internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805  (Jinja's own signature trick)
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

    tags = {"generation"}

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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=_Dict(),
        namespace=_Namespace,
    )
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise YunqueError(f"chat template line {e.lineno}: syntax error: {e.message}") from None


def _template_line(exc: BaseException) -> str:
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == "<template>"]
    return f" line {lines[-1]}" if lines else ""


def render_template(source: str, variables: dict[str, Any]) -> str:
    """Render `source` with `variables`; any failure of the template becomes one clear YunqueError."""
    template = compile_template(source)
    try:
        return template.render(**variables)
    except _TemplateRaised as e:
        raise YunqueError(f"chat template{_template_line(e)} rejected the messages: {e}") from None
    except (jinja2.TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        raise YunqueError(f"chat template{_template_line(e)} failed: {type(e).__name__}: {e}") from None


def _plain(value: Any, where: str) -> Any:
    """A deep copy made of plain JSON types only, so the template never touches caller objects."""
    if value is None or isinstance(value, bool):
        return value
    for t in (str, int, float):
        if isinstance(value, t):
            return t(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise YunqueError(f"{where}: a {type(value).__name__} cannot go into a chat template (use str, numbers, lists, dicts)")


def check_messages(messages: Any) -> list[dict]:
    """Validate messages and return plain copies, dropping None-valued keys (as transformers does)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise YunqueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise YunqueError(f"{where}: expected a dict with 'role' and 'content', got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if role not in ROLES:
            got = "no 'role'" if role is None else f"role {role!r}"
            raise YunqueError(f"{where}: {got}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None and "tool_calls" not in m:
            raise YunqueError(f"{where}: missing 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise YunqueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
        out.append(_plain(m, where))
    return out


def _select_template(tok: Tokenizer, chat_template: str | None, tools: Any) -> str:
    named = tok.chat_templates
    if chat_template is not None:
        return named.get(chat_template, chat_template)
    if tools is not None and "tool_use" in named:
        return named["tool_use"]
    if "default" in named:
        return named["default"]
    if named:
        raise YunqueError(f"{tok.source}: several chat templates ({', '.join(sorted(named))}) and none named 'default'; pass chat_template=NAME")
    raise YunqueError(
        f"{tok.source}: the tokenizer has no chat template (no 'chat_template' in tokenizer_config.json, "
        "no chat_template.jinja); pass chat_template=... or train one with `yunque tokenizer train`"
    )


class _Renderer:
    """Renders (prefixes of) one conversation with fixed tools/documents/extra variables."""

    def __init__(self, tok: Tokenizer, chat_template: str | None, tools: Any, documents: Any, extra: dict[str, Any]):
        self.source = _select_template(tok, chat_template, tools)
        self.base = {
            "tools": _plain(tools, "tools"),
            "documents": _plain(documents, "documents"),
            **tok.special_tokens,  # bos_token, eos_token, ...: templates write them by name
            **_plain(extra, "template_kwargs"),
        }

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_template(self.source, {"messages": messages, "add_generation_prompt": add_generation_prompt, **self.base})


def apply_chat_template(
    tok: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs: Any,
) -> str:
    """The chat as text, as the checkpoint's template writes it (same as transformers).

    `chat_template` overrides the tokenizer's template (a Jinja source, or the name of one of
    its named templates); `tools`, `documents` and `template_kwargs` are template variables.
    """
    msgs = check_messages(messages)
    return _Renderer(tok, chat_template, tools, documents, template_kwargs)(msgs, add_generation_prompt)


def render_chat(
    tok: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs: Any,
) -> ChatRendering:
    """Text, token ids and the assistant-token mask of a chat (for supervised fine-tuning)."""
    msgs = check_messages(messages)
    render = _Renderer(tok, chat_template, tools, documents, template_kwargs)
    text = render(msgs, add_generation_prompt)
    eots = [t for t in (tok.id_to_token(i) for i in tok.stop_ids) if t]
    spans = assistant_spans(render, msgs, text, eots)
    ids, offsets = tok.encode_offsets(text)
    return ChatRendering(text=text, ids=ids, assistant_mask=spans_to_mask(offsets, spans))


def _prefix_len(render: _Renderer, msgs: list[dict], agp: bool, text: str) -> int | None:
    """Length of the rendering of `msgs` if the full chat `text` starts with it, else None."""
    try:
        head = render(msgs, agp)
    except YunqueError:  # e.g. templates that index messages[0] on an empty list
        return None
    return len(head) if text.startswith(head) else None


def assistant_spans(render: _Renderer, msgs: list[dict], text: str, eot_tokens: Iterable[str]) -> list[tuple[int, int]]:
    """Character spans of `text` the model must produce: each assistant turn and its end-of-turn token."""
    eots = sorted(set(eot_tokens), key=len, reverse=True)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = _prefix_len(render, msgs[:i], True, text)
        end = _prefix_len(render, msgs[: i + 1], False, text)
        if start is not None and start < cursor:
            start = None
        if end is not None:
            # Whitespace a template puts after the end-of-turn token (ChatML's "\n") is layout, not output.
            end = len(text[:end].rstrip())
        if start is None or end is None or end < start:
            found = _search_turn(render, msgs, i, text, cursor, eots)
            if found is None:
                raise YunqueError(
                    f"messages[{i}]: cannot locate this assistant turn in the rendered chat "
                    "(the template rewrites or drops it), so its loss mask would be wrong"
                )
            if start is None or start > found[0]:
                start = found[0]
            if end is None or end < start:
                end = found[1]
        spans.append((start, end))
        cursor = end
    return spans


def _search_turn(render: _Renderer, msgs: list[dict], i: int, text: str, cursor: int, eots: list[str]) -> tuple[int, int] | None:
    """Fallback: find assistant message `i`'s content (the template may trim it) after everything before it."""
    content = msgs[i].get("content")
    if not isinstance(content, str) or not content.strip():
        return None
    before = _prefix_len(render, msgs[:i], False, text)
    lo = max(cursor, before or 0)
    needle = content.strip()
    start = text.find(needle, lo)
    if start < 0:
        return None
    end = start + len(needle)
    for eot in eots:
        if text.startswith(eot, end):
            end += len(eot)
            break
    return start, end


def spans_to_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Mark every token overlapping a span, and everything between the first and last of them
    (tokens whose offsets a tokenizer trimmed to nothing, e.g. whitespace, sit in between)."""
    mask = [False] * len(offsets)
    for s, e in spans:
        hit = [t for t, (a, b) in enumerate(offsets) if a < e and b > s]
        if hit:
            mask[hit[0] : hit[-1] + 1] = [True] * (hit[-1] + 1 - hit[0])
    return mask


def find_end_of_turn(source: str, special_tokens: dict[str, str], added_tokens: Iterable[str]) -> str | None:
    """The added token a template writes right after an assistant message (e.g. <|eot_id|>,
    <|im_end|>, </s>): generation must stop there, so it belongs in the stop ids."""
    probe = "yunque probe reply"
    messages = [{"role": "user", "content": "yunque probe question"}, {"role": "assistant", "content": probe}]
    try:
        text = render_template(source, {"messages": messages, "add_generation_prompt": False, "tools": None, "documents": None, **special_tokens})
    except YunqueError:
        return None
    at = text.find(probe)
    if at < 0:
        return None
    rest = text[at + len(probe) :].lstrip()
    return next((t for t in sorted(added_tokens, key=len, reverse=True) if t and rest.startswith(t)), None)
