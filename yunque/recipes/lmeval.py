"""`yunque lm-eval ARGS`: lm-evaluation-harness's own command line with the `yunque` model registered.

lm-eval (up to 0.4.13) knows only the models of its own registry and reads no plugin entry
points, so the plain `lm_eval` command cannot see `--model yunque`; this command imports the
adapter (which registers it) in the same process, then hands every argument to lm-eval.
"""

from __future__ import annotations

import sys

from yunque.errors import require


def lm_eval_cmd(argv: list[str]) -> int:
    """Run `lm_eval ARGV` with `--model yunque` available (the arguments are lm-eval's own)."""
    require("lm_eval", "lmeval", "yunque lm-eval", package="lm-eval")
    from lm_eval.__main__ import cli_evaluate

    import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers the `yunque` model)

    saved, sys.argv = sys.argv, ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
