"""Text cleaning: Unicode NFC, control and invisible characters out, whitespace normalised.

Code is kept intact: inside ``` or ~~~ fences only line endings and control characters
are touched, because indentation and blank lines there carry meaning. Outside fences runs
of spaces and tabs become one space, trailing spaces go, and more than one blank line
collapses to one. Bidirectional overrides and zero-width characters are removed
everywhere: they are the raw material of "Trojan Source" style text that reads
differently from what a model (or a reviewer) sees.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 controls except \t and \n, plus invisible format characters that carry no text:
# zero-width space/joiners used for smuggling, bidi embeddings/overrides/isolates, BOM, soft hyphen.
_STRIP = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u200c\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
_SPACES = re.compile("[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_UNI_WS = re.compile("[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_NEWLINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalised text; see the module docstring for exactly what changes."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _STRIP.sub("", text)
    if "```" not in text and "~~~" not in text:
        return _tidy(text)
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                out.append(_tidy("\n".join(prose)))
                prose = []
                fence = m.group(1)
                out.append(line.rstrip())
            else:
                prose.append(line)
        else:
            out.append(line)
            if m and m.group(1) == fence:
                fence = None
    if prose:
        out.append(_tidy("\n".join(prose)))
    return "\n".join(p for p in out if p is not None).strip("\n").strip()


def _tidy(prose: str) -> str:
    if not _messy(prose):  # most text is already tidy; these checks run at memchr speed
        return prose
    # Leading indentation stays (nested lists, indented code); inner runs collapse; trailing goes.
    lines = []
    for line in prose.split("\n"):
        body = line.lstrip(" \t")
        lines.append(line[: len(line) - len(body)] + _SPACES.sub(" ", body).rstrip() if body.strip() else "")
    return _NEWLINES.sub("\n\n", "\n".join(lines)).strip()


def _messy(s: str) -> bool:
    return (
        "  " in s
        or "\t" in s
        or " \n" in s
        or "\n\n\n" in s
        or s[:1].isspace()
        or s[-1:].isspace()
        or (not s.isascii() and _UNI_WS.search(s) is not None)
    )
