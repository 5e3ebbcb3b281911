"""`yunque demo`: build a working security-domain LLM offline in minutes and show that it works."""

from __future__ import annotations

from pathlib import Path


def demo_cmd(out: Path = Path("runs/demo"), quick: bool = False, seed: int = 0) -> int:
    """Corpus -> tokenizer -> pretraining -> data prepare -> LoRA -> merge -> evaluation -> report, on CPU.

    Args:
        out: the run folder (report.md, run.json, model/, data/, ...)
        quick: smaller settings (about 90 seconds; a lower accuracy bar, stated in the output)
        seed: one seed for data generation, splits, initialisation and training
    """
    from yunque.demo.run import run_demo

    r = run_demo(out, quick=quick, seed=seed)
    return 0 if r.facts["eval"]["fine-tuned"]["tasks"]["all"]["accuracy"] >= r.facts["plan"]["accuracy_bar"] else 1
