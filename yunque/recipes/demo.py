"""`yunque demo`: fine-tune a real pretrained model into a security assistant on CPU (or build one from
scratch) and show that it works."""

from __future__ import annotations

import math
from pathlib import Path

from yunque.errors import YunqueError


def demo_cmd(
    out: Path = Path("runs/demo"),
    quick: bool = False,
    seed: int = 0,
    from_scratch: bool = False,
    privacy: bool = False,
    epsilon: float | None = None,
) -> int:
    """Fine-tune SmolLM2-135M-Instruct with LoRA into a security assistant; evaluate, red-team, merge, ship, report.

    Exits 1 when the run misses its stated bars (task accuracy overall and per task, forgetting; with
    --privacy, forgetting only).

    Args:
        out: the run folder (report.md, run.json, model/, data/, ...)
        quick: smaller settings (a few minutes; lower bars, stated in the output)
        seed: one seed for data generation, splits, initialisation and training
        from_scratch: instead, pretrain a 5M-parameter model from scratch on Python's stdlib text and
            LoRA-tune it to the tasks (needs no pretrained model)
        privacy: fine-tune with DP-SGD (ε from --epsilon, δ = 1/n^1.1, each record's gradient clipped to 1,
            PRV accountant) after planting 2 canaries in the training split, then audit the adapter against
            the base model (canary exposure, membership inference) into privacy/. The accuracy bars are
            reported but not enforced: at a few hundred records the noise costs accuracy by design, so the
            exit status is 1 only when forgetting exceeds its bar
        epsilon: the privacy budget ε of --privacy (default 8)
    """
    if epsilon is not None and not privacy:
        raise YunqueError("--epsilon: applies with --privacy (yunque demo --privacy --epsilon E)")
    if epsilon is not None and not 0 < epsilon < math.inf:
        raise YunqueError(f"--epsilon: must be a number > 0, got {epsilon:g}")
    if from_scratch:
        if privacy:
            raise YunqueError("--privacy: applies to the pretrained demo (yunque demo --privacy), not --from-scratch")
        from yunque.demo.run import run_demo

        r = run_demo(out, quick=quick, seed=seed)
        return 0 if r.facts["eval"]["fine-tuned"]["tasks"]["all"]["accuracy"] >= r.facts["plan"]["accuracy_bar"] else 1
    from yunque.demo.pretrained import DP_EPSILON, run_pretrained_demo

    eps = (DP_EPSILON if epsilon is None else epsilon) if privacy else None
    r = run_pretrained_demo(out, quick=quick, seed=seed, epsilon=eps)
    return 0 if r.facts["verdict"]["ok"] else 1
