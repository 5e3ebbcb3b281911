"""Log-likelihood scoring: continuations given contexts, and perplexity of long documents.

Everything reduces to `score_continuations`: a batch of (context ids, continuation ids) pairs
-> the summed log-probability of each continuation and whether greedy decoding would have
produced it. Perplexity, bits per byte, likelihood classification and the lm-eval adapter
are all built on it, so they agree with each other by construction.

Long documents are scored with a sliding window (as in Hugging Face's perplexity guide):
windows of `max_length` tokens advancing by `stride`; every token is scored exactly once, and
after the first window each one sees at least `max_length - stride` tokens of context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from yunque.generate import ContinuationScore, continuation_scores
from yunque.model import Transformer

Score = ContinuationScore  # (logprob summed over the continuation's tokens, greedy, tokens)


@torch.inference_mode()
def score_continuations(
    model: Transformer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    max_length: int | None = None,
) -> list[Score]:
    """Score each continuation given its context; a context too long is cut from the left.

    The model sees (context + continuation)[-(max_length + 1):][:-1], as lm-eval feeds it, and
    only the continuation's positions go through the output head (a vocabulary-sized row per
    scored token, not per input token)."""
    max_length = max_length or model.config.max_position_embeddings
    device = model.model.embed_tokens.weight.device
    inputs = []
    for i, (ctx, cont) in enumerate(pairs):
        if not cont:
            raise ValueError(f"pair {i}: empty continuation")
        if not ctx:
            raise ValueError(f"pair {i}: empty context (start it with a BOS/prefix token)")
        if len(cont) > max_length:
            raise ValueError(f"pair {i}: continuation of {len(cont)} tokens is longer than max_length {max_length}")
        whole = (list(ctx) + list(cont))[-(max_length + 1) :]
        inputs.append((whole[:-1], list(cont)))
    order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))  # similar lengths share a batch
    out: list[Score | None] = [None] * len(inputs)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        T = len(inputs[idx[0]][0])
        ids = torch.zeros(len(idx), T, dtype=torch.long, device=device)  # right padding: causal, never attended
        for r, i in enumerate(idx):
            ids[r, : len(inputs[i][0])] = torch.as_tensor(inputs[i][0])
        h = model.hidden(ids)  # (B, T, D)
        rows, cols, targets = [], [], []
        for r, i in enumerate(idx):
            inp, cont = inputs[i]
            n = len(inp)
            rows += [r] * len(cont)
            cols += range(n - len(cont), n)
            targets += cont
        for i, sc in zip(idx, continuation_scores(model, h, rows, cols, targets, [len(inputs[i][1]) for i in idx])):
            out[i] = sc
    return out  # type: ignore[return-value]


def sliding_windows(
    ids: Sequence[int], prefix_id: int, max_length: int, stride: int
) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that together score every token of `ids` exactly once.

    The sequence is [prefix_id] + ids; the first window's context is just the prefix token."""
    if not 0 < stride <= max_length:
        raise ValueError(f"stride {stride} must be in 1..max_length ({max_length})")
    x = [prefix_id, *ids]
    pairs, scored_to, begin = [], 1, 0
    while scored_to < len(x):
        end = min(begin + max_length + 1, len(x))  # a window feeds max_length tokens to the model
        first = max(scored_to, begin + 1)
        pairs.append((x[begin:first], x[first:end]))
        scored_to = end
        begin += stride
    return pairs


@dataclass
class PerplexityResult:
    perplexity: float
    bits_per_byte: float
    nll: float  # total negative log-likelihood (nats)
    tokens: int
    bytes: int
    documents: int


def perplexity(
    model: Transformer,
    tokenizer,
    texts: Sequence[str],
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> PerplexityResult:
    """Token perplexity and bits per byte of `texts` (each a separate document).

    Bits per byte (total nats / ln 2 / UTF-8 bytes) does not depend on the tokenizer, so it
    compares models with different vocabularies; perplexity does not."""
    if not texts:
        raise ValueError("no texts to score")
    max_length = max_length or min(model.config.max_position_embeddings, 2048)
    stride = stride or max(1, max_length // 2)
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start documents with")
    pairs = []
    n_bytes = 0
    for text in texts:
        ids = tokenizer.encode(text)
        n_bytes += len(text.encode("utf-8"))
        if ids:
            pairs += sliding_windows(ids, prefix, max_length, stride)
    if not pairs:
        raise ValueError("the texts hold no tokens")
    scores = score_continuations(model, pairs, batch_size, max_length)
    nll = -sum(s.logprob for s in scores)
    tokens = sum(s.tokens for s in scores)
    return PerplexityResult(
        perplexity=math.exp(nll / tokens),
        bits_per_byte=nll / math.log(2) / max(n_bytes, 1),
        nll=nll,
        tokens=tokens,
        bytes=n_bytes,
        documents=len(texts),
    )
