"""Malformed-file fuzzing of every reader through the real CLI (`yunque.__main__.main`), in-process.

Run as a script in a child process (tests/test_fuzz_inputs.py does, under an address-space limit):

    python tests/helpers/fuzzing.py --cases 200 --seed 0 --out results.jsonl

It builds pristine inputs once (a tokenizer with a chat template, a model directory, a sharded
copy, a LoRA adapter, raw data in every format, a prepared data directory, train and data YAML
configs), then for each case copies the pristine artifact, mutates one file (seeded: truncation,
byte flips, insertions, invalid UTF-8, deep nesting, JSON/YAML values of the wrong type or
range, safetensors header edits, hostile chat templates) and runs the command that reads it.
A case passes when the command exits 0, or exits 2 with exactly one line `error: ...` on
stderr, within the time limit and without an exception escaping `main`.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASE_SECONDS = 20
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
HOSTILE_TEMPLATES = [
    "{{ 'x' * 10**9 }}",
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "",
    "{{ raise_exception('no') }}",
    "{% for %}",
    "{{ messages[99] }}",
    "{{ ''.__class__.__mro__ }}",
    "{% set a = [1] * 4000 %}{% set b = [a] * 4000 %}{{ b }}",
    "{{ '%*s' % (10**9, 'x') }}",
    "{{ messages | tojson(indent=10**9) }}",
    "{{ (messages * 10**8) | length }}",
]


# ---------------------------------------------------------------- pristine inputs


def build_pristine(root: Path) -> dict[str, Path]:
    import torch

    from yunque.data.config import DataConfig
    from yunque.data.pipeline import prepare
    from yunque.formats.hf import load_model, save_model
    from yunque.formats.peft import save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora
    from yunque.model import ModelConfig, Transformer
    from yunque.tokenizer import train_bpe

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = "the cat sat on a mat and a dog ran to the park where birds sang in old green trees".split()
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)) + "\n")
    tok_dir = root / "tok"
    train_bpe([corpus], 300, tok_dir)
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    conf["chat_template"] = TEMPLATE
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(conf))
    vocab = json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"]
    n_vocab = max(len(vocab) + 16, 320)

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=n_vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model_dir = root / "model"
    save_model(Transformer(cfg), model_dir)
    for f in tok_dir.iterdir():
        shutil.copy(f, model_dir / f.name)
    sharded = root / "sharded"
    save_model(load_model(model_dir), sharded, max_shard_bytes=20_000)
    for f in tok_dir.iterdir():
        shutil.copy(f, sharded / f.name)
    m = load_model(model_dir)
    lcfg = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    apply_lora(m, lcfg)
    save_peft_adapter(m, root / "adapter", lcfg, str(model_dir))

    raw = root / "raw"
    raw.mkdir()
    texts = [{"text": " ".join(rng.choice(words) for _ in range(15)) + f" {i}"} for i in range(40)]
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"q {i} " + rng.choice(words)},
                {"role": "assistant", "content": f"a {i} " + rng.choice(words)},
            ]
        }
        for i in range(30)
    ]
    (raw / "text.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    (raw / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (raw / "arr.json").write_text(json.dumps(texts, indent=1))
    (raw / "rows.csv").write_text("text,label\n" + "".join(f'"{t["text"]}",l{i % 3}\n' for i, t in enumerate(texts)))
    (raw / "rows.tsv").write_text("text\tlabel\n" + "".join(f"{t['text']}\tl{i % 3}\n" for i, t in enumerate(texts)))
    (raw / "doc.txt").write_text("\n\n".join(t["text"] for t in texts))
    with gzip.open(raw / "text.jsonl.gz", "wt") as gz:
        gz.write("".join(json.dumps(t) + "\n" for t in texts))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [t["text"] for t in texts]}), raw / "rows.parquet")
    with open(raw / "rows.parquet", "rb") as src, gzip.open(raw / "rows.parquet.gz", "wb") as gz:
        gz.write(src.read())

    prepare([raw / "chat.jsonl"], root / "prepared", DataConfig(tokenizer=tok_dir, workers=1), log=lambda *_: None)
    (root / "train.yaml").write_text(
        "method: pretrain\n"
        f"out_dir: {root / 'run'}\n"
        f"tokenizer: {tok_dir}\n"
        "seed: 1\n"
        "model:\n  preset: tiny\n  overrides: {hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1,"
        " num_attention_heads: 2, num_key_value_heads: 1}\n"
        f"data:\n  train: [{corpus}]\n  val_fraction: 0.1\n  seq_len: 32\n"
        "micro_batch: 2\nmax_steps: 1\noptim: {lr: 1.0e-3, warmup_steps: 0}\n"
        "eval: {every: 0}\ncheckpoint: {every: 0}\nlog: {plot: false}\n"
    )
    (root / "data.yaml").write_text(
        "workers: 1\nread: {format: auto, on_error: skip}\nclean: {min_chars: 1}\n"
        "dedup: {exact: true, near: off}\nsplit: {train: 0.8, val: 0.1, test: 0.1, seed: 3}\npii: {enabled: true}\n"
    )
    return {
        "root": root,
        "tok": tok_dir,
        "model": model_dir,
        "sharded": sharded,
        "adapter": root / "adapter",
        "raw": raw,
        "prepared": root / "prepared",
        "corpus": corpus,
    }


# ---------------------------------------------------------------- mutators


def _deep(rng: random.Random) -> bytes:
    n = rng.choice([2_000, 50_000, 300_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    return (opener * n + "1" + closer * n).encode()


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "flip", "insert", "delete", "dup", "utf8", "nul", "empty", "deep", "tail"])
    n = len(data)
    i = rng.randrange(n + 1) if n else 0
    if kind == "truncate":
        return data[:i]
    if kind == "flip" and n:
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(n)] = rng.randrange(256)
        return bytes(b)
    if kind == "insert":
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))) + data[i:]
    if kind == "delete":
        return data[:i] + data[i + rng.randint(1, 200) :]
    if kind == "dup":
        j = min(n, i + rng.randint(1, 4000))
        return data[:j] + data[i:j] * rng.randint(2, 50) + data[j:]
    if kind == "utf8":
        return data[:i] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80\x80"]) + data[i:]
    if kind == "nul":
        return data[:i] + b"\x00" * rng.randint(1, 9) + data[i:]
    if kind == "empty":
        return b""
    if kind == "deep":
        return data[:i] + _deep(rng) + data[i:]
    return data + rng.choice([b"\n{", b"\n[" * 3, b"garbage", b"\n\xff\xfe"])


WEIRD: list[Any] = [
    None,
    -1,
    0,
    1,
    2.5,
    1e9,
    1e300,
    10**30,
    "x",
    "",
    "1e-3",
    [],
    {},
    True,
    False,
    [1, "a"],
    {"a": None},
    -(2**63),
    2**64,
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"),
]


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in list(obj.items())[:200]:
            out += _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in list(enumerate(obj))[:20]:
            out += _paths(v, prefix + (i,))
    return out


def mutate_json_value(obj: Any, rng: random.Random) -> str:
    """The JSON text of `obj` with one value replaced, one key removed, or a key duplicated."""
    paths = [p for p in _paths(obj) if p]
    if not paths:
        return json.dumps(rng.choice(WEIRD))
    path = rng.choice(paths)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    kind = rng.choice(["value", "value", "value", "drop", "dupkey", "hugeint", "inf"])
    if kind == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif kind == "dupkey" and isinstance(parent, dict):
        text = json.dumps(obj)
        key = json.dumps(str(path[-1]))
        return text.replace(key + ":", key + ": " + json.dumps(rng.choice(WEIRD)) + ", " + key + ":", 1)
    elif kind == "hugeint":
        parent[path[-1]] = "@@HUGE@@"
        return json.dumps(obj).replace('"@@HUGE@@"', "1" + "0" * rng.choice([40, 400, 5000]))
    elif kind == "inf":
        parent[path[-1]] = "@@INF@@"
        return json.dumps(obj).replace('"@@INF@@"', rng.choice(["1e400", "-1e400", "NaN", "Infinity"]))
    else:
        parent[path[-1]] = rng.choice(WEIRD)
    return json.dumps(obj)


def mutate_json_file(p: Path, rng: random.Random, rel: str = "") -> None:
    if rng.random() < 0.45 and mutate_hostile(p, rel, rng):
        return
    if rng.random() < 0.5:
        try:
            obj = json.loads(p.read_text())
        except ValueError:
            obj = None
        if obj is not None:
            p.write_text(mutate_json_value(obj, rng))
            return
    p.write_bytes(mutate_bytes(p.read_bytes(), rng))


def mutate_jsonl_file(p: Path, rng: random.Random) -> None:
    lines = p.read_bytes().split(b"\n")
    if rng.random() < 0.3 and lines:
        i = rng.randrange(len(lines))
        lines[i] = rng.choice(
            [
                b"[" * 100_000 + b"]" * 100_000,
                b'{"text": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
                b'{"text": "caf\xe9"}',
                b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                b'{"text": 1' + b"0" * 5000 + b"}",
                b'{"messages": [{"role": "user", "content": {"x": 1}}]}',
                b'{"text": "a", "text": "b"}',
                b"\x00" * 10,
                b'{"text": "\\ud800"}',
            ]
        )
        p.write_bytes(b"\n".join(lines))
    elif rng.random() < 0.5 and lines:
        i = rng.randrange(len(lines))
        try:
            lines[i] = mutate_json_value(json.loads(lines[i]), rng).encode()
        except ValueError:
            lines[i] = mutate_bytes(lines[i], rng)
        p.write_bytes(b"\n".join(lines))
    else:
        p.write_bytes(mutate_bytes(p.read_bytes(), rng))


def mutate_yaml_file(p: Path, rng: random.Random) -> None:
    import yaml

    r = rng.random()
    if r < 0.2 and "method:" in p.read_text():  # model shapes that must be refused before allocation
        bad = rng.choice(
            [
                {"num_hidden_layers": 1_000_000},
                {"hidden_size": 1e9},
                {"num_attention_heads": 0},
                {"intermediate_size": 10**10},
                {"num_key_value_heads": 3},
                {"head_dim": 5},
                {"vocab_size": "x"},
            ]
        )
        obj = yaml.safe_load(p.read_text())
        obj["model"]["overrides"].update(bad)
        p.write_text(yaml.safe_dump(obj))
    elif r < 0.35:
        extra = rng.choice(
            [
                "x: !!python/object/apply:os.system ['true']\n",
                "seed: !custom 3\n",
                "a0: &a [x, x, x, x, x, x, x, x, x, x]\n"
                + "".join(
                    f"a{i}: &a{i} [" + ", ".join(["*a" if i == 1 else f"*a{i - 1}"] * 10) + "]\n" for i in range(1, 10)
                ),
                "seed: 1\nseed: 2\n",
                "data: " + "[" * 5000 + "]" * 5000 + "\n",
                "optim: {lr: 1e400}\n",
            ]
        )
        p.write_text(p.read_text() + extra)
    elif r < 0.7:
        obj = yaml.safe_load(p.read_text())
        try:
            p.write_text(yaml.safe_dump(json.loads(mutate_json_value(obj, rng))))
        except ValueError:  # an integer too long for Python to read back: write it as text instead
            p.write_text(p.read_text() + f"seed: {'9' * 5000}\n")
    else:
        p.write_bytes(mutate_bytes(p.read_bytes(), rng))


def mutate_safetensors(p: Path, rng: random.Random) -> None:
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n], raw[8 + n :]
    r = rng.random()
    if r < 0.5:
        obj = json.loads(header)
        name = rng.choice([k for k in obj if k != "__metadata__"])
        kind = rng.choice(["shape", "offsets", "dtype", "dup", "overlap", "drop", "field", "meta"])
        e = obj[name]
        if kind == "shape":
            e["shape"] = rng.choice([[2.5], ["3"], [-1, -4], [10**12], [], [0], e["shape"][::-1], [True]])
        elif kind == "offsets":
            e["data_offsets"] = rng.choice(
                [["0", "8"], [e["data_offsets"][1], e["data_offsets"][0]], [0], [-8, 0], [0, 10**15], [1.5, 9.5]]
            )
        elif kind == "dtype":
            e["dtype"] = rng.choice(["F33", "", None, 3, ["F32"], "U64", "F8_E4M3"])
        elif kind == "overlap":
            other = rng.choice([k for k in obj if k != "__metadata__"])
            e["data_offsets"] = list(obj[other]["data_offsets"])
        elif kind == "drop":
            del obj[name]
        elif kind == "field":
            del e[rng.choice(["dtype", "shape", "data_offsets"])]
        elif kind == "meta":
            obj["__metadata__"] = rng.choice([{"format": 1}, [1], "pt", {"yunque.lora": "[" * 5000}])
        text = json.dumps(obj)
        if kind == "dup":
            text = text.replace(
                json.dumps(name) + ":", json.dumps(name) + ": " + json.dumps(e) + ", " + json.dumps(name) + ":", 1
            )
        hb = text.encode()
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    elif r < 0.7:
        hb = mutate_bytes(header, rng)
        p.write_bytes(struct.pack("<Q", len(hb)) + hb + data)
    elif r < 0.8:
        p.write_bytes(struct.pack("<Q", rng.choice([0, 2, n + 1, 2**63, 2**64 - 1])) + raw[8:])
    else:
        p.write_bytes(mutate_bytes(raw, rng))


def mutate_template(p: Path, rng: random.Random) -> None:
    if rng.random() < 0.6:
        p.write_text(rng.choice(HOSTILE_TEMPLATES))
    else:
        p.write_bytes(mutate_bytes(TEMPLATE.encode(), rng))


# Hand-picked hostile edits per file (key path -> candidate values), tried as often as random ones:
# the shapes of input that broke readers before (issue 24), so every run exercises them.
HOSTILE: dict[str, list[tuple[tuple, list[Any]]]] = {
    "config.json": [
        (("num_hidden_layers",), [1_000_000, 10**9, 0, -1, 2.5, "4", 1e400]),
        (("hidden_size",), [1e9, 0, "64", 10**12, 33, None]),
        (("num_attention_heads",), [0, 3, 10**6, -4]),
        (("num_key_value_heads",), [0, 3, "2"]),
        (("head_dim",), [0, 5, 10**9, "8"]),
        (("vocab_size",), [10**10, 0, 2**63]),
        (("intermediate_size",), [10**10, 0.5]),
        (
            ("rope_scaling",),
            [
                {
                    "rope_type": "llama3",
                    "factor": 8,
                    "low_freq_factor": 1,
                    "high_freq_factor": 1,
                    "original_max_position_embeddings": 8,
                },
                "linear",
                [1],
                {"rope_type": ["x"]},
                {"rope_type": "linear", "factor": 0},
            ],
        ),
        (("rope_theta",), [0, -1, "x", [1]]),
        (("architectures",), [[], "LlamaForCausalLM", [1], ["GPT2LMHeadModel"], None]),
        (("torch_dtype",), [3, "int8", ["float32"]]),
        (("tie_word_embeddings",), ["yes", 2]),
        (("max_position_embeddings",), [0, 1e300]),
        (("rms_norm_eps",), [0, "tiny", -1]),
        ((), [[], "x", 3, None]),
    ],
    "model.safetensors.index.json": [
        (("weight_map", "*"), ["../model.safetensors", "/etc/passwd", "", 3, "sub/../../x", "/dev/zero", None]),
        (("weight_map",), [[], "x", None, {}]),
        ((), [[], "x"]),
    ],
    "adapter_config.json": [
        (("r",), [1e400, 0, -2, 2.5, "2", 10**9]),
        (("lora_alpha",), ["x", None, 1e400]),
        (("target_modules",), [3, [1], "*"]),
        (("peft_type",), [["LORA"], None, "IA3"]),
        (("use_dora",), [True]),
        ((), [[], "x"]),
    ],
    "tokenizer_config.json": [
        (
            ("chat_template",),
            [
                3,
                [{"name": 1}],
                [{"name": "../x", "template": "y"}],
                "{{ 'x' * 10**9 }}",
                "{% if false %}{% endif %}",
                "{% for %}",
            ],
        ),
        (("bos_token",), [{"content": 3}, [1], 7]),
        (("eos_token",), [{"content": None}, 3.5]),
        ((), [[], "x"]),
    ],
    "generation_config.json": [(("eos_token_id",), [-1, 10**12, "2", [1, "x"], 2.5]), ((), [[], "x"])],
    "special_tokens_map.json": [(("bos_token",), [3, {"content": []}]), ((), [[], "x"])],
    "manifest.json": [
        (("splits", "val"), [None, "x", {}]),
        (("splits", "train", "file"), ["../x", "/etc/passwd", "val.jsonl", 3]),
        (("splits", "train", "records"), ["12", -1, 10**12]),
        (("files",), [[], None, {}]),
        (
            ("inputs",),
            [{"path": 1}, [{"path": "/dev/zero", "sha256": "0"}], [{"path": "/proc/self/mem", "sha256": "0"}]],
        ),
        (("format",), ["yunque-data/9", None]),
        ((), [[], "x"]),
    ],
    "tokens/meta.json": [
        (("dtype",), ["object", "V1000000", "float64", "<U5", None, 3]),
        (("splits", "train", "tokens"), [-1, 10**12, "5", 2.5]),
        (("splits", "train", "documents"), [-1, 10**12, None]),
        (("splits",), [[], None]),
        ((), [[], "x"]),
    ],
}


def mutate_hostile(p: Path, rel: str, rng: random.Random) -> bool:
    """One hand-picked hostile edit of a JSON file, if there are any for it; False otherwise."""
    table = HOSTILE.get(rel)
    if not table:
        return False
    try:
        obj = json.loads(p.read_text())
    except ValueError:
        return False
    path, values = rng.choice(table)
    value = rng.choice(values)
    if not path:
        obj = value
    else:
        parent = obj
        for k in path[:-1]:
            parent = parent.setdefault(k, {}) if isinstance(parent, dict) else parent
        last = path[-1]
        if last == "*" and isinstance(parent, dict) and parent:
            last = rng.choice(list(parent))
        if value is None and rng.random() < 0.5 and isinstance(parent, dict):
            parent.pop(last, None)
        elif isinstance(parent, dict):
            parent[last] = value
    text = json.dumps(obj)
    if rng.random() < 0.1:
        text = text.replace("1e+400", "1e400")
    p.write_text(text.replace("Infinity", "1e400"))
    return True


# ---------------------------------------------------------------- cases: (reader, file, mutator, command)


def cases(P: dict[str, Path]) -> list[tuple[str, str, str, Callable, Callable[[Path], list[str]]]]:
    """(reader, artifact, file inside it, mutator, argv for the copied artifact at `d`)."""
    gen = lambda d: ["generate", "--model", str(d), "--prompt", "the cat", "--max-new-tokens", "2"]  # noqa: E731
    chat = lambda d: gen(d) + ["--chat"]  # noqa: E731
    insp = lambda d: ["inspect", str(d), "--no-hashes"]  # noqa: E731
    merge = lambda d: ["merge", "--base", str(P["model"]), "--adapter", str(d), "--out", str(d.parent / "merged")]  # noqa: E731
    prep = lambda name: (  # noqa: E731
        lambda d: [
            "data",
            "prepare",
            str(d / name),
            "--out",
            str(d.parent / "out"),  # noqa: E731
            "--workers",
            "1",
            "pii.enabled=false",
        ]
    )
    out = [
        ("config.json", "model", "config.json", mutate_json_file, insp),
        ("config.json", "model", "config.json", mutate_json_file, gen),
        ("generation_config.json", "model", "generation_config.json", mutate_json_file, gen),
        ("tokenizer.json", "model", "tokenizer.json", mutate_json_file, gen),
        ("tokenizer_config.json", "model", "tokenizer_config.json", mutate_json_file, chat),
        ("special_tokens_map.json", "model", "special_tokens_map.json", mutate_json_file, gen),
        ("safetensors header", "model", "model.safetensors", mutate_safetensors, insp),
        ("safetensors header", "model", "model.safetensors", mutate_safetensors, gen),
        ("shard index", "sharded", "model.safetensors.index.json", mutate_json_file, insp),
        ("shard index", "sharded", "model.safetensors.index.json", mutate_json_file, gen),
        ("shard safetensors", "sharded", "model-00001-of-*.safetensors", mutate_safetensors, gen),
        ("chat template", "model", "chat_template.jinja", mutate_template, chat),
        (
            "chat template",
            "model",
            "chat_template.jinja",
            mutate_template,
            lambda d: [
                "eval",
                "--model",
                str(d),
                "--data",
                str(P["raw"] / "chat.jsonl"),
                "--out",
                str(d.parent / "ev"),
                "--limit",
                "2",
                "--max-new-tokens",
                "2",
                "--metrics",
                "exact_match",
            ],
        ),
        ("adapter_config.json", "adapter", "adapter_config.json", mutate_json_file, merge),
        ("adapter safetensors", "adapter", "adapter_model.safetensors", mutate_safetensors, merge),
        ("train YAML", "root", "train.yaml", mutate_yaml_file, lambda d: ["train", str(d / "train.yaml"), "--dry-run"]),
        (
            "data YAML",
            "root",
            "data.yaml",
            mutate_yaml_file,
            lambda d: [
                "data",
                "prepare",
                str(P["raw"] / "text.jsonl"),
                "--out",
                str(d.parent / "out"),
                "--config",
                str(d / "data.yaml"),
            ],
        ),
        ("manifest.json", "prepared", "manifest.json", mutate_json_file, lambda d: ["data", "verify", str(d)]),
        ("token shard meta", "prepared", "tokens/meta.json", mutate_json_file, lambda d: ["data", "inspect", str(d)]),
        ("split JSONL", "prepared", "train.jsonl", mutate_jsonl_file, lambda d: ["data", "verify", str(d)]),
    ]
    for name, mut in (
        ("text.jsonl", mutate_jsonl_file),
        ("chat.jsonl", mutate_jsonl_file),
        ("arr.json", mutate_json_file),
        ("rows.csv", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
        ("rows.tsv", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
        ("doc.txt", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
        ("text.jsonl.gz", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
        ("rows.parquet", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
        ("rows.parquet.gz", lambda p, r: p.write_bytes(mutate_bytes(p.read_bytes(), r))),
    ):
        out.append((f"data input {name}", "raw", name, mut, prep(name)))
    return out


def _peak_rss_mb() -> int:
    # VmHWM, not ru_maxrss: a forked child's ru_maxrss starts at its parent's size (pytest's, here).
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) // 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


class _Hang(BaseException):
    pass


def _alarm(*_):
    raise _Hang()


def run_case(main: Callable, argv: list[str]) -> dict:
    err, out = io.StringIO(), io.StringIO()
    t0 = time.monotonic()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    escaped = None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except _Hang:
        rc, escaped = None, "hang"
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 2
    except BaseException:  # noqa: BLE001  (what the fuzzer looks for)
        rc, escaped = None, traceback.format_exc(limit=-3)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    stderr = err.getvalue()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    ok = (
        escaped is None
        and "Traceback" not in stderr
        and (rc == 0 or (rc == 2 and len(errors) == 1 and lines[-1] == errors[0]))
    )
    if rc not in (0, 2) and escaped is None and rc is not None:
        ok = False
    return {
        "ok": ok,
        "rc": rc,
        "seconds": round(time.monotonic() - t0, 2),
        "escaped": escaped,
        "stderr_tail": stderr[-600:] if not ok else (errors[0][:300] if errors else ""),
    }


def main_cli() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None)
    ap.add_argument("--only", type=int, default=None, help="run only case K (same mutation as in the full run)")
    args = ap.parse_args()
    os.environ.setdefault("YUNQUE_CPU_KERNELS", "0")
    work = Path(args.work or tempfile.mkdtemp(prefix="yunque-fuzz-"))
    t0 = time.monotonic()
    P = build_pristine(work / "pristine")
    from yunque.__main__ import main

    all_cases = cases(P)
    rng = random.Random(args.seed)
    with open(args.out, "w") as res:
        res.write(json.dumps({"setup_seconds": round(time.monotonic() - t0, 1)}) + "\n")
        for k in range(args.cases):
            reader, art, fname, mutator, argv_of = all_cases[k % len(all_cases)]
            case_seed = rng.random()
            if args.only is not None and k != args.only:
                continue
            case_dir = work / f"case{k}"
            d = case_dir / art
            src = P["root"] if art == "root" else P[art]
            if art == "root":
                d.mkdir(parents=True)
                for f in ("train.yaml", "data.yaml"):
                    shutil.copy(src / f, d / f)
            else:
                shutil.copytree(src, d)
            matches = sorted(d.glob(fname))
            target = matches[0] if matches else d / fname
            if not target.exists():
                target.write_text(TEMPLATE)
            case_rng = random.Random(case_seed)
            if mutator is mutate_json_file:
                mutator(target, case_rng, target.relative_to(d).as_posix())
            else:
                mutator(target, case_rng)
            if args.only is not None:
                print(target, repr(target.read_bytes()[:300]), file=sys.stderr)
            r = run_case(main, argv_of(d))
            r.update(
                case=k,
                reader=reader,
                file=fname,
                argv=" ".join(argv_of(d))[-160:],
                maxrss_mb=_peak_rss_mb(),
            )
            res.write(json.dumps(r) + "\n")
            res.flush()
            if args.only is None:
                shutil.rmtree(case_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main_cli())  # the yunque under test comes from PYTHONPATH
