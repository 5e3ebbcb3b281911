"""`DemoResult`: what `run_demo` produces and `report` writes out (its own module, so imports flow one way:
run -> report -> result)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DemoResult:
    out_dir: Path
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    facts: dict = field(default_factory=dict)  # everything report.md and run.json show
