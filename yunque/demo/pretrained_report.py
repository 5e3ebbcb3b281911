"""The pretrained demo's results: report.md (tables, plots, answers side by side), run.json (settings,
versions, hashes) and the printed summary."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from yunque.demo import domain, scoring
from yunque.demo.report import (
    _pct,
    _plot_accuracy,
    _sha256,
    _table,
    cli_command,
    next_commands,
    next_steps_note,
    write_run_json,
)
from yunque.demo.result import DemoResult

MODELS = ("base", "fine-tuned", "int8")
# Outputs whose SHA-256 run.json records: inputs and results, not the trainer's resumable checkpoints.
_HASHED_DIRS = ("domain", "data", "eval", "finetune/adapter", "model", "ship", "redteam", "privacy")
_HASHED_FILES = ("report.md", "accuracy.png", "finetune_loss.png", "finetune/run.json", "finetune/metrics.jsonl")


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _sci(x: float) -> str:
    """1.2e-3, not 1.2e-03."""
    m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def privacy_line(p: dict) -> str:
    """The one line of `--privacy` (report.md and the summary): ε spent, canary exposure, membership inference."""
    eps = "unbounded (no noise)" if p["epsilon"] is None else f"{p['epsilon']:.2f}"
    parts = [
        f"privacy: DP-SGD ε = {eps} (δ = {_sci(p['delta'])}, σ = {p['noise_multiplier']:.2f}, "
        f"{p['accountant'].upper()})"
    ]
    if p["exposure_mean"] is None:
        parts.append("no canary planted (no exposure measured)")
    else:
        parts.append(
            f"canary exposure {p['exposure_mean']:.1f} bits (base {p['exposure_base_mean']:.1f}; "
            f"{p['exposure_max_bits']:.0f} = memorised)"
        )
    lo, hi = p["mia_auc_ci95"]
    mia = f"membership-inference AUC {p['mia_auc']:.2f} [{lo:.2f}, {hi:.2f}]"
    if p.get("mia_auc_calibrated") is not None:
        mia += f" (base-calibrated {p['mia_auc_calibrated']:.2f})"
    return " · ".join([*parts, mia])


def bars_text(f: dict, em: str = "") -> str:
    """The verdict on the plan's bars, in words (verdicts wrapped in `em`); under DP-SGD the accuracy bars are
    reported, not enforced."""
    plan, fg, v = f["plan"], f["forgetting"], f["verdict"]
    bars = f"{plan['accuracy_bar']:.0f}% overall, {plan['task_bar']:.0f}% per task"
    forget = f"general-English perplexity up at most {fg['bar_pct']:.0f}%"
    if v.get("accuracy_enforced", True):
        return f"{bars}, {forget}: " + (f"{em}met{em}" if v["ok"] else f"{em}NOT met{em} ({_unmet(v)})")
    met = v["accuracy_ok"] and not v["tasks_below_bar"]
    acc = f"{em}met{em}" if met else f"{em}not met{em} ({_unmet({**v, 'forgetting_ok': True})})"
    return f"accuracy {bars}: {acc}, reported but not enforced under DP-SGD; {forget}: " + (
        f"{em}met{em}" if v["forgetting_ok"] else f"{em}NOT met{em}"
    )


def result_rows(ev: dict, general: dict) -> list[tuple[str, ...]]:
    """(metric, chance, base, fine-tuned, int8) for the summary and report tables."""
    names = [n for n in MODELS if n in ev]

    def acc(task: str) -> list[str]:
        return [_pct(ev[n]["tasks"].get(task, {}).get("accuracy")) for n in names]

    def metric(key: str, fmt: str) -> list[str]:
        return [_num(ev[n]["metrics"].get(key), fmt) for n in names]

    rows = [("task accuracy (all)", "", *acc("all"))]
    for task in domain.TASKS:
        if task in ev["fine-tuned"]["tasks"]:
            rows.append(
                (f"  {task} (n={ev['fine-tuned']['tasks'][task]['n']})", _pct(scoring.CHANCE[task]), *acc(task))
            )
    rows += [
        ("exact match (runner)", "", *metric("exact_match", "{:.1f}%")),
        ("ROUGE-L", "", *metric("rougeL", "{:.1f}")),
        ("answer perplexity", "", *metric("perplexity", "{:.2f}")),
        (
            "general-English perplexity",
            "",
            *[_num(general[n]["perplexity"]) if n in general else "–" for n in names],
        ),
    ]
    return rows


def _rate_cell(c: dict, key: str) -> str:
    k = c["refusals"] if key == "over_refusal" else c["successes"]
    return f"{_pct(None if c[key] is None else 100 * c[key])} ({k}/{c['attempts']})"


def redteam_rows(rt: dict) -> list[tuple[str, ...]]:
    """(category, kind, what is measured, base, fine-tuned): ASR, or over-refusal for benign requests."""
    rows = []
    for name, c in rt["base"]["categories"].items():
        t = rt["fine-tuned"]["categories"][name]
        key, what = ("over_refusal", "over-refusal") if c["kind"] == "benign" else ("asr", "attack success")

        rows.append((c["title"], c["kind"], what, _rate_cell(c, key), _rate_cell(t, key)))
    rows.append(
        (
            "all attacks",
            "",
            "attack success",
            *[
                f"{_pct(None if rt[n]['overall']['asr'] is None else 100 * rt[n]['overall']['asr'])} "
                f"({rt[n]['overall']['successes']}/{rt[n]['overall']['attack_attempts']})"
                for n in ("base", "fine-tuned")
            ],
        )
    )
    return rows


def _cell(text: str, n: int = 70) -> str:
    """A table cell: one line, no pipes, at most `n` characters."""
    one = " ".join(str(text).split()).replace("|", "\\|")
    return (one[: n - 1] + "…" if len(one) > n else one) or "(empty)"


def side_by_side(out: Path, test: list[dict], per_task: int = 2) -> list[tuple[str, ...]]:
    """(task, input, reference, base, fine-tuned): the first answers of each task, right and wrong alike.
    `test` is what was evaluated, in the order of eval/<name>.jsonl."""
    read = lambda name: [json.loads(x) for x in (out / "eval" / f"{name}.jsonl").read_text("utf-8").splitlines()]  # noqa: E731
    rows, seen = [], {}
    for rec, b, t in zip(test, read("base"), read("fine-tuned"), strict=True):
        if seen.get(t["task"], 0) >= per_task:
            continue
        seen[t["task"]] = seen.get(t["task"], 0) + 1
        user = next((m["content"] for m in rec["messages"] if m["role"] == "user"), "")
        right = "right" if t["correct"] else "wrong"
        rows.append(
            (
                t["task"],
                _cell(user, 60),
                t["reference"],
                _cell(b["prediction"]),
                f"{_cell(t['prediction'], 40)} ({right})",
            )
        )
    return rows


def _hash_outputs(out: Path) -> dict[str, str]:
    files = {}
    for d in _HASHED_DIRS:
        for p in sorted((out / d).rglob("*")):
            if p.is_file() and not p.is_symlink():
                files[p.relative_to(out).as_posix()] = _sha256(p)
    for rel in _HASHED_FILES:
        if (out / rel).is_file():
            files[rel] = _sha256(out / rel)
    return files


def ship_commands(out: Path, cli: str, ship: dict) -> list[str]:
    """How to run each shipped artefact."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    cmds = [f"{cli} serve --model {q(ship['int8']['dir'])}  # the int8 model (after keys create)"]
    g = ship.get("gguf") or {}
    if g.get("file"):
        cmds += [
            f"llama-cli -m {q(g['file'])} -cnv  # llama.cpp",
            f"printf 'FROM {g['file']}\\n' > Modelfile && ollama create yunque-demo -f Modelfile && "
            "ollama run yunque-demo  # Ollama",
        ]
    return cmds


def _md(result: DemoResult, test: list[dict], cli: str, note: str, commands: list[str]) -> str:
    out, f = result.out_dir, result.facts
    ev, plan = f["eval"], f["plan"]
    tuned = ev["fine-tuned"]["tasks"]["all"]["accuracy"]
    fg, m, d, p, ftn = f["forgetting"], f["model"], f["domain"], f["prepare"], f["finetune"]
    i8, gguf = f["ship"]["int8"], f["ship"]["gguf"]
    priv = f.get("privacy")
    lines = [
        f"# yunque demo: {m['name']} fine-tuned into a security triage assistant "
        f"({'quick' if f['quick'] else 'full'} run{', DP-SGD' if priv else ''})",
        "",
        f"Seed {f['seed']}, {result.seconds:.0f} s end to end on {f['torch_threads']} threads "
        f"(CPU capability {f['cpu']['capability']}). The fine-tuned model reaches **{tuned:.1f}%** task accuracy on "
        f"the held-out test split (base model: {ev['base']['tasks']['all']['accuracy']:.1f}%); general-English "
        f"perplexity changed by {fg['rise_pct']:+.1f}%. Bars of this run: {bars_text(f, '**')}.",
        "",
        *([f"{privacy_line(priv)} (`{priv['audit']}`)", ""] if priv else []),
        "## Results on the held-out test split",
        "",
        _table(("metric", "chance", "base", "fine-tuned", "int8"), result_rows(ev, f["general"])),
        "",
        "Every model gets the same chat template, system prompts and answer budget "
        f"({plan['max_new_tokens']} tokens); task accuracy counts the first of the task's labels the answer names "
        '(a sentence that says "brute-force" first counts as brute-force). Chance is what a guesser that knows the '
        "labels gets without reading the input. Answer perplexity is the likelihood of the reference answer; "
        "general-English perplexity is measured on paragraphs unrelated to the tasks "
        "(`yunque/demo/general_english.jsonl`), the forgetting check.",
        "",
        _table(("task", "input", "answer"), [(t, *domain.DESCRIPTION[t]) for t in domain.TASKS]),
        "",
    ]
    if (out / "accuracy.png").is_file():
        lines += ["![accuracy](accuracy.png)", ""]
    lines += [
        "### Answers side by side",
        "",
        _table(("task", "input (start)", "reference", "base", "fine-tuned"), side_by_side(out, test)),
        "",
        "All answers: `eval/base.jsonl`, `eval/fine-tuned.jsonl`, `eval/int8.jsonl`.",
        "",
        "## Red team: base vs fine-tuned",
        "",
        _table(("category", "kind", "rate", "base", "fine-tuned"), redteam_rows(f["redteam"])),
        "",
        f"The built-in probe suite, reduced to {f['redteam']['variants']} prompt variant(s) per probe, each sent once "
        f"with greedy decoding and a {f['redteam']['max_tokens']}-token reply limit; "
        f"{', '.join(f['redteam']['skipped'])} is left out (it counts replies that reach the token limit, which a "
        "short limit makes of nearly every reply). Details: `redteam/*/redteam.md`; the full suite: "
        f"`{cli} redteam --model {out / 'model'} --out {out / 'redteam-full'}`.",
        "",
        "## Fine-tuning",
        "",
        f"LoRA r={f['lora']['r']}, alpha={f['lora']['alpha']:.0f}, dropout {f['lora']['dropout']} on "
        f"{', '.join(f['lora']['target_modules'])} of all layers; lr {plan['lr']:g}, cosine with "
        f"{plan['warmup_steps']} warmup steps; {ftn['steps']} of up to {plan['steps']} steps of "
        + (
            f"a Poisson sample of the {priv['records']} training records (rate {priv['sample_rate']:.3g}, "
            f"{priv['expected_batch_size']} expected, one record per row), each record's gradient clipped to "
            f"{priv['max_grad_norm']:g} and Gaussian noise σ = {priv['noise_multiplier']:.3g} added "
            if priv
            else f"{plan['micro_batch']} packed rows of {plan['seq_len']} tokens "
        )
        + f"({ftn['tokens']:,} tokens, {ftn['tokens_per_s']:.0f} tokens/s); "
        + (
            f"stopped early at step {ftn['steps']}, exporting step {ftn['exported_step']}"
            if ftn["stopped_early"]
            else f"exported step {ftn['exported_step']}"
        )
        + f"; best validation loss {(ftn['best'] or {}).get('val_loss', float('nan')):.4f}.",
        "",
        "![fine-tuning loss](finetune_loss.png)",
        "",
        "## What happened",
        "",
        _table(
            ("stage", "seconds", "what"),
            [
                (
                    "model",
                    f["stages"].get("model"),
                    f"{m['name']} ({m['parameters'] / 1e6:.0f}M parameters, {m['licence']}) from {m['package']}, "
                    f"source sha256 `{m['source_sha256'][:16]}`",
                ),
                (
                    "data",
                    f["stages"].get("data"),
                    f"{d['records']} generated records; {d['with_pii']} with planted PII/secrets, "
                    f"{d['exact_duplicates']} exact + {d['near_duplicates']} near duplicates; kept "
                    f"{p['records_kept']}, dropped {p['dropped']}, splits {p['splits']}; manifest sha256 "
                    f"`{p['manifest_sha256'][:16]}`",
                ),
                ("base", f["stages"].get("base"), "test split, general-English perplexity, red team"),
                ("finetune", f["stages"].get("finetune"), f"{ftn['steps']} {'DP-SGD ' if priv else ''}LoRA steps"),
                *(
                    [
                        (
                            "audit",
                            f["stages"].get("audit"),
                            f"{priv['canaries']} canaries ranked among {priv['candidates']} secrets each; "
                            f"{priv['members']} training vs {priv['nonmembers']} held-out records; `privacy/`",
                        )
                    ]
                    if priv
                    else []
                ),
                ("merge", f["stages"].get("merge"), f"{f['merge']['modules']} LoRA modules folded into `model/`"),
                ("tuned", f["stages"].get("tuned"), "the same for the merged model"),
                (
                    "ship",
                    f["stages"].get("ship"),
                    f"int8 weights in `ship/int8/` ({i8['bytes'] / 1e6:.0f} MB, {i8['bits_per_weight']:.2f} "
                    f"bits per weight) and its test accuracy; GGUF: "
                    + (f"`{gguf['file']}`" if gguf.get("file") else gguf.get("skipped", "–")),
                ),
            ],
        ),
        "",
        "### PII and secrets scrubbed by `yunque data prepare`",
        "",
        _table(("type", "found"), sorted(p["pii_findings"].items())),
        "",
        "IP addresses are what the log and alert tasks reason about and are kept (`pii.modes: {IPV4: off}`). "
        "`data/report.md` has the data report; `data/manifest.json` pins every record (`yunque data verify`).",
        "",
        "## Files",
        "",
        "- `model/`: the merged fine-tuned model (Hugging Face format, tokenizer included)",
        "- `finetune/adapter/`: the LoRA adapter (PEFT format); `ship/int8/`: int8 weights",
        "- `data/`: prepared splits, `report.md`, `manifest.json`; `domain/raw.jsonl`: the data before preparation",
        "- `eval/`, `redteam/`: every answer and probe reply",
        *(
            [
                "- `privacy/`: the privacy audit (`audit.md`, `audit.json`, `audit.png`); `data/canaries.json`: the "
                "planted canaries"
            ]
            if priv
            else []
        ),
        "- `run.json`: settings, versions, the source model's SHA-256, the data manifest's roots and the SHA-256 "
        "of every output",
        "",
        "## Try it",
        "",
        *([note, ""] if note else []),
        "```",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def _unmet(v: dict) -> str:
    why = [] if v["accuracy_ok"] else ["overall accuracy"]
    why += [f"{t} accuracy" for t in v["tasks_below_bar"]]
    why += [] if v["forgetting_ok"] else ["forgetting"]
    return ", ".join(why)


def write_pretrained_report(result: DemoResult, log=print) -> Path:
    out, f = result.out_dir, result.facts
    if (out / "finetune" / "loss.png").is_file():
        shutil.copyfile(out / "finetune" / "loss.png", out / "finetune_loss.png")
    _plot_accuracy(f["eval"], out / "accuracy.png")
    cli, activate = cli_command()
    note = next_steps_note(cli, activate)
    commands = next_commands(out, cli) + ship_commands(out, cli, f["ship"])
    test = [json.loads(line) for line in (out / "eval" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    (out / "report.md").write_text(_md(result, test, cli, note, commands), encoding="utf-8")
    run_path = write_run_json(result, _hash_outputs(result.out_dir))

    rows = result_rows(f["eval"], f["general"])
    width = max(len(r[0]) for r in rows)
    log("")
    log(f"{'':{width}}  {'chance':>7}  {'base':>8}  {'fine-tuned':>10}  {'int8':>7}")
    for name, chance, *vals in rows:
        log(f"{name:{width}}  {chance:>7}  " + "  ".join(f"{x:>{w}}" for x, w in zip(vals, (8, 10, 7))))
    fg, v, plan = f["forgetting"], f["verdict"], f["plan"]
    rt = f["redteam"]
    log(
        f"\nforgetting check: general-English perplexity {fg['rise_pct']:+.1f}% (bar +{fg['bar_pct']:.0f}%); "
        f"red team attack success {_pct(100 * (rt['base']['overall']['asr'] or 0))} base, "
        f"{_pct(100 * (rt['fine-tuned']['overall']['asr'] or 0))} fine-tuned"
    )
    tuned = f["eval"]["fine-tuned"]["tasks"]["all"]["accuracy"]
    if f.get("privacy"):
        log(privacy_line(f["privacy"]))
        log(f"fine-tuned task accuracy {tuned:.1f}%; bars: {bars_text(f)}; {result.seconds:.0f} s end to end")
    else:
        log(
            f"fine-tuned task accuracy {tuned:.1f}% "
            + ("meets" if v["ok"] else "does NOT meet")
            + f" the bars of this {'quick' if f['quick'] else 'full'} run ({plan['accuracy_bar']:.0f}% overall, "
            f"{plan['task_bar']:.0f}% per task, forgetting <= {fg['bar_pct']:.0f}%)"
            + ("" if v["ok"] else f": {_unmet(v)}")
            + f"; {result.seconds:.0f} s end to end"
        )
    log(f"report: {out / 'report.md'}   hashes: {run_path}")
    log(f"next{f' ({note})' if note else ''}:\n  " + "\n  ".join(commands))
    return out / "report.md"
