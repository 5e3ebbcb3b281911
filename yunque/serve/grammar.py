"""Constrained decoding with xgrammar: `response_format` (json_object, json_schema) and forced
tool calls (`tool_choice` "required" or a named function).

A request's grammar is compiled once (in a worker thread, cached by xgrammar per schema);
each of its sequences then carries its own `Constraint` (an xgrammar matcher) through the
engine, so sequences with different grammars, or none, share a batch. At every step the
matcher's token bitmask sets the logits of tokens the grammar does not allow to -inf before
sampling, and the sampled token advances the matcher. Once the grammar is complete only the
stop tokens remain allowed, so the reply ends there; a reply cut by max_tokens is cut
(finish_reason "length"), as OpenAI's is.

JSON is generated compact (no free whitespace between tokens): whitespace runs are valid JSON
but a weak model can loop in them forever. Forced tool calls use xgrammar's own structural
tags for the two call formats that `yunque.serve.tools` parses: Hermes/Qwen `<tool_call>` and
Llama 3.1 JSON.

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
    """The server's grammar compiler (built on first use, for the tokenizer and the model's vocabulary)."""

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
                # attribute; wrapped as transformers' fast tokenizer, xgrammar reads its vocabulary type itself.
                hf = PreTrainedTokenizerFast(tokenizer_object=self.tok._rust)
                info = xgr.TokenizerInfo.from_huggingface(
                    hf, vocab_size=self.vocab_size, stop_token_ids=list(self.tok.stop_ids)
                )
                self._xgr, self._compiler = xgr, xgr.GrammarCompiler(info, max_threads=1)
            return self._xgr, self._compiler

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

    def tool_call(self, call_format: str, tools: list[dict], tool_choice, parallel: bool) -> Grammar:
        """A grammar that makes the reply call a tool: `tool_choice` "required" (any of `tools`) or
        {"type": "function", "function": {"name": ...}}; `call_format` "hermes" or "llama"."""
        model = {"hermes": "qwen_3", "llama": "llama"}[call_format]

        def build(xgr, c):
            tag = xgr.get_model_structural_tag(
                model,
                tools=tools,
                tool_choice=tool_choice,
                reasoning="disabled",
                parallel_tool_calls=parallel,
                max_whitespace_cnt=2,  # see the module docstring: no unbounded whitespace
            )
            return c.compile_structural_tag(tag)

        return self._compile("tool_choice", build)
