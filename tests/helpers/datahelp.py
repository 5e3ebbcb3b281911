"""Helpers for the data pipeline tests: tiny inputs written on the fly, fast single-process runs."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

from yunque.config import from_dict
from yunque.data.config import DataConfig

# The checkout sits at /work/main with /work/shared beside it; YUNQUE_SHARED_DATA points elsewhere.
SHARED = Path(os.environ.get("YUNQUE_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data")


def cfg(**sections: Any) -> DataConfig:
    """A DataConfig from nested dicts; one worker unless asked (pool start-up dominates tiny inputs)."""
    sections.setdefault("workers", 1)
    return from_dict(DataConfig, sections)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_records(out: Path) -> list[dict]:
    return [r for s in ("train", "val", "test") for r in read_jsonl(out / f"{s}.jsonl")]


_WORDS = (  # noqa: SIM905  (a readable word list)
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
    "tau upsilon phi chi psi omega red green blue cyan magenta yellow black white"
).split()


def sentence(i: int, n: int = 40) -> str:
    """A deterministic pseudo-random sentence; different i give texts with Jaccard ~0."""
    rng = random.Random(i)
    out = rng.choices(_WORDS, k=n)
    return " ".join(out) + f" #{i}"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory {SHARED} not present (the checkout's sibling ../shared/data)")
    return SHARED.resolve()
