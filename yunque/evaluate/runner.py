"""`evaluate`: one model (plus adapter) on one data file -> metrics, predictions and a report.

Generation runs in batches through `yunque.generate` (left-padded prompts of different
lengths, one static KV cache per batch), greedy by default so scores are reproducible.
Prompts are sorted by length before batching so that a batch wastes little on padding;
results are put back in file order.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from yunque.errors import YunqueError
from yunque.evaluate import metrics as M
from yunque.evaluate.data import Example, load_examples
from yunque.threads import ThreadPolicy

DEFAULT_METRICS = {
    "text": ["perplexity"],
    "generation": list(M.GENERATION_METRICS),
    "classification": ["classification"],
}
ALLOWED = {
    "text": {"perplexity"},
    "generation": {"perplexity", *M.GENERATION_METRICS},
    "classification": {"perplexity", "classification", *M.GENERATION_METRICS},
}


PROGRESS_EVERY_S = 10.0  # at most this long without a progress line while generating


def print_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Meter:
    """n/N examples with rate and ETA: a line whenever `PROGRESS_EVERY_S` passed since the last one, and at the end."""

    def __init__(self, what: str, total: int, log: Callable[[str], None] | None):
        self.what, self.total, self.log = what, total, log
        self.t0 = self.last = time.perf_counter()

    def advance(self, done: int) -> None:
        now = time.perf_counter()
        if self.log is None or now - self.last < PROGRESS_EVERY_S or done >= self.total:
            return
        rate = done / (now - self.t0)
        eta = (self.total - done) / rate if rate else 0.0
        self.log(f"{self.what} {done}/{self.total} examples | {rate:.1f} examples/s | eta {eta:.0f} s")
        self.last = now

    def finish(self, extra: str = "") -> None:
        if self.log is not None:
            dt = time.perf_counter() - self.t0
            self.log(
                f"{self.what} {self.total}/{self.total} examples in {dt:.1f} s "
                f"({self.total / dt if dt else 0.0:.1f} examples/s{extra})"
            )


@dataclass
class EvalResult:
    model: str
    adapter: str | None
    data: str
    kind: str
    examples: int
    metrics: dict[str, float]  # percentages, plus perplexity / bits_per_byte
    classification: dict | None = None  # ClassReport as a dict
    timing: dict[str, float] = field(default_factory=dict)
    predictions: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return Path(self.adapter).name if self.adapter else Path(self.model).name

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("predictions")
        return d


def check_metrics(names: Sequence[str] | None, kind: str, where: str) -> list[str]:
    if not names:
        return list(DEFAULT_METRICS[kind])
    out = []
    for n in names:
        if n not in M.ALL_METRICS:
            raise YunqueError(f"unknown metric {n!r} (known: {', '.join(M.ALL_METRICS)})")
        if n not in ALLOWED[kind]:
            raise YunqueError(
                f"metric {n!r} needs {'labels' if n == 'classification' else 'references'}, "
                f"but {where} holds {kind} examples"
            )
        out.append(n)
    return list(dict.fromkeys(out))


def prompt_text(tok, ex: Example, chat: bool | None) -> tuple[str, bool]:
    """The prompt as text, and whether it was rendered with the chat template (which writes BOS itself)."""
    from yunque.chat import apply_chat_template

    messages = ex.messages
    if messages is None and chat:
        messages = [{"role": "user", "content": ex.prompt}]
    if messages is None:
        return ex.prompt or "", False
    if tok.chat_template is None:
        raise YunqueError(f"{ex.source}: chat example but the tokenizer has no chat template")
    return apply_chat_template(tok, messages, add_generation_prompt=True, tools=ex.tools), True


def prompt_ids(tok, text: str, templated: bool) -> list[int]:
    ids = tok.encode(text)
    if not templated and tok.bos_id is not None:
        ids = [tok.bos_id] + ids  # raw prompts start a document, as in pretraining
    return ids


def generate_texts(
    model,
    tok,
    prompts: list[list[int]],
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[str], None] | None = None,
    between_batches: Callable[[], object] | None = None,
    continuations: list[list[int]] | None = None,
    scores: list | None = None,
) -> tuple[list[str], dict]:
    """Greedy completions, batched by similar prompt length; stop tokens are cut off. `progress`
    gets n/N lines with rate and ETA (see `_Meter`); `between_batches` runs before each batch.
    With `continuations`, each is scored in its prompt's prefill into `scores[i]` (a list as long
    as `prompts`) as a `ContinuationScore`."""
    from yunque.generate import Sampling, generate

    s = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tuple(tok.stop_ids))
    pad = tok.pad_id if tok.pad_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    new_tokens = 0
    t0 = time.perf_counter()
    stops = set(tok.stop_ids)
    meter = _Meter("generated", len(prompts), progress)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        if between_batches is not None:
            between_batches()
        got: list = []
        cont = [continuations[i] for i in idx] if continuations is not None else None
        outs = generate(model, [prompts[i] for i in idx], s, pad, score=cont, scores=got if cont else None)
        for i, x in zip(idx, got):
            scores[i] = x  # type: ignore[index]
        for i, ids in zip(idx, outs):
            new_tokens += len(ids)
            texts[i] = tok.decode([t for t in ids if t not in stops], skip_special_tokens=True)
        meter.advance(start + len(idx))
    dt = time.perf_counter() - t0
    meter.finish(f", {new_tokens / dt if dt else 0.0:.0f} tokens/s")
    return texts, {"generate_s": dt, "new_tokens": new_tokens, "tokens_per_s": new_tokens / dt if dt else 0.0}


def label_continuation(tok, prompt: str, label: str, templated: bool) -> tuple[list[int], list[int]]:
    """(context ids, label ids): the label follows the prompt after one space unless the prompt
    ends in whitespace; tokens are split where encoding prompt+label agrees with the prompt alone."""
    sep = "" if not prompt or prompt[-1].isspace() else " "
    ctx = prompt_ids(tok, prompt, templated)
    whole = prompt_ids(tok, prompt + sep + label, templated)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, tok.encode(sep + label)


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    metrics: Sequence[str] | None = None,
    adapter: str | Path | None = None,
    scoring: Literal["generate", "likelihood"] = "generate",
    labels: Sequence[str] | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    max_length: int | None = None,
    stride: int | None = None,
    limit: int | None = None,
    model_and_tokenizer=None,
    progress: Callable[[str], None] | None = print_stderr,
) -> EvalResult:
    """Evaluate one model on one data file (see the module docstrings of `data` and `metrics`).

    `labels` lists every class (default: the labels seen in the data); `chat` wraps raw prompts
    in the chat template (None: only chat/alpaca examples use it); `model_and_tokenizer` skips
    loading (for callers that already hold them); `progress` gets a line as each stage starts and
    n/N examples with rate and ETA while generating (None: silent)."""
    from yunque.evaluate.loading import load_for_eval
    from yunque.evaluate.perplexity import perplexity, score_continuations

    say = progress or (lambda line: None)
    examples = load_examples(data, limit)
    kind = examples[0].kind
    names = check_metrics(metrics, kind, str(data))
    if scoring == "likelihood" and "classification" not in names:
        raise YunqueError("--scoring likelihood applies to classification data (records with a 'label')")
    model, tok = model_and_tokenizer or load_for_eval(model_dir, adapter)
    # Fitted to the cores other processes leave free, re-checked between generation batches:
    # with more threads than free cores every OpenMP region waits a scheduler quantum.
    threads = ThreadPolicy() if next(model.parameters()).device.type == "cpu" else None
    if threads is not None:
        threads.start(window=0.2)
    try:
        result = EvalResult(str(model_dir), str(adapter) if adapter else None, str(data), kind, len(examples), {})
        max_length = max_length or min(model.config.max_position_embeddings, 2048)
        rendered = [prompt_text(tok, ex, chat) if ex.kind != "text" else ("", False) for ex in examples]
        preds: list[dict] = [{"source": ex.source} for ex in examples]

        needs_text = any(n in M.GENERATION_METRICS for n in names)
        needs_text |= "classification" in names and scoring == "generate"
        ids = [prompt_ids(tok, p, tpl) for p, tpl in rendered] if needs_text else []
        pairs, targets = [], []
        if "perplexity" in names and kind != "text":  # likelihood of the (first) reference given the prompt
            targets = [ex.references[0] if ex.references else ex.label or "" for ex in examples]
            pairs = [label_continuation(tok, p, t, tpl) for (p, tpl), t in zip(rendered, targets)]
        ref_bytes = sum(len(t.encode("utf-8")) for t in targets)
        # The usual case (the reference follows the prompt's own tokens, within the context): the
        # reference is scored in the generation's prefill, so each prompt runs through the model once.
        merged = (
            bool(pairs)
            and needs_text
            and all(c == i for (c, _), i in zip(pairs, ids))
            and max(map(len, ids)) + max(len(r) for _, r in pairs) <= max_length
        )

        if "perplexity" in names and not merged:
            t0 = time.perf_counter()
            say(f"perplexity of the {'texts' if kind == 'text' else 'references'} of {len(examples)} examples ...")
            if kind == "text":
                r = perplexity(model, tok, [ex.text or "" for ex in examples], max_length, stride, batch_size)
                nll, ntok, nbytes = r.nll, r.tokens, r.bytes
            else:  # the fine-tuning loss, per token
                scores = score_continuations(model, pairs, batch_size, max_length)
                nll, ntok, nbytes = -sum(s.logprob for s in scores), sum(s.tokens for s in scores), ref_bytes
            result.metrics["perplexity"] = math.exp(nll / ntok)
            result.metrics["bits_per_byte"] = nll / math.log(2) / max(nbytes, 1)
            result.timing["perplexity_s"] = time.perf_counter() - t0

        outputs: list[str] = []
        if needs_text:
            say(
                f"generating answers to {len(ids)} examples (greedy, up to {max_new_tokens} tokens)"
                + (", scoring the references in the same pass" if merged else "")
                + " ..."
            )
            scored: list = [None] * len(ids) if merged else []
            outputs, timing = generate_texts(
                model,
                tok,
                ids,
                max_new_tokens,
                batch_size,
                progress,
                threads.update if threads else None,
                continuations=[r for _, r in pairs] if merged else None,
                scores=scored if merged else None,
            )
            result.timing.update(timing)
            if merged:
                nll, ntok = -sum(x.logprob for x in scored), sum(x.tokens for x in scored)
                result.metrics["perplexity"] = math.exp(nll / ntok)
                result.metrics["bits_per_byte"] = nll / math.log(2) / max(ref_bytes, 1)
            for p, o in zip(preds, outputs):
                p["prediction"] = o

        if "classification" in names:
            label_set = sorted(set(labels or []) | {ex.label or "" for ex in examples})
            gold = [ex.label or "" for ex in examples]
            if scoring == "likelihood":
                t0 = time.perf_counter()
                say(f"likelihood of each of {len(label_set)} labels for {len(examples)} examples ...")
                pairs = [label_continuation(tok, p, lab, tpl) for p, tpl in rendered for lab in label_set]
                scores = score_continuations(model, pairs, batch_size, max_length)
                picked = []
                for i in range(len(examples)):
                    row = scores[i * len(label_set) : (i + 1) * len(label_set)]
                    best = max(range(len(label_set)), key=lambda j: row[j].logprob)
                    picked.append(label_set[best])
                    preds[i]["label_logprobs"] = {lab: s.logprob for lab, s in zip(label_set, row)}
                result.timing["likelihood_s"] = time.perf_counter() - t0
            else:
                picked = [M.parse_label(o, label_set) for o in outputs]
            report = M.classification_report(picked, gold, label_set)
            result.classification = asdict(report)
            result.metrics["accuracy"] = report.accuracy
            result.metrics["macro_f1"] = report.macro_f1
            for p, lab, g in zip(preds, picked, gold):
                p.update(predicted_label=lab, label=g)

        text_names = [n for n in names if n in M.GENERATION_METRICS]
        if text_names:
            refs = [ex.references or [ex.label or ""] for ex in examples]
            result.metrics.update(M.text_metrics(text_names, outputs, refs))
            for p, r in zip(preds, refs):
                p["references"] = r
        result.predictions = preds
        return result
    finally:
        if threads is not None:
            threads.close()
