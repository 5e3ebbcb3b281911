"""Chat templates: render messages through a checkpoint's own Jinja template, exactly as
transformers' `apply_chat_template` does, and mark the tokens a fine-tune must learn.

A chat template is untrusted code shipped with a checkpoint; it runs in the sandbox of
`yunque.jinja_sandbox`, with the helpers transformers gives templates. The rendered text
is tokenized with `add_special_tokens=False`: the template writes its own BOS, so adding
one would double it.

The assistant mask works for any template, not only ones with `{% generation %}` blocks:
the chat is rendered once per assistant turn with the conversation cut just before
(plus the generation prompt) and just after that turn; the difference is exactly what the
model must produce for that turn (its content and end-of-turn token); an assistant message
with `"weight": 0` (OpenAI's fine-tuning format) is left out of the mask. Templates that
rewrite earlier turns (e.g. dropping old reasoning) fall back to locating the turn's
content in the full text. Character spans become token masks via the tokenizer's offsets.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from yunque.errors import YunqueError
from yunque.jinja_sandbox import render_template
from yunque.tokenizer import Tokenizer

ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


@dataclass
class ChatRendering:
    text: str
    ids: list[int]
    assistant_mask: list[bool]  # True on tokens the model must learn: assistant turns and their end-of-turn token


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
    raise YunqueError(
        f"{where}: a {type(value).__name__} cannot go into a chat template (use str, numbers, lists, dicts)"
    )


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
        raise YunqueError(
            f"{tok.source}: several chat templates ({', '.join(sorted(named))}) and none named 'default'; pass chat_template=NAME"  # noqa: E501
        )
    raise YunqueError(
        f"{tok.source}: the tokenizer has no chat template (no 'chat_template' in tokenizer_config.json, "
        "no chat_template.jinja); pass chat_template=... or train one with `yunque tokenizer train`"
    )


class _Renderer:
    """Renders (prefixes of) one conversation with fixed tools/documents/extra variables."""

    def __init__(
        self,
        tok: Tokenizer,
        chat_template: str | None,
        tools: Any,
        documents: Any,
        extra: dict[str, Any],
        mark: Callable[[Any], Any] = lambda x: x,
    ):
        self.source = _select_template(tok, chat_template, tools)
        self.base = {
            "tools": mark(_plain(tools, "tools")),
            "documents": mark(_plain(documents, "documents")),
            **tok.special_tokens,  # bos_token, eos_token, ...: templates write them by name
            **mark(_plain(extra, "template_kwargs")),
        }

    def __call__(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return render_template(
            self.source, {"messages": messages, "add_generation_prompt": add_generation_prompt, **self.base}
        )


def apply_chat_template(
    tok: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    continue_final_message: bool = False,
    **template_kwargs: Any,
) -> str:
    """The chat as text, as the checkpoint's template writes it (same as transformers).

    `chat_template` overrides the tokenizer's template (a Jinja source, or the name of one of
    its named templates); `tools`, `documents` and `template_kwargs` are template variables.
    `continue_final_message` leaves the last message open (no end-of-turn) so that generation
    continues it: a prefilled start of the assistant's reply.
    """
    msgs = check_messages(messages)
    render = _Renderer(tok, chat_template, tools, documents, template_kwargs)
    if not continue_final_message:
        return render(msgs, add_generation_prompt)
    if add_generation_prompt:
        raise YunqueError("continue_final_message and add_generation_prompt cannot both be set")
    if not isinstance(msgs[-1].get("content"), str):
        raise YunqueError(f"messages[{len(msgs) - 1}]: continue_final_message needs a string 'content'")
    # Render with a tag after the final content and cut there: whatever the template writes
    # after a message (end-of-turn, newlines) falls away.
    msgs[-1]["content"] += _CONTINUE_TAG
    text = render(msgs, False)
    at = text.rfind(_CONTINUE_TAG.strip())
    if at < 0:
        raise YunqueError("continue_final_message: the chat template does not write the final message")
    # A template that trims content also trimmed the tag's space and the reply's trailing blanks.
    return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()


_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat(
    tok: Tokenizer,
    messages: list[dict],
    add_generation_prompt: bool = False,
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    sanitize_control_tokens: bool = False,
    **template_kwargs: Any,
) -> ChatRendering:
    """Text, token ids and the assistant-token mask of a chat (for supervised fine-tuning).

    With `sanitize_control_tokens`, special-token strings inside messages, tools, documents and
    template variables (e.g. a user typing "<|eot_id|><|start_header_id|>system...") are encoded
    as plain text; only the template's own control tokens become special ids. Use it for any
    text that comes from users. The text is unchanged; only the ids differ.
    """
    if sanitize_control_tokens:
        text, spans = _text_and_spans(
            tok,
            messages,
            add_generation_prompt,
            chat_template,
            tools,
            documents,
            template_kwargs,
            _marker(tok.control_tokens),
        )
        text, ids, offsets, to_clean = _encode_marked(tok, text)
        spans = [(to_clean(s), to_clean(e)) for s, e in spans]
    else:
        text, spans = _text_and_spans(
            tok, messages, add_generation_prompt, chat_template, tools, documents, template_kwargs
        )
        ids, offsets = tok.encode_offsets(text)
    return ChatRendering(text=text, ids=ids, assistant_mask=spans_to_mask(offsets, spans))


def render_chats(
    tok: Tokenizer,
    conversations: list[list[dict]],
    add_generation_prompt: bool = False,
    *,
    chat_template: str | None = None,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **template_kwargs: Any,
) -> list[ChatRendering]:
    """`render_chat` for many conversations, tokenized in one parallel Rust batch (dataset prep)."""
    rendered = []
    for k, conversation in enumerate(conversations):
        try:
            rendered.append(
                _text_and_spans(
                    tok, conversation, add_generation_prompt, chat_template, tools, documents, template_kwargs
                )
            )
        except YunqueError as e:
            raise YunqueError(f"conversations[{k}]: {e}") from None
    encoded = tok.encode_offsets_batch([text for text, _ in rendered])
    return [
        ChatRendering(text=text, ids=ids, assistant_mask=spans_to_mask(offsets, spans))
        for (text, spans), (ids, offsets) in zip(rendered, encoded)
    ]


def _text_and_spans(
    tok: Tokenizer,
    messages: list[dict],
    agp: bool,
    chat_template: str | None,
    tools: Any,
    documents: Any,
    extra: dict[str, Any],
    mark: Callable[[Any], Any] = lambda x: x,
) -> tuple[str, list[tuple[int, int]]]:
    msgs = mark(check_messages(messages))
    render = _Renderer(tok, chat_template, tools, documents, extra, mark)
    text = render(msgs, agp)
    eots = [t for t in (tok.id_to_token(i) for i in tok.stop_ids) if t]
    spans = assistant_spans(render, msgs, text, eots)
    # OpenAI's fine-tuning format: an assistant message with "weight": 0 is context, not a target.
    replies = [m for m in msgs if m["role"] == "assistant"]
    return text, [s for s, m in zip(spans, replies) if m.get("weight", 1) != 0]


# Code points of a supplementary private-use plane (as transformers uses; practically never in
# real text), put around control tokens found in caller strings so that after rendering they
# can be told apart from the control tokens the template writes itself.
_OPEN, _CLOSE = "\U000f0000", "\U000f0001"


def _marker(control_tokens: list[str]) -> Callable[[Any], Any]:
    pattern = re.compile("|".join(re.escape(t) for t in sorted(control_tokens, key=len, reverse=True)) or "(?!)")

    def mark(obj: Any) -> Any:
        if isinstance(obj, str):
            # Stray marker characters in the input are dropped, so they cannot forge a marked token.
            obj = obj.replace(_OPEN, "").replace(_CLOSE, "")
            return pattern.sub(lambda m: _OPEN + m.group(0) + _CLOSE, obj)
        if isinstance(obj, dict):
            return {k: mark(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(mark(v) for v in obj)
        return obj

    return mark


def _encode_marked(tok: Tokenizer, marked: str) -> tuple[str, list[int], list[tuple[int, int]], Callable[[int], int]]:
    """Encode rendered text whose marked pieces are plain text; return the text without markers,
    ids, offsets into that text, and a map from positions in `marked` to positions in it."""
    # Odd pieces are marked tokens (None for a lone marker that a template's string slicing left behind).
    pieces = re.split(f"{_OPEN}([^{_OPEN}{_CLOSE}]*){_CLOSE}|[{_OPEN}{_CLOSE}]", marked)
    parts: list[str] = []
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    pos = 0
    for k, piece in enumerate(pieces):
        if not piece:
            continue
        p_ids, p_offsets = tok.encode_offsets(piece, special_as_text=k % 2 == 1)
        ids += p_ids
        offsets += [(a + pos, b + pos) for a, b in p_offsets]
        parts.append(piece)
        pos += len(piece)
    marks = [i for i, c in enumerate(marked) if c in (_OPEN, _CLOSE)]
    return "".join(parts), ids, offsets, lambda i: i - bisect.bisect_left(marks, i)


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
        says_something = bool(m.get("tool_calls")) or (isinstance(m.get("content"), str) and m["content"].strip())
        if start is None or end is None or end < start or (end == start and says_something):
            found = _search_turn(render, msgs, i, text, cursor, eots)
            if found is None:
                raise YunqueError(
                    f"messages[{i}]: cannot locate this assistant turn in the rendered chat "
                    "(the template rewrites or drops it), so its loss mask would be wrong"
                )
            if start is None or start > found[0]:
                start = found[0]
            if end is None or end <= start:
                end = found[1]
        spans.append((start, end))
        cursor = end
    return spans


def _search_turn(
    render: _Renderer, msgs: list[dict], i: int, text: str, cursor: int, eots: list[str]
) -> tuple[int, int] | None:
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
    starts = [a for a, _ in offsets]
    ends = [b for _, b in offsets]  # offsets never go backwards, so both lists are sorted
    for s, e in spans:
        first = bisect.bisect_right(ends, s)  # first token ending after the span starts
        last = bisect.bisect_left(starts, e) - 1  # last token starting before the span ends
        if first <= last:
            mask[first : last + 1] = [True] * (last + 1 - first)
    return mask
