"""`evaluate` end to end on a tiny model: predictions, metrics, reports, comparisons, errors."""

import json

import pytest
import torch
from eval_helpers import cached_model_dir

from yunque.errors import YunqueError
from yunque.evaluate import metrics as M
from yunque.evaluate.report import write_report
from yunque.evaluate.runner import evaluate

GEN = [
    {"prompt": "The cat sat on", "completion": "the mat."},
    {"prompt": "The quick brown fox jumps over the lazy", "references": ["dog.", "hound."]},
    {"question": "Where", "answer": "in the park"},
    {
        "messages": [
            {"role": "user", "content": "Where did the dog run?"},
            {"role": "assistant", "content": "In the park."},
        ]
    },
]
CLS = [
    {"text": "Spam offers win free money now.", "label": "spam"},
    {"text": "Meeting moved to Tuesday.", "label": "ham"},
    {"text": "Great movie, I loved it.", "label": "ham"},
    {"text": "Win money", "label": "spam"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("runner")
    return {
        "dir": d,
        "model": cached_model_dir("llama"),
        "model2": cached_model_dir("llama", seed=1),
        "gen": _jsonl(d / "gen.jsonl", GEN),
        "cls": _jsonl(d / "cls.jsonl", CLS),
    }


def test_generation_predictions_equal_transformers_greedy(env):
    import transformers

    from yunque.chat import apply_chat_template
    from yunque.tokenizer import Tokenizer

    r = evaluate(
        env["model"],
        env["gen"],
        metrics=["rouge", "bleu", "chrf", "exact_match", "perplexity"],
        max_new_tokens=12,
        batch_size=4,
    )
    tok = Tokenizer.from_dir(env["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32).eval()
    prompts = [[tok.bos_id] + tok.encode(g["prompt"] if "prompt" in g else g["question"]) for g in GEN[:3]]
    prompts.append(tok.encode(apply_chat_template(tok, GEN[3]["messages"][:1], add_generation_prompt=True)))
    want = []
    for ids in prompts:  # one example at a time: no padding to get wrong
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :].tolist()
        cut = next((k for k, t in enumerate(out) if t in tok.stop_ids), len(out))
        want.append(tok.decode(out[:cut], skip_special_tokens=True))
    got = [p["prediction"] for p in r.predictions]
    assert got == want
    assert sum(bool(g) for g in got) >= 2  # real text, not a comparison of empty strings
    refs = [["the mat."], ["dog.", "hound."], ["in the park"], ["In the park."]]
    assert r.metrics["bleu"] == pytest.approx(M.bleu(got, refs))
    assert r.metrics["rougeL"] == pytest.approx(M.rouge(got, refs)["rougeL"])
    assert r.metrics["exact_match"] == pytest.approx(M.exact_match(got, refs))
    assert r.metrics["perplexity"] > 1 and r.metrics["bits_per_byte"] > 0
    assert r.timing["new_tokens"] > 0


def test_likelihood_classification_picks_the_most_likely_label(env):
    import transformers

    from yunque.tokenizer import Tokenizer

    r = evaluate(env["model"], env["cls"], scoring="likelihood", labels=["ham", "spam", "other"])
    tok = Tokenizer.from_dir(env["model"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32).eval()
    for row, p in zip(CLS, r.predictions):
        scores = {}
        for label in ("ham", "other", "spam"):
            ctx = [tok.bos_id] + tok.encode(row["text"])
            cont = ([tok.bos_id] + tok.encode(row["text"] + " " + label))[len(ctx) :]
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor([ctx + cont])).logits[0].double(), -1)
            scores[label] = sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
            assert p["label_logprobs"][label] == pytest.approx(scores[label], rel=1e-4, abs=1e-4)
        assert p["predicted_label"] == max(scores, key=scores.get)
    c = r.classification
    assert c["labels"] == ["ham", "other", "spam"]
    assert sum(map(sum, c["confusion"])) == len(CLS)
    assert r.metrics["accuracy"] == pytest.approx(
        100 * sum(p["predicted_label"] == p["label"] for p in r.predictions) / len(CLS)
    )


def test_generated_classification_and_report_files(env, tmp_path):
    r = evaluate(env["model"], env["cls"], max_new_tokens=6)
    for p in r.predictions:
        assert p["predicted_label"] == M.parse_label(p["prediction"], ["ham", "spam"])
    out = write_report([r], tmp_path / "out")
    data = json.loads((out / "eval.json").read_text())
    assert data["kind"] == "classification" and data["examples"] == 4 and "accuracy" in data["metrics"]
    assert "Confusion matrix" in (out / "eval.md").read_text()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 4
    for png in data["charts"]:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_puts_models_side_by_side(env, tmp_path):
    from yunque.cli import call_with_argv
    from yunque.recipes.evaluate import eval_cmd

    text = _jsonl(
        tmp_path / "text.jsonl", [{"text": "The cat sat on the mat. " * 8}, {"text": "A bird sang in the tree."}]
    )
    rc = call_with_argv(
        eval_cmd,
        [
            "--model",
            str(env["model"]),
            "--data",
            str(text),
            "--out",
            str(tmp_path / "cmp"),
            "--compare",
            str(env["model2"]),
            "--max-length",
            "32",
        ],
        prog="yunque eval",
    )
    assert rc == 0
    data = json.loads((tmp_path / "cmp" / "eval.json").read_text())
    ppl = [m["metrics"]["perplexity"] for m in data["models"]]
    assert len(ppl) == 2 and ppl[0] != ppl[1]
    table = (tmp_path / "cmp" / "eval.md").read_text()
    assert "model-llama-0" in table and "model-llama-1" in table and "**" in table  # the better one is bold


def test_lora_adapter_is_merged(env, tmp_path):
    peft = pytest.importorskip("peft")
    import transformers

    from yunque.tokenizer import Tokenizer

    base = transformers.AutoModelForCausalLM.from_pretrained(env["model"], dtype=torch.float32)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(base, cfg)
    lora.save_pretrained(tmp_path / "adapter")
    merged = lora.merge_and_unload().eval()
    text = "The quick brown fox jumps over the lazy dog."
    tok = Tokenizer.from_dir(env["model"])
    ids = torch.tensor([[tok.bos_id] + tok.encode(text)])
    with torch.no_grad():
        want = torch.exp(merged(ids, labels=ids).loss).item()
    _jsonl(tmp_path / "t.jsonl", [{"text": text}])
    with_adapter = evaluate(env["model"], tmp_path / "t.jsonl", adapter=tmp_path / "adapter").metrics["perplexity"]
    without = evaluate(env["model"], tmp_path / "t.jsonl").metrics["perplexity"]
    assert with_adapter == pytest.approx(want, rel=1e-4)
    assert without != pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize(
    "rows,kwargs,match",
    [
        ([{"prompt": "hi"}], {}, r"gen\.jsonl:1: missing reference field \(expected one of: references"),
        ([{"instruction": "hi"}], {}, "missing reference field 'output'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], {}, "missing reference: no assistant message"),
        ([], {}, "empty file"),
        ([{"text": "a"}], {"metrics": ["bleurt"]}, "unknown metric 'bleurt'"),
        ([{"text": "a"}], {"metrics": ["rouge"]}, "metric 'rouge' needs references"),
        ([{"prompt": "a", "answer": "b"}], {"scoring": "likelihood"}, "likelihood applies to classification"),
        ([{"text": "a"}, {"prompt": "a", "answer": "b"}], {}, "mixes example kinds"),
        ([{"foo": 1}], {}, "no known shape"),
        ([{"text": "a", "label": True}], {}, "'label' must be a string or an integer"),
    ],
)
def test_bad_input_is_a_clear_error(env, tmp_path, rows, kwargs, match):
    path = _jsonl(tmp_path / "gen.jsonl", rows)
    with pytest.raises(YunqueError, match=match):
        evaluate(env["model"], path, **kwargs)


def test_missing_files_are_clear_errors(env, tmp_path):
    with pytest.raises(YunqueError, match="no such file"):
        evaluate(env["model"], tmp_path / "nope.jsonl")
    with pytest.raises(YunqueError, match="model directory not found"):
        evaluate(tmp_path / "nomodel", env["gen"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(YunqueError, match=r"bad\.jsonl:2: invalid JSON"):
        evaluate(env["model"], bad)


def test_csv_and_json_array_inputs(env, tmp_path):
    csv_path = tmp_path / "cls.csv"
    csv_path.write_text(
        'text,label\nSpam offers win free money now.,spam\n"Meeting moved, Tuesday.",ham\n', encoding="utf-8"
    )
    r = evaluate(env["model"], csv_path, scoring="likelihood")
    assert r.kind == "classification" and r.examples == 2
    assert r.predictions[1]["source"].startswith(str(csv_path)) and r.predictions[1]["label"] == "ham"
    arr = tmp_path / "gen.json"
    arr.write_text(json.dumps([{"prompt": "The cat", "answer": "sat"}, {"prompt": "A bird", "answer": "sang"}]))
    r = evaluate(env["model"], arr, metrics=["exact_match"], max_new_tokens=4)
    assert r.examples == 2 and "exact_match" in r.metrics


def test_progress_reports_each_stage_and_n_of_n(env, monkeypatch, capsys):
    from yunque.evaluate import runner

    lines: list[str] = []
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 0.0)  # every batch is "slow"
    r = evaluate(
        env["model"],
        env["gen"],
        metrics=["exact_match", "perplexity"],
        max_new_tokens=4,
        batch_size=1,
        progress=lines.append,
    )
    assert (
        lines[0]
        == "generating answers to 4 examples (greedy, up to 4 tokens), scoring the references in the same pass ..."
    )
    for n in (1, 2, 3):
        assert lines[n].startswith(f"generated {n}/4 examples | ") and "examples/s | eta" in lines[n]
    assert lines[4].startswith("generated 4/4 examples in ") and len(lines) == 5
    lines.clear()
    evaluate(env["model"], env["gen"], metrics=["perplexity"], progress=lines.append)
    assert lines == ["perplexity of the references of 4 examples ..."]
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 3600.0)
    quiet = evaluate(env["model"], env["gen"], metrics=["exact_match"], max_new_tokens=4, progress=None)
    assert capsys.readouterr().err == "" and quiet.predictions == r.predictions
    evaluate(env["model"], env["gen"], metrics=["exact_match"], max_new_tokens=4)  # the CLI's default: stderr
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("generating answers to 4") and err[-1].startswith("generated 4/4 examples in")


def test_threads_fit_the_free_cores_and_are_given_back(env, monkeypatch):
    """Evaluation on the CPU runs torch on the cores other processes leave free (measured at the
    start, re-checked before every generation batch) and restores torch's count at the end, also
    when it fails (issue 27 item 8: at the default count beside a busy process it ran 14x slower)."""
    import torch

    from yunque.evaluate import runner

    calls: list[str] = []

    class Policy:
        def start(self, window):
            calls.append("start")
            torch.set_num_threads(1)

        def update(self):
            calls.append("update")

        def close(self):
            calls.append("close")
            torch.set_num_threads(before)

    before = torch.get_num_threads()
    monkeypatch.setattr(runner, "ThreadPolicy", Policy)
    evaluate(env["model"], env["gen"], metrics=["exact_match"], max_new_tokens=2, batch_size=1, progress=None)
    assert calls == ["start", "update", "update", "update", "update", "close"]
    assert torch.get_num_threads() == before
    calls.clear()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "generate_texts", broken)
    with pytest.raises(RuntimeError):
        evaluate(env["model"], env["gen"], metrics=["exact_match"], max_new_tokens=2, progress=None)
    assert calls == ["start", "close"]


def test_reference_perplexity_is_scored_in_the_generation_pass(env, monkeypatch):
    """With generation metrics too, the references' perplexity comes from the generation's prefill
    (no separate scoring pass over the prompts) and equals the separate pass's value."""
    from yunque.evaluate import perplexity as P

    alone = evaluate(env["model"], env["gen"], metrics=["perplexity"], batch_size=4)
    calls = []
    real = P.score_continuations
    monkeypatch.setattr(P, "score_continuations", lambda *a, **k: calls.append(1) or real(*a, **k))
    both = evaluate(env["model"], env["gen"], metrics=["exact_match", "perplexity"], max_new_tokens=6, batch_size=4)
    assert calls == [] and "perplexity_s" not in both.timing and "perplexity_s" in alone.timing
    assert both.metrics["perplexity"] == pytest.approx(alone.metrics["perplexity"], rel=1e-5)
    assert both.metrics["bits_per_byte"] == pytest.approx(alone.metrics["bits_per_byte"], rel=1e-5)
    assert both.predictions == evaluate(env["model"], env["gen"], metrics=["exact_match"], max_new_tokens=6).predictions
