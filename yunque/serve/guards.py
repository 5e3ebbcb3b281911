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
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from yunque.data.pii import StreamRedactor, scrub
from yunque.errors import ConfigError

_V = r"(?:ignore|disregard|forget|override|bypass|skip)"
_PRIOR = r"(?:all\s+|any\s+|the\s+|your\s+|my\s+)*(?:previous|prior|above|earlier|preceding|original|system|initial)"
RULES: dict[str, str] = {
    "ignore_instructions": rf"\b{_V}\s+{_PRIOR}\s+(?:instructions?|prompts?|rules|directions|guidelines|messages?|context)\b",
    "reveal_system_prompt": r"\b(?:reveal|show|print|repeat|output|leak|display|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+"
                            r"(?:(?:full|entire|hidden|secret|original|initial)\s+)?(?:system\s+(?:prompt|message)|hidden\s+instructions|instructions\s+above)\b",
    "persona_jailbreak": r"\b(?:you\s+are\s+now|act\s+as|pretend\s+to\s+be|roleplay\s+as)\s+(?:a\s+|an\s+)?(?:DAN|jailbroken|unrestricted|unfiltered|uncensored|evil)\b"
                         r"|\bdo\s+anything\s+now\b|\bDAN\s+mode\b",
    "mode_switch": r"\b(?:enable|activate|enter|switch\s+to)\s+(?:developer|god|jailbreak|unrestricted|debug\s+admin)\s+mode\b",
    "no_rules": r"\b(?:without|no|free\s+of|ignore)\s+(?:any\s+)?(?:ethical\s+|safety\s+|content\s+)?(?:restrictions|filters|guidelines|limitations|censorship)\b"
                r"(?=.{0,80}\b(?:answer|respond|reply|tell|act|you)\b)",
    "fake_turn": r"^\s*(?:#{2,}\s*)?(?:system|assistant)\s*:\s|\[/?INST\]|<\|im_start\|>|<<SYS>>",
}


@dataclass
class Verdict:
    verdict: str  # "pass" | "flag" | "block"
    rules: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "rules": self.rules}


class InputGuard:
    def __init__(self, mode: str, special_tokens: Iterable[str] = (), extra_patterns: Iterable[str] = ()):
        self.mode = mode
        rules = dict(RULES)
        for i, pat in enumerate(extra_patterns):
            rules[f"custom_{i}"] = pat
        try:
            self._rules = [(name, re.compile(p, re.IGNORECASE | re.DOTALL | re.MULTILINE)) for name, p in rules.items()]
        except re.error as e:
            raise ConfigError(f"guards.extra_patterns: invalid regex: {e}") from None
        self._special = sorted({t for t in special_tokens if t and len(t) > 2}, key=len, reverse=True)

    def check(self, texts: Iterable[str]) -> Verdict:
        if self.mode == "off":
            return Verdict("pass")
        hits: list[str] = []
        for text in texts:
            for name, rx in self._rules:
                if name not in hits and rx.search(text):
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
