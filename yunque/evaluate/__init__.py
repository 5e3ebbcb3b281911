"""Evaluation: text and classification metrics, perplexity, a red-team probe suite, canaries.

    from yunque.evaluate import evaluate, write_report
    result = evaluate("runs/sft/model", "data/test.jsonl", metrics=["rouge", "bleu"])
    write_report([result], "runs/sft/eval")

Submodules import their heavy dependencies (torch, sacrebleu, rouge-score, httpx) lazily.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "yunque.evaluate.runner",
    "EvalResult": "yunque.evaluate.runner",
    "write_report": "yunque.evaluate.report",
    "perplexity": "yunque.evaluate.perplexity",
    "score_continuations": "yunque.evaluate.perplexity",
    "load_examples": "yunque.evaluate.data",
    "run_redteam": "yunque.evaluate.redteam",
    "load_suite": "yunque.evaluate.redteam",
    "make_canaries": "yunque.data.canary",
    "plant_canaries": "yunque.data.canary",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'yunque.evaluate' has no attribute {name!r}")


__all__ = list(_EXPORTS)
