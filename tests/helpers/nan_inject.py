"""A NaN loss at chosen training steps, for the tests of non-finite steps.

In a test: `poison_steps(monkeypatch, {3})`. Under torchrun, where a test cannot patch the
processes it starts, run this file instead of `-m yunque.recipes.train`:

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/nan_inject.py CONFIG [key=value ...]

with YUNQUE_TEST_NAN="3,4" (every rank) or "3@1" (rank 1 only). Each rank writes the error that
ends its run to $YUNQUE_TEST_ERRORS/rank-N.txt before it leaves the process group (after that,
torchrun may end it before it prints: the first rank to exit makes it stop the others).
"""

from __future__ import annotations

import os
import sys


def wrap(train_step, steps: set[int], rank: int | None = None):
    """train_step, but the loss of the steps in `steps` (1-based calls) is NaN, so are its gradients."""
    calls = [0]

    def poisoned(module, *args, **kw):
        calls[0] += 1
        if calls[0] not in steps or (rank is not None and int(os.environ.get("RANK", "0")) != rank):
            return train_step(module, *args, **kw)
        hook = module.register_forward_hook(lambda m, inputs, out: out * float("nan"))
        try:
            return train_step(module, *args, **kw)
        finally:
            hook.remove()

    return poisoned


def poison_steps(monkeypatch, steps: set[int], rank: int | None = None) -> None:
    import yunque.train.loop as loop

    monkeypatch.setattr(loop, "train_step", wrap(loop.train_step, steps, rank))


if __name__ == "__main__":
    import yunque.train.loop as loop
    from yunque.cli import call_with_argv
    from yunque.errors import YunqueError
    from yunque.recipes.train import train_cmd

    spec = os.environ["YUNQUE_TEST_NAN"]
    steps, _, rank = spec.partition("@")
    loop.train_step = wrap(loop.train_step, {int(s) for s in steps.split(",")}, int(rank) if rank else None)
    run = loop.Trainer.run

    def recorded(self):
        try:
            return run(self)
        except YunqueError as e:
            with open(os.path.join(os.environ["YUNQUE_TEST_ERRORS"], f"rank-{self.d.rank}.txt"), "w") as f:
                f.write(str(e))
            raise

    loop.Trainer.run = recorded
    try:
        sys.exit(call_with_argv(train_cmd, sys.argv[1:], prog="yunque train") or 0)
    except YunqueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
