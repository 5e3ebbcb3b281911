"""lm-eval parity: the `yunque` model gives the numbers of lm-eval's own `hf` model on one checkpoint.

The tasks (tests/helpers/lm_eval_tasks.py) cover the three request types: multiple choice
(loglikelihood), perplexity (loglikelihood_rolling) and generate_until.
"""

import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install lm-eval)")

from eval_helpers import cached_model_dir
from lm_eval_tasks import TASKS, task_dir

def _run(model: str, model_args: str, tasks_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS,
                           task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False), batch_size=2,
                           log_samples=True, device="cpu", random_seed=0, numpy_random_seed=0, torch_random_seed=0)


@pytest.mark.slow
def test_yunque_matches_hf_on_all_request_types(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers "yunque")

    model_dir = cached_model_dir("llama-gqa")
    tasks = task_dir(tmp_path)
    # max_length 64: the perplexity document needs several rolling windows.
    ours = _run("yunque", f"pretrained={model_dir},max_length=64", tasks)
    ref = _run("hf", f"pretrained={model_dir},max_length=64,dtype=float32", tasks)
    for task in ("yq_mc", "yq_ppl", "yq_gen"):
        for key, v in ref["results"][task].items():
            if isinstance(v, float) and not key.endswith("_stderr,none") and math.isfinite(v):
                assert ours["results"][task][key] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, key)
    for task in ("yq_mc", "yq_ppl"):
        for a, b in zip(ours["samples"][task], ref["samples"][task]):
            for ra, rb in zip(a["resps"], b["resps"]):
                got, want = ra[0], rb[0]
                if isinstance(want, (tuple, list)):  # (logprob, is_greedy)
                    assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-4)
                    assert got[1] == want[1]
                else:
                    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    gen_ours = [s["resps"][0][0] for s in ours["samples"]["yq_gen"]]
    gen_ref = [s["resps"][0][0] for s in ref["samples"]["yq_gen"]]
    assert gen_ours == gen_ref
    assert any(gen_ref)  # the comparison is not between empty strings
