"""Constrained decoding with xgrammar: `response_format` (json_object, json_schema) and forced
tool calls (`tool_choice` "required" or a named function).

A request's grammar is compiled once (in a worker thread, cached by xgrammar per schema);
each of its sequences then carries its own `Constraint` (an xgrammar matcher) through the
engine, so sequences with different grammars, or none, share a batch. At every step the
matcher's token bitmask sets the logits of tokens the grammar does not allow to -inf before
sampling, and the sampled token advances the matcher. Once the grammar is complete only the
stop tokens remain allowed, so the reply ends there; a reply cut by max_tokens is cut
(finish_reason "length"), as OpenAI's is.

JSON is generated with fixed separators (", " and ": ", as `json.dumps` writes it) and no other
whitespace: whitespace runs are valid JSON, but a weak model can loop in them until max_tokens.
A forced tool call is one call object in the format of the template (see `yunque.serve.tools`):
Hermes/Qwen `<tool_call>{"name": ..., "arguments": ...}</tool_call>` or Llama 3.1's bare
`{"name": ..., "parameters": ...}`.

xgrammar is optional (installed by install.sh without its dependencies, see there); without
it these requests get a 400 that says so, everything else works.
"""

from __future__ import annotations

import json
import threading

import torch

from yunque.errors import YunqueError

_INSTALL = "pip install --no-deps xgrammar apache-tvm-ffi"


class GrammarError(YunqueError):
    """The request's grammar cannot be built (a bad schema, or no xgrammar): a 400."""


class Constraint:
    """One sequence's grammar state; used by the engine thread only."""

    def __init__(self, xgr, compiled):
        self.xgr, self.matcher = xgr, xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        return self.matcher.accept_token(token)


class Grammar:
    """A compiled grammar; `start()` gives each sequence its own state."""

    def __init__(self, xgr, compiled):
        self.xgr, self.compiled = xgr, compiled

    def start(self) -> Constraint:
        return Constraint(self.xgr, self.compiled)


def mask_disallowed(logits: torch.Tensor, rows: list[tuple[int, Constraint]]) -> torch.Tensor:
    """`logits` (B, V) as float with every token the rows' grammars forbid at -inf (other rows untouched)."""
    xgr = rows[0][1].xgr
    logits = logits.float()
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for r, c in rows:
        c.matcher.fill_next_token_bitmask(bitmask, r)
    backend = "cpu" if logits.device.type == "cpu" else "torch_native"  # not triton: a GPU-only dependency
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=[r for r, _ in rows], backend=backend)
    return logits


class Grammars:
    """The server's grammar compiler for the tokenizer and the model's vocabulary (built by `warm()` at start)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._xgr = self._compiler = None

    def _ready(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                    from transformers import PreTrainedTokenizerFast
                except ImportError as e:
                    raise GrammarError(
                        f"this server cannot constrain output ({e.name} is not installed: {_INSTALL}); "
                        "send the request without response_format / a forced tool_choice"
                    ) from None
                # yunque's Tokenizer has no public accessor for its `tokenizers` object yet, hence the private
                # attribute. transformers' wrapper (from which xgrammar reads the vocabulary type) reconfigures
                # the object it is given, so it gets a copy: the server's own must encode as before.
                from tokenizers import Tokenizer as RustTokenizer

                hf = PreTrainedTokenizerFast(tokenizer_object=RustTokenizer.from_str(self.tok._rust.to_str()))
                stop = list(self.tok.stop_ids)
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size, stop_token_ids=stop)
                # Control tokens (role headers, BOS) read as their text ("<|start_header_id|>") to xgrammar,
                # which would let them into a JSON string; as empty tokens they are never allowed. The
                # stop tokens stay: they end the reply once the grammar is complete.
                vocab = list(info.decoded_vocab)
                for t in self.tok.control_tokens:
                    i = self.tok.token_to_id(t)
                    if i is not None and i < len(vocab) and i not in stop:
                        vocab[i] = b""
                prefix = info.add_prefix_space
                info = xgr.TokenizerInfo(
                    vocab, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=stop, add_prefix_space=prefix
                )
                self._xgr, self._compiler = xgr, xgr.GrammarCompiler(info, max_threads=1)
            return self._xgr, self._compiler

    def warm(self) -> None:
        """Import xgrammar and read the vocabulary now (seconds; a large vocabulary takes longer),
        so that the first constrained request does not spend its time budget on it."""
        try:
            self._ready()
        except GrammarError:
            pass  # not installed: those requests get the 400 that says so

    def _compile(self, what: str, build) -> Grammar:
        xgr, compiler = self._ready()
        try:  # the compiler is thread-safe (its cache is shared between threads)
            return Grammar(xgr, build(xgr, compiler))
        except Exception as e:  # whatever xgrammar raises for it, the request's schema is the cause
            raise GrammarError(f"{what}: {e}") from None

    def json_object(self) -> Grammar:
        """Any JSON object (strict_mode off: any properties)."""
        return self._compile(
            "response_format",
            lambda xgr, c: c.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False),
        )

    def json_schema(self, schema: dict, strict: bool) -> Grammar:
        text = json.dumps(schema)
        return self._compile(
            "response_format.json_schema.schema",
            lambda xgr, c: c.compile_json_schema(text, any_whitespace=False, strict_mode=strict),
        )

    def tool_call(self, call_format: str, tools: list[dict], tool_choice) -> Grammar:
        """A reply that is exactly one call: of the named function (`tool_choice` {"type": "function",
        "function": {"name": ...}}) or of any of `tools` ("required"), its arguments valid for the
        function's `parameters`, written as `call_format` ("hermes" or "llama") writes it."""
        key = "arguments" if call_format == "hermes" else "parameters"
        named = None if tool_choice == "required" else tool_choice["function"]["name"]
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, key: f.get("parameters") or {"type": "object"}},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for f in (t["function"] for t in tools)
            if named is None or f["name"] == named
        ]
        schema = json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})

        def build(xgr, c):
            body = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
            if call_format == "hermes":
                head, tail = (
                    xgr.Grammar.from_ebnf(r'root ::= "<tool_call>\n"'),
                    xgr.Grammar.from_ebnf(r'root ::= "\n</tool_call>"'),
                )
                body = xgr.Grammar.concat(head, body, tail)
            return c.compile_grammar(body)

        return self._compile("tool_choice", build)
