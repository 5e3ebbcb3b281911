"""Input guard, output guard and the audit log.

Input guard: named regex rules for the common prompt-injection and jailbreak phrasings, plus
chat-template special tokens written into message text (which would let a user forge an
assistant or system turn). Mode "flag" records the verdict; "block" refuses the request
with a 400 naming the rules. Regexes catch the lazy attacks, not a determined one: the guard
is a tripwire that feeds metrics and the audit log, not a proof of safety.

Output guard: PII and secrets in generated text are replaced by typed placeholders with the
data pipeline's detectors (`yunque.data.pii`), chunk by chunk while streaming.

Audit log: one JSON line per request (id, caller, route, status, token counts, latency,
verdicts). Prompt and completion text only when `audit.log_prompts` is on.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import regex

from yunque.data.pii import StreamRedactor, scrub
from yunque.errors import ConfigError

# Linear time by construction: every rule is anchored on a literal word (or a line start), its
# repeats are separated by a word character that the repeated part cannot match, and nothing
# unbounded is followed by something the same characters could also match (`^\s*(?:#{2,}\s*)?`
# was quadratic in runs of newlines). Patterns are lower case: the text is
# case-folded once instead of matching with IGNORECASE (half the time).
_V = r"(?:ignore|disregard|forget|override|bypass|skip)"
_PRIOR = r"(?:all\s+|any\s+|the\s+|your\s+|my\s+)*(?:previous|prior|above|earlier|preceding|original|system|initial)"
RULES: dict[str, str] = {
    "ignore_instructions": rf"\b{_V}\s+{_PRIOR}\s+(?:instructions?|prompts?|rules|directions|guidelines|messages?|context)\b",  # noqa: E501
    "reveal_system_prompt": r"\b(?:reveal|show|print|repeat|output|leak|display|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+"
    r"(?:(?:full|entire|hidden|secret|original|initial)\s+)?(?:system\s+(?:prompt|message)|hidden\s+instructions|instructions\s+above)\b",
    "persona_jailbreak": r"\b(?:you\s+are\s+now|act\s+as|pretend\s+to\s+be|roleplay\s+as)\s+(?:a\s+|an\s+)?(?:dan|jailbroken|unrestricted|unfiltered|uncensored|evil)\b"  # noqa: E501
    r"|\bdo\s+anything\s+now\b|\bdan\s+mode\b",
    "mode_switch": r"\b(?:enable|activate|enter|switch\s+to)\s+(?:developer|god|jailbreak|unrestricted|debug\s+admin)\s+mode\b",  # noqa: E501
    "no_rules": r"\b(?:without|no|free\s+of|ignore)\s+(?:any\s+)?(?:ethical\s+|safety\s+|content\s+)?(?:restrictions|filters|guidelines|limitations|censorship)\b"  # noqa: E501
    r"(?=.{0,80}?\b(?:answer|respond|reply|tell|act|you)\b)",
    # Blanks other than newlines, possessive: a line start cannot reach into the next line.
    "fake_turn": r"^[^\S\n]*+(?:#{2,}+[^\S\n]*+)?(?:system|assistant)[^\S\n]*+:\s|\[/?inst\]|<\|im_start\|>|<<sys>>",
}
TIMEOUT_RULE = "guard_timeout"  # the verdict's rule when the time budget ran out before every rule ran


@dataclass
class Verdict:
    verdict: str  # "pass" | "flag" | "block"
    rules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "rules": self.rules}


class InputGuard:
    """Named rules over each text; `check` stops at its deadline with the rule `guard_timeout`.

    Rules run on the `regex` engine, which can stop a search at a deadline (so a slow custom
    pattern cannot hold a request, or a worker thread, for long) and lets go of the GIL while
    it searches (so the event loop keeps serving meanwhile)."""

    def __init__(self, mode: str, special_tokens: Iterable[str] = (), extra_patterns: Iterable[str] = ()):
        self.mode = mode
        flags = regex.DOTALL | regex.MULTILINE
        try:
            # (name, compiled, runs on the case-folded text): custom patterns keep their own case
            # handling (IGNORECASE, as documented) and see the text as sent.
            self._rules = [(name, regex.compile(p, flags), True) for name, p in RULES.items()]
            self._rules += [
                (f"custom_{i}", regex.compile(p, flags | regex.IGNORECASE), False) for i, p in enumerate(extra_patterns)
            ]
        except regex.error as e:
            raise ConfigError(f"guards.extra_patterns: invalid regex: {e}") from None
        self._special = sorted({t for t in special_tokens if t and len(t) > 2}, key=len, reverse=True)

    def check(self, texts: Iterable[str], deadline: float | None = None) -> Verdict:
        """`deadline`: a `time.monotonic()` instant; rules not run by then make the verdict
        flag or block with the rule `guard_timeout` (fail closed)."""
        if self.mode == "off":
            return Verdict("pass")
        hits: list[str] = []
        for text in texts:
            folded = text.casefold()
            for name, rx, fold in self._rules:
                if name in hits:
                    continue
                left = None if deadline is None else deadline - time.monotonic()
                try:
                    if left is not None and left <= 0:
                        raise TimeoutError
                    found = rx.search(folded if fold else text, timeout=left, concurrent=True)
                except TimeoutError:
                    return Verdict("block" if self.mode == "block" else "flag", hits + [TIMEOUT_RULE])
                if found:
                    hits.append(name)
            if "special_token" not in hits and any(t in text for t in self._special):
                hits.append("special_token")
        if not hits:
            return Verdict("pass")
        return Verdict("block" if self.mode == "block" else "flag", hits)


class OutputGuard:
    """Redacts PII and secrets; one `stream()` per choice when streaming."""

    def __init__(self, mode: str, holdback: int = 64):
        self.mode, self.holdback = mode, holdback

    @property
    def on(self) -> bool:
        return self.mode != "off"

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        if not self.on:
            return text, {}
        r = scrub(text)
        return r.text, dict(r.findings)

    def stream(self) -> StreamRedactor | None:
        return StreamRedactor(holdback=self.holdback) if self.on else None


class AuditLog:
    def __init__(self, path: Path | None, log_prompts: bool = False):
        self.path, self.log_prompts = path, log_prompts
        self._lock = threading.Lock()
        self._f = None
        if path is not None:
            path = Path(path).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            # line-buffered: a crash loses at most one line; open for the server's whole life
            self._f = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, record: dict, prompt: str | None = None, completion: str | None = None) -> None:
        if self._f is None:
            return
        rec = {"ts": round(time.time(), 3), **record}
        if self.log_prompts:
            rec["prompt"], rec["completion"] = prompt, completion
        line = json.dumps(rec, ensure_ascii=False)
        with self._lock:
            self._f.write(line + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
