"""Tokenizers in Hugging Face format, loaded and trained with the `tokenizers` library.

`Tokenizer.from_dir` reads a checkpoint's tokenizer.json + tokenizer_config.json (and
special_tokens_map.json, chat_template.jinja, additional_chat_templates/, generation_config.json
when present). `train_bpe` trains a Llama-3-style byte-level BPE (same split regex, same
special tokens, same chat template) that `transformers.AutoTokenizer` loads unchanged.

Two rules keep fine-tunes well behaved: `stop_ids` holds every id that ends a reply (EOS,
the template's end-of-turn token, generation_config's eos ids), and `pad_id` is never the
EOS or the end-of-turn id, so masking padding can never mask the token the model must
learn to stop with.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as RustTokenizer

from yunque.errors import YunqueError
from yunque.jinja_sandbox import render_template
from yunque.textstream import corpus_files, iter_corpus

# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern): contractions, letter runs with one
# leading non-letter, digit groups of <= 3, punctuation runs, newline runs, other whitespace.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BOS, EOS, PAD, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", EOT, "<|python_tag|>"]
LLAMA3_CHAT_TEMPLATE = (Path(__file__).parent / "chat_templates" / "llama3.jinja").read_text(encoding="utf-8")

_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|pad|>", "<|padding|>", "<|reserved_special_token_0|>")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise YunqueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise YunqueError(f"{path}: cannot read: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer too long to convert; nesting past the stack
        raise YunqueError(f"{path}: invalid JSON: {str(e)[:100] or 'nested too deeply'}") from None


def _token_text(value: Any, where: str) -> str | None:
    """Special tokens are saved as a string or as a serialized AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise YunqueError(f"{where}: expected a token string, got {value!r}")


def find_end_of_turn(source: str, special_tokens: dict[str, str], added_tokens: Iterable[str]) -> str | None:
    """The added token a template writes right after an assistant message (e.g. <|eot_id|>,
    <|im_end|>, </s>): generation must stop there, so it belongs in the stop ids."""
    probe = "yunque probe reply"
    messages = [{"role": "user", "content": "yunque probe question"}, {"role": "assistant", "content": probe}]
    try:
        text = render_template(
            source,
            {"messages": messages, "add_generation_prompt": False, "tools": None, "documents": None, **special_tokens},
        )
    except YunqueError:
        return None
    at = text.find(probe)
    if at < 0:
        return None
    rest = text[at + len(probe) :].lstrip()
    return next((t for t in sorted(added_tokens, key=len, reverse=True) if t and rest.startswith(t)), None)


class Tokenizer:
    """A Hugging Face fast tokenizer plus the special-token and chat-template facts around it."""

    def __init__(
        self,
        rust: RustTokenizer,
        config: dict[str, Any] | None = None,
        chat_templates: dict[str, str] | None = None,
        generation_eos: Iterable[int] = (),
        source: str = "<tokenizer>",
    ):
        self._rust = rust
        self._plain_rust: RustTokenizer | None = None
        self._config = dict(config or {})
        self.source = source
        self.chat_templates = dict(chat_templates or {})
        self.vocab_size: int = rust.get_vocab_size(with_added_tokens=True)
        # Named special tokens exactly as the config gives them: chat templates read these variables.
        self.special_tokens: dict[str, str] = {}
        for name in _NAMED:
            text = _token_text(self._config.get(name), f"{source}: {name}")
            if text is not None:
                if rust.token_to_id(text) is None:
                    raise YunqueError(f"{source}: {name} {text!r} is not in the vocabulary")
                self.special_tokens[name] = text
        self.bos_id = self.token_to_id(self.special_tokens.get("bos_token", ""))
        gen_eos = list(generation_eos)
        self.eos_id = self.token_to_id(self.special_tokens.get("eos_token", ""))
        if self.eos_id is None and gen_eos:
            self.eos_id = gen_eos[0]
        eot = None
        if self.chat_template is not None:
            added = [t.content for t in rust.get_added_tokens_decoder().values()]
            eot = self.token_to_id(find_end_of_turn(self.chat_template, self.special_tokens, added) or "")
        self.eot_id: int | None = eot if eot is not None else self.eos_id
        self.stop_ids: list[int] = list(dict.fromkeys(i for i in (self.eos_id, eot, *gen_eos) if i is not None))
        self.pad_id = self._pick_pad()

    def _pick_pad(self) -> int | None:
        """The configured pad token unless it is the EOS or the end-of-turn token (the ids a model
        must learn to emit, which loss masking of padding would hide); else a known spare token;
        else None (callers then pad with any id and mask by length)."""
        unk = self.special_tokens.get("unk_token")
        for name in (self.special_tokens.get("pad_token"), *_PAD_NAMES, unk):
            i = self.token_to_id(name or "")
            if i is not None and i not in (self.eos_id, self.eot_id):
                return i
        return None

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, stop_ids={self.stop_ids})"
        )

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        d = Path(path)
        if not d.is_dir():
            raise YunqueError(f"{d}: tokenizer directory not found")
        tj = d / "tokenizer.json"
        if not tj.is_file():
            hint = (
                " (only a SentencePiece tokenizer.model: convert it with transformers' save_pretrained)"
                if (d / "tokenizer.model").exists()
                else ""
            )
            raise YunqueError(f"{d}: no tokenizer.json{hint}")
        try:
            rust = RustTokenizer.from_file(str(tj))
        except Exception as e:  # noqa: BLE001  (the Rust loader reports every problem as a bare Exception)
            _read_json(tj)  # a JSON syntax error gets a line number
            raise YunqueError(f"{tj}: not a valid tokenizer: {e}") from None
        config: dict[str, Any] = {}
        if (d / "tokenizer_config.json").is_file():
            config = _read_json(d / "tokenizer_config.json")
            if not isinstance(config, dict):
                raise YunqueError(f"{d / 'tokenizer_config.json'}: expected a JSON object")
        stm = d / "special_tokens_map.json"
        if stm.is_file():
            legacy = _read_json(stm)
            if not isinstance(legacy, dict):
                raise YunqueError(f"{stm}: expected a JSON object")
            for name in _NAMED:  # older checkpoints keep special tokens only here
                if config.get(name) is None and legacy.get(name) is not None:
                    config[name] = legacy[name]
        return cls(rust, config, _load_templates(d, config), _generation_eos(d, rust), source=str(d))

    # -- encoding ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._rust.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Encode many texts in parallel in Rust (no offsets computed: the fast path for data prep)."""
        batch = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)  # _fast: tokenizers >= 0.20
        return [e.ids for e in batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_offsets(self, text: str, special_as_text: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and each token's character span in `text` (no BOS/EOS added). With `special_as_text`
        the strings of special tokens in `text` are encoded as ordinary text."""
        rust = self._rust
        if special_as_text:
            if self._plain_rust is None:  # a twin that ignores special tokens, so the shared one is never toggled
                self._plain_rust = RustTokenizer.from_str(rust.to_str())
                self._plain_rust.encode_special_tokens = True
            rust = self._plain_rust
        enc = rust.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def encode_offsets_batch(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """`encode_offsets` for many texts, in parallel in Rust."""
        return [(e.ids, e.offsets) for e in self._rust.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def control_tokens(self) -> list[str]:
        """The special tokens' strings (role headers, end of turn, ...)."""
        return [t.content for t in self._rust.get_added_tokens_decoder().values() if t.special]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._rust.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, tok: str) -> int | None:
        return self._rust.token_to_id(tok) if tok else None

    def id_to_token(self, i: int) -> str | None:
        return self._rust.id_to_token(int(i))

    def generation_config(self) -> dict[str, Any]:
        """Token ids for a checkpoint's generation_config.json: with every stop id as
        `eos_token_id`, transformers, vLLM and llama.cpp stop at the end of a turn too."""
        return {"bos_token_id": self.bos_id, "eos_token_id": self.stop_ids, "pad_token_id": self.pad_id}

    # -- saving ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF format).

        Keys of the source config that yunque does not interpret are kept, so a fine-tune's
        tokenizer stays loadable by the same tools as the base model's."""
        for name in self.chat_templates:  # names become file names
            if not re.fullmatch(r"\w[\w.-]*", name):
                raise YunqueError(f"chat template name {name!r}: only letters, digits, '_', '-', '.' can name a file")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._rust.save(str(out / "tokenizer.json"))
        specials = dict(self.special_tokens)
        if self.pad_id is not None:
            specials["pad_token"] = self.id_to_token(self.pad_id)  # never the EOS, unlike many configs
        added = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._rust.get_added_tokens_decoder().items())
        }
        config = {k: v for k, v in self._config.items() if k not in _NAMED and k != "chat_template"}
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        config.setdefault("clean_up_tokenization_spaces", False)  # HF's cleanup is lossy (" ." -> ".")
        config.update(added_tokens_decoder=added, **specials)
        if self.chat_templates:
            single = set(self.chat_templates) == {"default"}
            config["chat_template"] = (
                self.chat_template if single else [{"name": k, "template": v} for k, v in self.chat_templates.items()]
            )
            # Newer transformers read .jinja files first: write them too, so no stale file wins.
            for name, template in self.chat_templates.items():
                path = out / ("chat_template.jinja" if name == "default" else f"additional_chat_templates/{name}.jinja")
                path.parent.mkdir(exist_ok=True)
                path.write_text(template, encoding="utf-8")
        (out / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (out / "special_tokens_map.json").write_text(
            json.dumps(specials, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def _load_templates(d: Path, config: dict[str, Any]) -> dict[str, str]:
    """Chat templates by name: tokenizer_config.json's, overridden by chat_template.jinja files."""
    raw = config.get("chat_template")
    where = f"{d / 'tokenizer_config.json'}: chat_template"
    templates: dict[str, str] = {}
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            if not (
                isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("template"), str)
            ):
                raise YunqueError(f"{where}[{i}]: expected {{'name': str, 'template': str}}")
            templates[item["name"]] = item["template"]
    elif raw is not None:
        raise YunqueError(f"{where}: expected a string or a list of named templates, got {type(raw).__name__}")
    files = {"default": d / "chat_template.jinja"}
    extra = d / "additional_chat_templates"
    if extra.is_dir():
        files.update({p.stem: p for p in sorted(extra.glob("*.jinja"))})
    for name, p in files.items():
        if p.is_file():
            try:
                templates[name] = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise YunqueError(f"{p}: cannot read: {e}") from None
    return templates


def _generation_eos(d: Path, rust: RustTokenizer) -> list[int]:
    p = d / "generation_config.json"
    if not p.is_file():
        return []
    raw = _read_json(p)
    ids = raw.get("eos_token_id") if isinstance(raw, dict) else None
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    n = rust.get_vocab_size(with_added_tokens=True)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
            raise YunqueError(f"{p}: eos_token_id {i!r} is not a token id of this tokenizer (vocab size {n})")
    return ids


# -- training ------------------------------------------------------------------------------------
def train_bpe(files: list, vocab_size: int, out_dir: str | Path | None = None, min_frequency: int = 2) -> Tokenizer:
    """Train a Llama-3-style byte-level BPE on text files; save it in HF format if `out_dir` is given.

    `vocab_size` counts everything (256 byte tokens, merges and the special tokens); a corpus
    too small to fill it gives a smaller vocabulary.
    """
    floor = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < floor:
        raise YunqueError(
            f"vocab_size {vocab_size}: must be at least {floor} (256 byte tokens + {len(SPECIAL_TOKENS)} special tokens + 1)"  # noqa: E501
        )
    if min_frequency < 1:
        raise YunqueError(f"min_frequency {min_frequency}: must be >= 1")
    paths = corpus_files(files)
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, as in Llama 3 / tiktoken.
    rust = RustTokenizer(models.BPE(ignore_merges=True))
    rust.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted() -> Iterator[str]:
        for text in iter_corpus(paths):
            seen[0] += len(text)
            yield text

    rust.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise YunqueError(f"no text in {', '.join(map(str, paths))}")
    bos_id = rust.token_to_id(BOS)
    rust.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),  # untrimmed offsets: whitespace tokens keep their span
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, bos_id)]
            ),
        ]
    )
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    tok = Tokenizer(rust, config, {"default": LLAMA3_CHAT_TEMPLATE}, source=str(out_dir or "<trained>"))
    if out_dir is not None:
        tok.save(out_dir)
    return tok
