"""The user's side of `yunque chat`: one message per read, where a message may span lines.

- A paste is one message. On a terminal, readline's bracketed paste hands a whole paste over
  at once; where the terminal or readline lacks it, lines that are already waiting when a line
  has been read (a paste arrives in one burst, no one types a line in 50 ms) join that line.
- A line ending with a backslash goes on to the next line.
- A line holding only \"\"\" opens a block that runs to the next such line (in pipes too).
"""

from __future__ import annotations

import select
import sys
from typing import TextIO

HELP = 'multi-line: paste it, end a line with \\ to go on, or put """ on its own line before and after'
PASTE_WINDOW_S = 0.05
_FENCE = '"""'


class MessageReader:
    def __init__(self, stdin: TextIO | None = None, stdout: TextIO | None = None, prompt: str = ""):
        self.stdin, self.stdout, self.prompt = stdin or sys.stdin, stdout or sys.stdout, prompt
        # Only the process's own terminal goes through input(): readline's line editing and paste.
        self.terminal = self.stdin is sys.stdin and self.stdout is sys.stdout and _isatty(self.stdin)
        if self.terminal:
            try:
                import readline  # noqa: F401  (importing it is what makes input() use it)
            except ImportError:  # Windows, or a Python built without it: bursts and fences still work
                pass

    def read(self) -> str | None:
        """The next message, blank lines around it and trailing spaces dropped; None at end of input."""
        while True:
            first = self._line()
            if first is None:
                return None
            if first.strip() == _FENCE:
                text = self._block()
                if text.strip():
                    return _tidy(text)
                continue  # an empty block is no message (and not the empty line that ends a chat)
            lines = [first, *self._waiting()]
            while lines[-1].endswith("\\"):
                lines[-1] = lines[-1][:-1]
                more = self._line(more=True)
                if more is None:
                    break
                lines += [more, *self._waiting()]
            return _tidy("\n".join(lines))

    def _block(self) -> str:
        lines = []
        while (line := self._line(more=True)) is not None and line.strip() != _FENCE:
            lines.append(line)
        return "\n".join(lines)

    def _line(self, more: bool = False, pasted: bool = False) -> str | None:
        if self.terminal:
            try:
                return input("" if pasted else "... " if more else self.prompt)
            except EOFError:
                return None
        if self.prompt and not more:  # piped: each message's prompt, as input() prints it
            self.stdout.write(self.prompt)
            self.stdout.flush()
        line = self.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def _waiting(self) -> list[str]:
        """Lines of the same paste: complete lines already waiting on the terminal."""
        out: list[str] = []
        while self.terminal and _ready(self.stdin, PASTE_WINDOW_S):
            line = self._line(pasted=True)
            if line is None:
                break
            out.append(line)
        return out


def _tidy(text: str) -> str:
    lines = text.rstrip().split("\n")
    while len(lines) > 1 and not lines[0].strip():
        lines.pop(0)
    return lines[0].strip() if len(lines) == 1 else "\n".join(lines)


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def _ready(f, timeout: float) -> bool:
    # A terminal in canonical mode reports input only once a whole line is there, so a line
    # the user is still typing never counts as waiting.
    try:
        return bool(select.select([f], [], [], timeout)[0])
    except (OSError, ValueError):  # Windows consoles cannot be selected: no burst joining there
        return False
