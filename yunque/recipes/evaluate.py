"""`yunque eval`, `yunque redteam` and `yunque canaries`: thin wrappers over yunque.evaluate."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Literal

from yunque.errors import YunqueError


def eval_cmd(
    *,
    model: Path,
    data: Path,
    out: Path,
    adapter: Path | None = None,
    metrics: list[str] | None = None,
    compare: list[Path] | None = None,
    scoring: Literal["generate", "likelihood"] = "generate",
    labels: list[str] | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_length: int | None = None,
    stride: int | None = None,
    limit: int | None = None,
) -> int:
    """Score a model on held-out data: perplexity, ROUGE, BLEU, chrF, exact match, classification.

    Args:
        model: model directory (Hugging Face format)
        data: file of examples (JSONL, JSON, CSV/TSV, Parquet; text, prompt+reference, chat, alpaca or text+label records)
        out: output directory for eval.json, eval.md, predictions.jsonl and PNG charts
        adapter: LoRA adapter directory (PEFT format) merged into --model for this evaluation
        metrics: perplexity, rouge, bleu, chrf, exact_match, classification (default: by data kind)
        compare: more models to put side by side; an adapter directory means --model plus that adapter
        scoring: classification by parsing generated text or by comparing label likelihoods
        labels: every class name (default: the labels found in the data)
        chat: wrap raw prompts in the chat template (default: only chat records use it)
        max_new_tokens: generation limit per example
        batch_size: examples per generation / scoring batch
        max_length: context window for scoring (default: the model's, at most 2048)
        stride: sliding-window step for long documents (default: max_length / 2)
        limit: evaluate only the first N examples
    """  # noqa: E501
    from yunque.evaluate.report import markdown, write_report
    from yunque.evaluate.runner import evaluate

    runs: list[tuple[Path, Path | None]] = [(model, adapter)]
    for c in compare or []:
        runs.append((model, c) if (Path(c) / "adapter_config.json").is_file() else (c, None))
    kw = {
        "metrics": metrics,
        "scoring": scoring,
        "labels": labels,
        "chat": chat,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "max_length": max_length,
        "stride": stride,
        "limit": limit,
    }
    results = []
    for m, a in runs:
        print(f"evaluating {m}" + (f" + {a}" if a else ""), file=sys.stderr)
        results.append(evaluate(m, data, adapter=a, **kw))
    write_report(results, out)
    print(markdown(results))
    print(f"wrote {out}/eval.json, eval.md, predictions.jsonl, charts", file=sys.stderr)
    return 0


def redteam_cmd(
    *,
    out: Path | None = None,
    model: str | None = None,
    url: str | None = None,
    api_key: str | None = None,
    adapter: Path | None = None,
    served_model: str | None = None,
    attempts: int = 3,
    temperature: float = 0.7,
    max_tokens: int = 256,
    seed: int = 0,
    probes: list[Path] | None = None,
    categories: list[str] | None = None,
    canaries: Path | None = None,
    fail_above: float | None = None,
    concurrency: int = 4,
    max_wait: float = 300.0,
    check_only: bool = False,
) -> int:
    """Run the red-team probe suite (OWASP LLM Top 10 2025 categories) against a model or an endpoint.

    Exits 1 when a category's success rate is over --fail-above, and also when any probe request
    failed (HTTP error, rate limit not cleared within --max-wait): an incomplete run is no pass.

    Args:
        out: output directory for redteam.json, redteam.md and attempts.jsonl
        model: local model directory; with --url, the served model's name (default: the one the server lists at /v1/models)
        url: OpenAI-compatible endpoint (http://host:port, .../v1 or .../v1/chat/completions)
        api_key: bearer token for --url (default: $YUNQUE_API_KEY, then $OPENAI_API_KEY)
        adapter: LoRA adapter merged into --model
        served_model: same as --model NAME with --url
        attempts: samples per prompt variant
        temperature: sampling temperature (0: greedy, then use --attempts 1)
        max_tokens: reply limit; reaching it counts as unbounded output
        seed: sampling seed
        probes: extra probe YAML files or directories (same format as the built-in ones)
        categories: run only these categories
        canaries: canaries.json of the planted canaries (`yunque data prepare --canaries N`, `yunque data canaries`)
        fail_above: exit with code 1 when any attack category's success rate exceeds this fraction
        concurrency: requests in flight at once to --url
        max_wait: seconds one request to --url may spend waiting out rate limits (429) before it counts as failed
        check_only: only check that every detector fires on its probe's example and not on a refusal
    """  # noqa: E501
    from yunque.data.canary import load_canaries
    from yunque.evaluate.redteam import (
        add_canaries,
        check_suite,
        gate,
        incomplete,
        load_suite,
        markdown,
        run_redteam,
        write_redteam,
    )

    suite = load_suite(probes or [], categories)
    problems = check_suite(suite)
    if problems:
        raise YunqueError("probe suite check failed:\n  " + "\n  ".join(problems))
    if check_only:
        print(
            f"{sum(len(c.probes) for c in suite.categories)} probes in {len(suite.categories)} categories: all detectors check out"  # noqa: E501
        )
        return 0
    if model is None and url is None:
        raise YunqueError("give --model DIR (a local model) or --url URL (an endpoint)")
    if url is not None and adapter is not None:
        raise YunqueError("--adapter applies to a local --model DIR, not to --url")
    if url is not None and model is not None and served_model is not None and model != served_model:
        raise YunqueError(f"--model {model!r} and --served-model {served_model!r} disagree: give one")
    if out is None:
        raise YunqueError("--out is required")
    if fail_above is not None and not 0.0 <= fail_above <= 1.0:
        raise YunqueError(f"--fail-above {fail_above}: must be a fraction in [0, 1]")
    if attempts < 1:
        raise YunqueError("--attempts must be >= 1")
    if concurrency < 1:
        raise YunqueError("--concurrency must be >= 1")
    if not max_wait >= 0:
        raise YunqueError(f"--max-wait {max_wait}: must be >= 0 seconds")
    local = url is None
    planted = load_canaries(canaries) if canaries is not None else []
    if planted:
        add_canaries(suite, planted, raw=local)
    if local:
        from yunque.evaluate.targets import LocalTarget

        target = LocalTarget(model, adapter, max_tokens=max_tokens, temperature=temperature)
    else:
        from yunque.evaluate.targets import OpenAITarget

        key = api_key or os.environ.get("YUNQUE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        target = OpenAITarget(
            url,
            key,
            model or served_model,
            max_tokens=max_tokens,
            temperature=temperature,
            concurrency=concurrency,
            max_wait=max_wait,
        )
    summary, records = run_redteam(target, suite, attempts=attempts, seed=seed)
    if planted and local:  # memorisation below the level of verbatim leaks
        from yunque.evaluate.canary import canary_exposure

        bits = canary_exposure(target.model, target.tok, planted, candidates=100, seed=seed)
        summary["canary_exposure"] = {"candidates": 100, "max_bits": math.log2(100), "bits": bits}
    failed = gate(summary, fail_above)
    if fail_above is not None:
        summary["gate"] = {"fail_above": fail_above, "failed": failed, "complete": not summary["overall"]["errors"]}
    write_redteam(summary, records, out, target.name)
    print(markdown(summary, target.name))
    missing = incomplete(summary)
    if missing:
        print(f"yunque redteam: {missing}", file=sys.stderr)
    return 1 if failed or missing else 0


def canaries_cmd(*, data: Path, out: Path, n: int = 8, rate: float = 0.01, seed: int = 0) -> int:
    """Plant unique canary strings into a JSONL training file, to measure memorisation later.

    For data prepared with `yunque data prepare`, use its `--canaries N` (training split only,
    hashed in the manifest) instead.

    Args:
        data: input JSONL file of records (text, completion or chat)
        out: output JSONL file; the canaries go to OUT with suffix .canaries.json, placements to .placements.jsonl
        n: number of distinct canaries
        rate: fraction of records that get a canary
        seed: seed for the canaries and their placement
    """
    from yunque.data.canary import make_canaries, plant_canaries, save_canaries

    if not 0.0 < rate <= 1.0:
        raise YunqueError(f"--rate {rate}: must be in (0, 1]")
    if n < 1:
        raise YunqueError("--n must be >= 1")
    records = []
    try:
        with open(data, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise YunqueError(f"{data}:{i}: invalid JSON: {e.msg}") from None
    except FileNotFoundError:
        raise YunqueError(f"{data}: no such file") from None
    if not records:
        raise YunqueError(f"{data}: empty file (no records)")
    canaries = make_canaries(n, seed)
    planted, placements = plant_canaries(records, canaries, rate, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in planted)
    save_canaries(canaries, out.with_suffix(".canaries.json"))
    with open(out.with_suffix(".placements.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in placements)
    print(f"planted {len(placements)} copies of {n} canaries into {out}; canaries: {out.with_suffix('.canaries.json')}")
    return 0
