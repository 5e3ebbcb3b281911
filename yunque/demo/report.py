"""The demo's results: report.md (tables + PNG plots), run.json (settings, versions, hashes), a printed summary."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

from yunque.demo import domain, scoring
from yunque.demo.result import DemoResult

_HASHED = (
    "corpus/corpus.txt",
    "corpus/corpus.sources.tsv",
    "domain/raw.jsonl",
    "data/manifest.json",
    "data/train.jsonl",
    "data/val.jsonl",
    "data/test.jsonl",
    "pretrain/pretrain.jsonl",
)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}%"


def accuracy_rows(ev: dict) -> list[tuple[str, str, str, str]]:
    """(row, chance, base, fine-tuned) for the summary and report tables."""
    b, t = ev["base"], ev["fine-tuned"]
    rows = [("task accuracy (all)", "", _pct(b["tasks"]["all"]["accuracy"]), _pct(t["tasks"]["all"]["accuracy"]))]
    for task in domain.TASKS:
        if task in t["tasks"]:
            n = t["tasks"][task]["n"]
            rows.append(
                (
                    f"  {task} (n={n})",
                    _pct(scoring.CHANCE[task]),
                    _pct(b["tasks"][task]["accuracy"]),
                    _pct(t["tasks"][task]["accuracy"]),
                )
            )
    rows.append(
        ("exact match (runner)", "", _pct(b["metrics"].get("exact_match")), _pct(t["metrics"].get("exact_match")))
    )
    rows.append(("ROUGE-L", "", f"{b['metrics'].get('rougeL', 0):.1f}", f"{t['metrics'].get('rougeL', 0):.1f}"))
    rows.append(
        (
            "answer perplexity",
            "",
            f"{b['metrics'].get('perplexity', float('nan')):.2f}",
            f"{t['metrics'].get('perplexity', float('nan')):.2f}",
        )
    )
    return rows


def _table(header: tuple[str, ...], rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).strip() for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _plot_accuracy(ev: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = ["all", *[t for t in domain.TASKS if t in ev["fine-tuned"]["tasks"]]]
    xs = range(len(tasks))
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=100)
    for off, name in ((-0.2, "base"), (0.2, "fine-tuned")):
        vals = [ev[name]["tasks"][t]["accuracy"] for t in tasks]
        bars = ax.bar([x + off for x in xs], vals, width=0.4, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(list(xs), tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left")
    ax.set_title("Base vs fine-tuned on the held-out test split")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _sha256(p: Path) -> str:
    from yunque.data.manifest import sha256_file

    return sha256_file(p)


def _run_json(result: DemoResult) -> Path:
    out = result.out_dir
    files = {rel: _sha256(out / rel) for rel in _HASHED if (out / rel).is_file()}
    for d in ("model", "pretrain/tokenizer", "finetune/adapter"):
        for p in sorted((out / d).glob("*")):
            if p.is_file():
                files[p.relative_to(out).as_posix()] = _sha256(p)
    return write_run_json(result, files)


def write_run_json(result: DemoResult, files: dict[str, str]) -> Path:
    """run.json: versions, environment, the run's facts and the SHA-256 of its outputs, written atomically."""
    from yunque import __version__
    from yunque.train.outputs import environment, git_commit

    run = {
        "yunque_version": __version__,
        "git_commit": git_commit(),
        **environment(),
        **result.facts,
        "files_sha256": files,
    }
    path = result.out_dir / "run.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _shown(path: str, cwd: str) -> str:
    """A path as a command word: relative when under `cwd` (".venv/bin/yunque" still has a slash, so the
    shell runs that file rather than searching PATH), else absolute; quoted when the shell needs it."""
    rel = os.path.relpath(path, cwd)
    return shlex.quote(path if rel.startswith("..") else rel if os.sep in rel else f".{os.sep}{rel}")


def cli_command(
    argv0: str | None = None, executable: str | None = None, cwd: str | None = None, which=shutil.which
) -> tuple[str, str | None]:
    """(how to run `yunque` the way this process was started, the venv's activate script or None).

    `bash install.sh` puts the `yunque` script in .venv/bin, which is not on PATH until the venv is
    activated, so a printed `yunque ...` would fail; the path of the running script (or of the
    script beside the running Python, for `python -m yunque`) does not. Paths are compared without
    resolving symlinks: a venv's python is a symlink to the system one but is not the same install."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    executable = sys.executable if executable is None else executable
    cwd = os.getcwd() if cwd is None else cwd
    if Path(argv0).name == "yunque":
        script: str | None = os.path.abspath(os.path.join(cwd, argv0))
    else:  # python -m yunque, or run_demo called from Python
        beside = Path(executable).parent / "yunque"
        script = str(beside) if beside.is_file() else None
    name, path = ("yunque", script) if script else ("python", executable)
    on_path = which(name)
    if on_path and os.path.abspath(on_path) == path:
        cli = name
    else:
        cli = _shown(path, cwd)
    cli = cli if script else f"{cli} -m yunque"
    activate = Path(path).parent / "activate"
    return cli, (
        _shown(str(activate), cwd) if cli not in ("yunque", "python -m yunque") and activate.is_file() else None
    )


def next_commands(out: Path, cli: str = "yunque") -> list[str]:
    """Commands to try on the result, each starting with `cli` (see `cli_command`).
    ($'...' is bash/zsh quoting, so that \\n is a newline.) `serve` requires an API key by default,
    so `keys create` comes first."""
    model, q = out / "model", lambda p: shlex.quote(str(p))
    prompt = (
        "From: Woodgrove Bank <security@woodgrovebank-verify.top>\\nSubject: Unusual sign-in activity\\n\\n"
        "Verify your identity within 24 hours: http://woodgrovebank-verify.top/login\\n\\nPhishing or legitimate?"
    )
    return [
        f"{cli} generate --model {q(model)} --chat --system {q(domain.SYSTEM['phishing'])} --prompt $'{prompt}' "
        "--max-new-tokens 8",
        f"{cli} chat --model {q(model)} --system {q(domain.SYSTEM['auth_triage'])}",
        f"{cli} eval --model {q(model)} --data {q(out / 'data' / 'test.jsonl')} --out {q(out / 'eval-again')}",
        f"{cli} data verify {q(out / 'data')}",
        f"{cli} keys create --name demo  # an API key, shown once: serve requires one",
        f"{cli} serve --model {q(model)}",
    ]


def next_steps_note(cli: str, activate: str | None) -> str:
    """The line above the commands: how `yunque` is run here and, from a venv, how to activate it."""
    if activate:
        return f"`yunque` is `{cli}` here; `source {activate}` puts `yunque` on PATH for this shell"
    return "" if cli == "yunque" else f"`yunque` is `{cli}` here"


def write_report(result: DemoResult, log=print) -> Path:
    out, f = result.out_dir, result.facts
    ev, plan = f["eval"], f["plan"]
    for src, dst in (("pretrain/run/loss.png", "pretrain_loss.png"), ("finetune/loss.png", "finetune_loss.png")):
        if (out / src).is_file():
            shutil.copyfile(out / src, out / dst)
    has_acc = _plot_accuracy(ev, out / "accuracy.png")
    cli, activate = cli_command()
    note, commands = next_steps_note(cli, activate), next_commands(out, cli)
    c, d, p = f["corpus"], f["domain"], f["prepare"]
    tuned_acc = ev["fine-tuned"]["tasks"]["all"]["accuracy"]
    bar = plan["accuracy_bar"]
    verdict = "meets" if tuned_acc >= bar else "does NOT meet"
    pt, ftn = f["pretrain"], f["finetune"]
    md = [
        f"# yunque demo: a security-domain LLM built from scratch, offline ({'quick' if f['quick'] else 'full'} run)",
        "",
        f"Seed {f['seed']}, {result.seconds:.0f} s end to end. The fine-tuned model reaches **{tuned_acc:.1f}%** task "
        f"accuracy on the held-out test split (base model: {ev['base']['tasks']['all']['accuracy']:.1f}%); "
        f"this {verdict} the {bar:.0f}% bar set for this run size.",
        "",
        "## Results: base vs fine-tuned (test split)",
        "",
        _table(("metric", "chance", "base", "fine-tuned"), accuracy_rows(ev)),
        "",
        "Task accuracy is an exact match of the whole answer (case and spacing aside). Chance is what a guesser "
        "that knows the labels gets without reading the input; the base model has never seen an answer, so it "
        "does not even produce the labels.",
        "",
        "The tasks (generated in code, `yunque/demo/domain.py`):",
        "",
        _table(("task", "input", "answer"), [(t, *domain.DESCRIPTION[t]) for t in domain.TASKS]),
        "",
    ]
    if has_acc:
        md += ["![accuracy](accuracy.png)", ""]
    md += ["Predictions, one per task (`eval/base.jsonl` and `eval/fine-tuned.jsonl` hold all of them):", ""]
    for ex in scoring.examples(out / "eval"):
        md += [
            f"- **{ex['task']}** reference `{ex['reference']}`; fine-tuned `{ex['prediction']}` "
            f"({'right' if ex['correct'] else 'wrong'}); base `{ex['base_prediction'][:60]}`"
        ]
    md += [
        "",
        "## What happened",
        "",
        _table(
            ("stage", "seconds", "what"),
            [
                (
                    "corpus",
                    f["stages"].get("corpus"),
                    f"{c['documents']:,} documents, {c['bytes'] / 1e6:.1f} MB from the "
                    f"Python {c['python']} standard library (no download), sha256 `{c['sha256'][:16]}`",
                ),
                (
                    "domain",
                    f["stages"].get("domain"),
                    f"{d['records']} generated records ({', '.join(f'{k} {v}' for k, v in d['per_task'].items())}); "
                    f"{d['with_pii']} carry planted PII/secrets; {d['exact_duplicates']} exact + {d['near_duplicates']} near duplicates planted",  # noqa: E501
                ),
                (
                    "prepare",
                    f["stages"].get("prepare"),
                    f"kept {p['records_kept']}/{p['records_in']}, dropped {p['dropped']}, "
                    f"splits {p['splits']}; manifest sha256 `{p['manifest_sha256'][:16]}`",
                ),
                (
                    "tokenizer",
                    f["stages"].get("tokenizer"),
                    f"byte-level BPE, {plan['vocab_size']} tokens, trained on the pretraining text",
                ),
                (
                    "pretrain",
                    f["stages"].get("pretrain"),
                    f"{pt['params'] / 1e6:.1f}M parameters from random init, {pt['steps']} steps, "
                    f"{pt['tokens']:,} tokens; val loss {pt['final'].get('val_loss', float('nan')):.3f}",
                ),
                (
                    "finetune",
                    f["stages"].get("finetune"),
                    f"LoRA r={plan['lora_r']} on all projections and lm_head, {ftn['steps']} steps; "
                    f"val loss {ftn['final'].get('val_loss', float('nan')):.3f}",
                ),
                ("merge", f["stages"].get("merge"), f"{f['merge']['modules']} LoRA modules folded into `model/`"),
                (
                    "evaluate",
                    f["stages"].get("evaluate"),
                    f"{ev['fine-tuned']['examples']} test examples, greedy decoding",
                ),
            ],
        ),
        "",
        "### PII and secrets scrubbed by `yunque data prepare`",
        "",
        _table(("type", "found"), sorted(p["pii_findings"].items())),
        "",
        "Sender addresses in the phishing e-mails are e-mail addresses too, so they are redacted as well; IP addresses "
        "are what the log and alert tasks reason about and are kept (`pii.modes: {IPV4: off}`). The data report with "
        "examples is `data/report.md`; `data/manifest.json` pins every record (verify with `yunque data verify`).",
        "",
        "## Loss curves",
        "",
        "![pretraining loss](pretrain_loss.png)",
        "",
        "![fine-tuning loss](finetune_loss.png)",
        "",
        "## Files",
        "",
        "- `model/`: the merged fine-tuned model (Hugging Face format, tokenizer included)",
        "- `pretrain/run/model/`: the base model; `finetune/adapter/`: the LoRA adapter (PEFT format)",
        "- `data/`: prepared splits, `report.md`, `manifest.json`; `domain/raw.jsonl`: the data before preparation",
        "- `corpus/`: the corpus with `corpus.sources.tsv` (the stdlib file and line of every document)",
        "- `run.json`: settings, versions and the SHA-256 of every input and output",
        "",
        "## Try it",
        "",
        *([note, ""] if note else []),
        "```",
        *commands,
        "```",
        "",
    ]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    run_path = _run_json(result)
    log("")
    width = max(len(r[0]) for r in accuracy_rows(ev))
    log(f"{'':{width}}  {'chance':>7}  {'base':>7}  {'fine-tuned':>10}")
    for name, chance, b, t in accuracy_rows(ev):
        log(f"{name:{width}}  {chance:>7}  {b:>7}  {t:>10}")
    log(
        f"\nfine-tuned task accuracy {tuned_acc:.1f}% {verdict} the {bar:.0f}% bar of this "
        f"{'quick' if f['quick'] else 'full'} run; {result.seconds:.0f} s end to end"
    )
    log(f"report: {out / 'report.md'}   hashes: {run_path}")
    log(f"next{f' ({note})' if note else ''}:\n  " + "\n  ".join(commands))
    return out / "report.md"
