"""Fixtures of the web page's tests: a runs directory made by real (tiny) training runs, with an
eval report and a red-team report beside them, and a server for its model with the page on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

EVAL = {
    "model": "/somewhere/run-a/model",
    "adapter": None,
    "data": "/somewhere/data/test.jsonl",
    "kind": "chat",
    "examples": 40,
    "metrics": {"exact_match": 62.5, "rougeL": 71.25, "perplexity": 3.18},
    "classification": None,
    "timing": {},
}
REDTEAM = {
    "target": "run-a/model",
    "categories": {
        "prompt_injection": {
            "title": "Prompt injection",
            "owasp": "LLM01",
            "kind": "attack",
            "attempts": 20,
            "errors": 0,
            "asr": 0.15,
            "asr_ci95": [0.05, 0.36],
            "no_refusal_rate": 0.4,
            "harmful_rate": None,
        },
        "benign": {
            "title": "Benign requests",
            "owasp": "-",
            "kind": "benign",
            "attempts": 10,
            "errors": 0,
            "asr": None,
            "over_refusal": 0.1,
            "over_refusal_ci95": [0.02, 0.4],
        },
    },
    "overall": {
        "requests": 30,
        "errors": 0,
        "attack_attempts": 20,
        "successes": 3,
        "asr": 0.15,
        "asr_ci95": [0.05, 0.36],
    },
    "gate": {"fail_above": 0.2, "failed": []},
}


def train_run(corpus: dict, out: Path, steps: int, lr: float) -> Path:
    from train_util import pretrain_cfg

    from yunque.config import from_dict
    from yunque.recipes.train import train
    from yunque.train.config import TrainConfig

    cfg = pretrain_cfg(
        corpus,
        out,
        max_steps=steps,
        optim={"lr": lr, "warmup_steps": 2},
        eval={"every": 4},
        checkpoint={"every": 0},
        log={"every": 1, "plot": False},
        model={"overrides": {"num_hidden_layers": 1}},
    )
    train(from_dict(TrainConfig, cfg))
    return out


def make_runs(root: Path) -> Path:
    """root/runs with run-a (12 steps) and run-b (8 steps), both real pretraining runs (model/,
    metrics.jsonl, run.json), run-a with eval/eval.json and redteam/redteam.json. Built once per
    root: later calls reuse it."""
    import torch
    from train_util import make_corpus

    runs = root / "runs"
    if (runs / "run-b" / "run.json").is_file():
        return runs
    shutil.rmtree(runs, ignore_errors=True)
    corpus = make_corpus(root / "corpus", n_lines=80)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread is steadiest on a shared machine
    try:
        train_run(corpus, runs / "run-a", 12, 3e-3)
        train_run(corpus, runs / "run-b", 8, 1e-3)
    finally:
        torch.set_num_threads(threads)
    (runs / "run-a" / "eval").mkdir()
    (runs / "run-a" / "eval" / "eval.json").write_text(json.dumps(EVAL), encoding="utf-8")
    (runs / "run-a" / "redteam").mkdir()
    (runs / "run-a" / "redteam" / "redteam.json").write_text(json.dumps(REDTEAM), encoding="utf-8")
    return runs


def serve_config(tmp: Path, limits: dict | None = None, auth: dict | None = None):
    """A ServeConfig for the page's tests and the keys file it reads (with key `tester`)."""
    from yunque.config import from_dict
    from yunque.serve import ServeConfig

    return from_dict(
        ServeConfig,
        {
            "limits": {
                "max_batch": 4,
                "max_len": 256,
                "max_prompt_tokens": 192,
                "max_tokens": 64,
                "default_max_tokens": 16,
                "rpm": 600,
                **(limits or {}),
            },
            "auth": {"keys_file": str(tmp / "keys.json"), **(auth or {})},
            # a short hold-back, so the output guard lets tokens through as they come
            "guards": {"holdback": 4},
        },
    )


def build(model_dir: Path, cfg, runs: Path | None = None, ui: bool = True, slow_s: float = 0.0):
    """The app serving `model_dir` (its card from the directory) with the page on or off."""
    import time

    from yunque.formats.hf import load_model
    from yunque.serve import build_app
    from yunque.tokenizer import Tokenizer

    model = load_model(model_dir)
    if slow_s:
        fwd = model.forward

        def slow_forward(*a, **k):
            time.sleep(slow_s)
            return fwd(*a, **k)

        model.forward = slow_forward
    return build_app(model, Tokenizer.from_dir(model_dir), cfg, "tiny", ui=ui, model_dir=model_dir, runs_dir=runs)
