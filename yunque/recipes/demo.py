"""`yunque demo`: fine-tune a real pretrained model into a security assistant on CPU (or build one from
scratch) and show that it works."""

from __future__ import annotations

from pathlib import Path


def demo_cmd(out: Path = Path("runs/demo"), quick: bool = False, seed: int = 0, from_scratch: bool = False) -> int:
    """Fine-tune SmolLM2-135M-Instruct with LoRA into a security assistant; evaluate, red-team, merge, ship, report.

    Exits 1 when the run misses its stated bars (task accuracy overall and per task, forgetting).

    Args:
        out: the run folder (report.md, run.json, model/, data/, ...)
        quick: smaller settings (a few minutes; lower bars, stated in the output)
        seed: one seed for data generation, splits, initialisation and training
        from_scratch: instead, pretrain a 5M-parameter model from scratch on Python's stdlib text and
            LoRA-tune it to the tasks (needs no pretrained model)
    """
    if from_scratch:
        from yunque.demo.run import run_demo

        r = run_demo(out, quick=quick, seed=seed)
        return 0 if r.facts["eval"]["fine-tuned"]["tasks"]["all"]["accuracy"] >= r.facts["plan"]["accuracy_bar"] else 1
    from yunque.demo.pretrained import run_pretrained_demo

    r = run_pretrained_demo(out, quick=quick, seed=seed)
    return 0 if r.facts["verdict"]["ok"] else 1
