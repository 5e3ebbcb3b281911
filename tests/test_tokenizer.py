"""Tokenizer: training, HF-format loading/saving, parity with transformers, error messages."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from tok_helpers import MIXED, VOCAB, family_dir, trained_dir, write_corpus
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import models

import yunque.tokenizer as ytok
from yunque import textstream
from yunque.__main__ import main
from yunque.errors import YunqueError
from yunque.textstream import iter_corpus
from yunque.tokenizer import BOS, EOS, EOT, PAD, SPECIAL_TOKENS, Tokenizer, train_bpe


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return trained_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


@pytest.fixture(scope="session")
def hf(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def test_trained_tokenizer_shape(tok, tok_dir):
    assert tok.vocab_size == VOCAB
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tok.token_to_id(BOS), tok.token_to_id(EOS), tok.token_to_id(PAD))
    assert tok.pad_id not in tok.stop_ids
    assert tok.stop_ids == [tok.token_to_id(EOS), tok.token_to_id(EOT)]  # EOS + the template's end of turn
    assert "<|eot_id|>" in tok.chat_template and "add_generation_prompt" in tok.chat_template
    assert tok.generation_config() == {
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.stop_ids,
        "pad_token_id": tok.pad_id,
    }
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    split, byte_level = spec["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == ytok.LLAMA3_SPLIT and byte_level["type"] == "ByteLevel"
    # Llama 3's split: digits in groups of at most three.
    assert all(len(tok.decode([i])) <= 3 for i in tok.encode("1234567"))


def test_ids_match_transformers_on_mixed_text(tok, hf):
    assert len(hf) == tok.vocab_size
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    texts = MIXED + ["\n".join(MIXED), "<|begin_of_text|>x<|eot_id|>y", "", " ", "\r\n\r\n"]
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == hf.encode(text) == [tok.bos_id] + ids
        assert tok.decode(ids) == text == hf.decode(ids)  # byte-level: lossless, even for unseen scripts
        assert tok.decode(tok.encode(text, True), skip_special_tokens=True) == hf.decode(
            hf.encode(text), skip_special_tokens=True
        )
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_special_tokens=True) == hf(texts)["input_ids"]


def test_special_tokens_are_single_ids_and_decode_accepts_arrays(tok):
    ids = tok.encode("a<|eot_id|>b")
    assert tok.token_to_id(EOT) in ids and len(ids) == 3
    assert tok.decode(np.array(ids)) == tok.decode(ids) == "a<|eot_id|>b"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(tok.eos_id) == EOS
    assert tok.token_to_id("no such token") is None and len(tok) == tok.vocab_size


def test_save_roundtrip_keeps_config_and_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    src = family_dir(
        Path(tok.source),
        tmp_path / "src",
        config={"bos_token": BOS, "eos_token": EOS, "model_max_length": 4096, "custom_key": 1},
        template=tok.chat_template,
    )
    Tokenizer.from_dir(src).save(tmp_path / "out")
    again = Tokenizer.from_dir(tmp_path / "out")
    assert (again.vocab_size, again.bos_id, again.eos_id, again.pad_id, again.stop_ids, again.chat_template) == (
        tok.vocab_size,
        tok.bos_id,
        tok.eos_id,
        tok.pad_id,
        tok.stop_ids,
        tok.chat_template,
    )
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["custom_key"] == 1 and cfg["model_max_length"] == 4096
    assert cfg["pad_token"] == PAD  # the source had no pad: the saved one is the safe pad, not EOS
    assert (tmp_path / "out" / "chat_template.jinja").read_text() == tok.chat_template
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert hf.pad_token_id == tok.pad_id and hf.encode(MIXED[1]) == again.encode(MIXED[1], True)


def test_pad_is_never_eos_or_end_of_turn(tok_dir, tmp_path):
    # Llama-3-base style: pad == eos in the config; the reserved finetune pad is used instead.
    d = family_dir(
        tok_dir, tmp_path / "a", config={"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, template=None
    )
    t = Tokenizer.from_dir(d)
    assert t.pad_id == t.token_to_id(PAD) and t.stop_ids == [t.eos_id]
    # Nor the template's end-of-turn token, which every assistant turn must learn to emit.
    d = family_dir(
        tok_dir,
        tmp_path / "c",
        config={"bos_token": BOS, "eos_token": EOS, "pad_token": EOT},
        template=ytok.LLAMA3_CHAT_TEMPLATE,
    )
    t = Tokenizer.from_dir(d)
    assert t.eot_id == t.token_to_id(EOT) and t.pad_id == t.token_to_id(PAD)
    # A vocabulary with no spare token: no pad rather than a pad that would mask the EOS.
    base = tmp_path / "b"
    base.mkdir()
    rust = RustTokenizer(models.BPE(vocab={"a": 0, "</s>": 1}, merges=[]))
    rust.add_special_tokens(["</s>"])
    rust.save(str(base / "tokenizer.json"))
    (base / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": "</s>"}))
    assert Tokenizer.from_dir(base).pad_id is None


def test_stop_ids_from_generation_config_and_legacy_special_tokens_map(tok_dir, tmp_path):
    d = family_dir(tok_dir, tmp_path / "d", config={}, template=None, generation_eos=[EOS, "<|eom_id|>", EOT])
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": {"content": BOS}, "eos_token": EOS}))
    t = Tokenizer.from_dir(d)
    assert t.bos_id == t.token_to_id(BOS) and t.eos_id == t.token_to_id(EOS)
    assert t.stop_ids == [t.token_to_id(x) for x in (EOS, "<|eom_id|>", EOT)]
    assert t.chat_template is None


def test_chat_template_files(tok_dir, tmp_path):
    d = family_dir(
        tok_dir,
        tmp_path / "d",
        config={"eos_token": EOS},
        template=[{"name": "default", "template": "A"}, {"name": "tool_use", "template": "B"}],
    )
    assert Tokenizer.from_dir(d).chat_templates == {"default": "A", "tool_use": "B"}
    (d / "chat_template.jinja").write_text("C")  # newer transformers save this; it wins
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "rag.jinja").write_text("D")
    tok = Tokenizer.from_dir(d)
    assert tok.chat_templates == {"default": "C", "tool_use": "B", "rag": "D"}
    tok.chat_templates["tool_use"] = "B2"
    tok.save(d)  # into its own directory: the .jinja files must not override what was saved
    assert Tokenizer.from_dir(d).chat_templates == {"default": "C", "tool_use": "B2", "rag": "D"}
    tok.chat_templates["../evil"] = "E"
    with pytest.raises(YunqueError, match=r"chat template name '../evil': only letters"):
        tok.save(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_iter_corpus_streams_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(textstream, "_CHUNK", 64)
    text = "".join(MIXED) * 20  # multi-byte characters fall across the 64-byte read boundaries
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    pieces = list(iter_corpus([tmp_path / "a.txt"]))
    assert "".join(pieces) == text  # nothing dropped or re-ordered
    assert len(pieces) > 20 and max(len(p) for p in pieces) < 200
    assert all(p[-1].isspace() for p in pieces[:-1])  # cut between words
    rows = [{"text": "first row"}, {"text": "第二"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert list(iter_corpus([tmp_path / "b.jsonl"])) == ["first row", "第二"]


def test_train_from_jsonl_and_small_corpus(tmp_path):
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": line}) for line in MIXED * 3))
    tok = train_bpe([str(tmp_path / "c.jsonl")], vocab_size=100_000, min_frequency=1)
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size < 100_000  # the corpus cannot fill the vocabulary
    assert all(tok.decode(tok.encode(t)) == t for t in MIXED)


@pytest.mark.parametrize(
    "name,content,kwargs,message",
    [
        ("missing.txt", None, {}, "missing.txt: no such file"),
        ("bad.txt", b"ok text\n\xff\xfe bad", {}, "bad.txt: not UTF-8 text (invalid byte at offset 8)"),
        ("empty.txt", b"", {}, "no text in"),
        ("ok.txt", b"text", {"vocab_size": 100}, "vocab_size 100: must be at least 265"),
        ("ok.txt", b"text", {"min_frequency": 0}, "min_frequency 0: must be >= 1"),
    ],
)
def test_train_errors(tmp_path, name, content, kwargs, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(YunqueError, match=re.escape(message)):
        train_bpe([tmp_path / name], **{"vocab_size": 300, **kwargs})


def test_train_jsonl_errors(tmp_path):
    with pytest.raises(YunqueError, match="no training files given"):
        train_bpe([], vocab_size=300)
    (tmp_path / "u.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(YunqueError, match=r"u.jsonl: not UTF-8 text"):
        train_bpe([tmp_path / "u.jsonl"], vocab_size=300)
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(YunqueError, match=r"a.jsonl:2: expected an object with a string \"text\" field"):
        train_bpe([tmp_path / "a.jsonl"], vocab_size=300)
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(YunqueError, match=r"b.jsonl:2: invalid JSON"):
        train_bpe([tmp_path / "b.jsonl"], vocab_size=300)


def test_cli_train(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", n_lines=300)
    out = tmp_path / "out"
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vocab size 400" in printed and "bytes/token" in printed and f"saved to {out}" in printed
    assert Tokenizer.from_dir(out).vocab_size == 400
    assert main(["tokenizer", "train", str(corpus), "--out", str(out)]) == 2  # would clobber a tokenizer
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "400", "--out", str(out), "--overwrite"]) == 0
    assert main(["tokenizer", "train", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o2")]) == 2
    assert "nope.txt: no such file" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(corpus)]) == 2
    assert "the following arguments are required: --out" in capsys.readouterr().err


def _break(d: Path, name: str, text: str) -> None:
    (d / name).write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "setup,message",
    [
        (lambda d: shutil.rmtree(d), "tokenizer directory not found"),
        (lambda d: (d / "tokenizer.json").unlink(), "no tokenizer.json"),
        (lambda d: _break(d, "tokenizer.json", '{"model": \n  oops'), r"tokenizer.json:2: invalid JSON"),
        (lambda d: _break(d, "tokenizer.json", '{"model": 1}'), r"tokenizer.json: not a valid tokenizer"),
        (lambda d: _break(d, "tokenizer_config.json", "{,}"), r"tokenizer_config.json:1: invalid JSON"),
        (lambda d: _break(d, "tokenizer_config.json", "[]"), r"tokenizer_config.json: expected a JSON object"),
        (
            lambda d: _break(d, "tokenizer_config.json", '{"eos_token": "<eos>"}'),
            r"eos_token '<eos>' is not in the vocabulary",
        ),
        (
            lambda d: _break(d, "tokenizer_config.json", '{"eos_token": 5}'),
            r"eos_token: expected a token string, got 5",
        ),
        (
            lambda d: _break(d, "tokenizer_config.json", '{"chat_template": 5}'),
            r"chat_template: expected a string or a list",
        ),
        (
            lambda d: _break(d, "tokenizer_config.json", '{"chat_template": [{"name": "x"}]}'),
            r"chat_template\[0\]: expected",
        ),
        (
            lambda d: _break(d, "generation_config.json", '{"eos_token_id": [1, 99999]}'),
            r"eos_token_id 99999 is not a token id",
        ),
        (lambda d: _break(d, "special_tokens_map.json", "nope"), r"special_tokens_map.json:1: invalid JSON"),
        (lambda d: _break(d, "special_tokens_map.json", "[1]"), r"special_tokens_map.json: expected a JSON object"),
        (
            lambda d: (d / "tokenizer_config.json").write_bytes(b'{"a": "\xff"}'),
            r"tokenizer_config.json: cannot read: .*utf-8",
        ),
        (lambda d: (d / "chat_template.jinja").write_bytes(b"\xff"), r"chat_template.jinja: cannot read"),
        (
            lambda d: (d / "tokenizer.json").rename(d / "tokenizer.model"),
            r"no tokenizer.json \(only a SentencePiece tokenizer.model",
        ),
    ],
)
def test_from_dir_errors(tok_dir, tmp_path, setup, message):
    d = tmp_path / "t"
    shutil.copytree(tok_dir, d)
    setup(d)
    with pytest.raises(YunqueError, match=message):
        Tokenizer.from_dir(d)


def test_tokenizer_does_not_import_chat():
    """One direction only: chat renders with a tokenizer; the tokenizer finds its own end-of-turn
    token (by rendering its template in the sandbox) without importing chat."""
    import ast

    def imports(module) -> set[str]:
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        found = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return found | {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    import yunque.chat as chat

    assert "yunque.chat" not in imports(ytok)
    top_level = {
        n.module
        for n in ast.parse(Path(chat.__file__).read_text(encoding="utf-8")).body
        if isinstance(n, ast.ImportFrom)
    }
    assert "yunque.tokenizer" in top_level  # a real import, not one hidden under TYPE_CHECKING
    assert ytok.find_end_of_turn(ytok.LLAMA3_CHAT_TEMPLATE, {"bos_token": BOS}, SPECIAL_TOKENS) == EOT
