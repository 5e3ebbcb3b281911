"""lm-eval parity: the `yunque` model gives the numbers of lm-eval's own `hf` model on one checkpoint.

The tasks (tests/helpers/lm_eval_tasks.py) cover the three request types: multiple choice
(loglikelihood), perplexity (loglikelihood_rolling) and generate_until.
"""

import math

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an optional extra (pip install lm-eval)")

from eval_helpers import cached_model_dir, make_tokenizer  # noqa: E402
from lm_eval_tasks import TASKS, task_dir  # noqa: E402


def _run(model: str, model_args: str, tasks_dir, tasks=TASKS, **kw):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(tasks_dir), include_defaults=False),
        batch_size=2,
        log_samples=True,
        device="cpu",
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
        **kw,
    )


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


@pytest.mark.slow
def test_apply_chat_template_matches_hf(tmp_path, monkeypatch):
    """`--apply_chat_template` renders lm-eval's chats as `hf` does: system turn, few-shot turns, prefilled answer."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    import yunque.evaluate.lm_eval_adapter  # noqa: F401  (registers "yunque")

    model_dir = cached_model_dir("llama-gqa")
    tasks = task_dir(tmp_path)
    # gen_prefix starts the assistant's answer: the chat is rendered with its last message left open.
    gen = (tasks / "yq_gen.yaml").read_text(encoding="utf-8").replace("task: yq_gen", "task: yq_prefill")
    (tasks / "yq_prefill.yaml").write_text(gen + "gen_prefix: 'Answer:'\n", encoding="utf-8")
    names = ["yq_mc", "yq_gen", "yq_prefill"]
    kw = dict(
        apply_chat_template=True, system_instruction="Complete the sentence.", num_fewshot=1, fewshot_as_multiturn=True
    )
    ours = _run("yunque", f"pretrained={model_dir},max_length=128", tasks, names, **kw)
    ref = _run("hf", f"pretrained={model_dir},max_length=128,dtype=float32", tasks, names, **kw)
    for task in names:
        contexts = [s["arguments"] for s in ours["samples"][task]]
        assert contexts == [s["arguments"] for s in ref["samples"][task]], task
        first = contexts[0][0][0]  # the first request's context (a multiple-choice doc has one per choice)
        assert "<|start_header_id|>system<|end_header_id|>" in first and "Complete the sentence." in first
        assert first.count("<|start_header_id|>user<|end_header_id|>") == 2  # one few-shot turn, then the question
        for key, v in ref["results"][task].items():
            if isinstance(v, float) and not key.endswith("_stderr,none") and math.isfinite(v):
                assert ours["results"][task][key] == pytest.approx(v, rel=1e-4, abs=1e-6), (task, key)
    prefill = ours["samples"]["yq_prefill"][0]["arguments"][0][0]
    assert prefill.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nAnswer:")  # left open, no end-of-turn
    gen = [s["resps"][0][0] for task in ("yq_gen", "yq_prefill") for s in ours["samples"][task]]
    assert gen == [s["resps"][0][0] for task in ("yq_gen", "yq_prefill") for s in ref["samples"][task]]


NO_SYSTEM = (
    "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_chat_template_selection_and_system_fallback(tmp_path):
    """Named templates are chosen as lm-eval's `hf` model chooses them; a template that rejects the
    system turn gets the chat without it (lm-eval's fallback), any other failure stays an error."""
    from yunque.chat import apply_chat_template
    from yunque.errors import YunqueError
    from yunque.evaluate.lm_eval_adapter import YunqueLM

    tok = make_tokenizer(tmp_path)
    llama3 = tok.chat_template
    tok.chat_templates = {"default": NO_SYSTEM, "llama3": llama3}
    lm = YunqueLM.__new__(YunqueLM)  # the template logic needs only the tokenizer
    lm.tok, lm.chat_template_args = tok, {}
    assert lm.chat_template(False) is None
    assert lm.chat_template(True) == NO_SYSTEM
    assert lm.chat_template("llama3") == llama3
    with pytest.raises(ValueError, match="llama3"):
        lm.chat_template("nope")

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert lm.apply_chat_template(chat) == "<user>Hi</user><assistant>"
    assert lm.apply_chat_template([*chat[1:], {"role": "assistant", "content": "Answer:"}], False) == (
        "<user>Hi</user><assistant>Answer:"
    )  # prefilled reply left open
    tok.chat_templates = {"default": llama3}
    assert lm.apply_chat_template(chat) == apply_chat_template(tok, chat, add_generation_prompt=True)
    tok.chat_templates = {}
    with pytest.raises(YunqueError, match="no chat template"):
        lm.apply_chat_template(chat)
