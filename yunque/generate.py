"""Generation: one prefill, then `decode_one_token` over the static KV cache.

Prompts of different lengths are left-padded into one batch; padded key slots are masked
and RoPE positions count only real tokens, so a padded row computes what it would alone.
Sampling (Hugging Face's order: repetition penalty, temperature, top-k, top-p) is yunque.sampling's,
shared with the serving engine.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from yunque.errors import YunqueError
from yunque.model import Transformer, causal_mask
from yunque.sampling import penalize_repeats, sample


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = field(default_factory=tuple)


def sample_next(
    logits: torch.Tensor, seen: torch.Tensor | None, s: Sampling, gen: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). `seen` (B, V) bool marks tokens for the repetition penalty."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repeats(logits, seen, s.repetition_penalty)
    return sample(logits, s.temperature, s.top_p, s.top_k, generator=gen)


def decode_one_token(
    model: Transformer, tok: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """tok (B, 1), pos (B, 1), slot (1,), mask (B, 1, 1, S) -> logits (B, V)."""
    return model(tok, pos, mask, slot)[:, -1]


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros((len(prompts), P), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, P - len(p) :] = torch.as_tensor(list(p), dtype=torch.long, device=device)
            valid[i, P - len(p) :] = True
    return ids, valid


class EmptyPrompt(YunqueError, ValueError):
    """A prompt with no tokens: a user error (one line, exit 2), still a ValueError for API callers."""


class PromptTooLong(YunqueError, ValueError):
    """Prompt plus new tokens longer than the model's context."""


@dataclass
class ContinuationScore:
    logprob: float  # summed over the continuation's tokens (natural log)
    greedy: bool  # every token was the argmax
    tokens: int


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    s: Sampling,
    pad_id: int = 0,
    use_cache: bool = True,
    score: Sequence[Sequence[int]] | None = None,
    scores: list[ContinuationScore] | None = None,
) -> Iterator[list[int | None]]:
    """Yields, per step, each row's new token (None once that row has stopped).

    `score` (one non-empty continuation per prompt, e.g. a reference answer) is scored in the
    same prefill, its `ContinuationScore`s appended to `scores` before the first yield: an
    evaluation that wants both the answer and the reference's likelihood runs the prompt once."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EmptyPrompt(
            "every prompt needs at least one token (an empty prompt, or a chat template that rendered nothing)"
        )
    if score is not None and (len(score) != len(prompts) or any(len(c) == 0 for c in score) or not use_cache):
        raise ValueError("score needs one non-empty continuation per prompt, and the cache")
    device = model.model.embed_tokens.weight.device
    B = len(prompts)
    ids, valid_prompt = _left_pad(prompts, pad_id, device)
    P = ids.shape[1]
    R = max(len(c) for c in score) if score is not None else 0
    S = P + max(s.max_new_tokens, R)
    if S > model.config.max_position_embeddings:
        # Past the context the model was built for, and the (S x S) mask alone grows without bound:
        # a 100k-token prompt would ask for 10 GB before the first step.
        raise PromptTooLong(
            f"prompt of {P} tokens + max_new_tokens {s.max_new_tokens}"
            + (f" (or the scored continuation's {R})" if R > s.max_new_tokens else "")
            + f" exceeds the model's context of {model.config.max_position_embeddings} tokens (max_position_embeddings)"
        )
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[:, :P] = valid_prompt
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S): real tokens count from 0
    window = model.config.sliding_window
    full_mask = causal_mask(valid, torch.arange(S, device=device), window)  # (B, 1, S, S), sliced per step
    gen = torch.Generator(device=device).manual_seed(s.seed) if s.seed is not None else None
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, ids, valid_prompt)
    stop = torch.tensor(sorted(set(s.stop_ids)) or [-1], device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    tokens = ids
    if use_cache:
        model.setup_cache(B, S)
    try:
        all_slots = torch.arange(S, device=device)
        if score is not None:
            logits = _prefill_scoring(model, ids, valid_prompt, score, pad_id, S, window, scores)
        elif use_cache:
            # Only the last position's logits are needed: the head over all P positions would cost
            # B x P x V (gigabytes for a 128k vocabulary) for nothing.
            logits = model.lm_head(model.hidden(ids, positions[:, :P], full_mask[:, :, :P], all_slots[:P])[:, -1])
        else:
            logits = model(ids, positions[:, :P], full_mask[:, :, :P, :P])[:, -1]
        for step in range(s.max_new_tokens):
            nxt = sample_next(logits, seen, s, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = nxt.tolist()
            yield [None if d else t for t, d in zip(out, done.tolist())]
            done |= torch.isin(nxt, stop)
            if bool(done.all()) or step == s.max_new_tokens - 1:
                return
            if seen is not None:
                seen[torch.arange(B, device=device), nxt] |= ~done
            cur = P + step
            if use_cache:
                logits = decode_one_token(
                    model,
                    nxt[:, None],
                    positions[:, cur : cur + 1],
                    all_slots[cur : cur + 1],
                    full_mask[:, :, cur : cur + 1],
                )
            else:
                tokens = torch.cat([tokens, nxt[:, None]], dim=1)
                logits = model(tokens, positions[:, : cur + 1], full_mask[:, :, : cur + 1, : cur + 1])[:, -1]
    finally:
        if use_cache:
            model.clear_cache()


def _prefill_scoring(
    model: Transformer,
    ids: torch.Tensor,
    valid_prompt: torch.Tensor,
    score: Sequence[Sequence[int]],
    pad_id: int,
    S: int,
    window: int | None,
    scores: list[ContinuationScore] | None,
) -> torch.Tensor:
    """The prefill of left-padded prompts (B, P) with each row's continuation after it (right-padded
    to R): the continuations' scores, and the logits of the first new token (B, V). The continuation
    fills cache slots P.., which decoding overwrites one by one before any query may read them."""
    B, P = ids.shape
    R = max(len(c) for c in score)
    ext = torch.full((B, R), pad_id, dtype=torch.long, device=ids.device)
    valid = torch.zeros(B, S, dtype=torch.bool, device=ids.device)
    valid[:, :P] = valid_prompt
    for i, c in enumerate(score):
        ext[i, : len(c)] = torch.as_tensor(list(c), dtype=torch.long, device=ids.device)
        valid[i, P : P + len(c)] = True
    positions = (valid[:, : P + R].long().cumsum(-1) - 1).clamp(min=0)  # the continuation goes on from the prompt
    slots = torch.arange(P + R, device=ids.device)
    h = model.hidden(torch.cat([ids, ext], 1), positions, causal_mask(valid, slots, window), slots)  # (B, P+R, D)
    # Position P-1+j predicts continuation token j.
    rows = [i for i, c in enumerate(score) for _ in c]
    cols = [P - 1 + j for c in score for j in range(len(c))]
    got = continuation_scores(model, h, rows, cols, [t for c in score for t in c], [len(c) for c in score])
    if scores is not None:
        scores += got
    return model.lm_head(h[:, P - 1])


def continuation_scores(
    model: Transformer, h: torch.Tensor, rows: list[int], cols: list[int], targets: list[int], lengths: list[int]
) -> list[ContinuationScore]:
    """Scores of the continuations whose tokens `targets` are predicted from h[rows, cols] (hidden
    states (B, T, D); rows number the continuations, `lengths` their tokens). Only those positions
    go through the head: a vocabulary-sized row per scored token, not per input token."""
    dev = h.device
    rows_t, target = torch.tensor(rows, device=dev), torch.tensor(targets, device=dev)
    z = model.lm_head(h[rows_t, torch.tensor(cols, device=dev)]).float()  # (N, V)
    lp = torch.log_softmax(z, -1).gather(1, target[:, None]).squeeze(1).double()
    n = len(lengths)
    sums = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, rows_t, lp)
    misses = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, rows_t, (z.argmax(-1) != target).long())
    return [ContinuationScore(float(sums[i]), bool(misses[i] == 0), lengths[i]) for i in range(n)]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    s: Sampling,
    pad_id: int = 0,
    use_cache: bool = True,
    score: Sequence[Sequence[int]] | None = None,
    scores: list[ContinuationScore] | None = None,
) -> list[list[int]]:
    """New token ids per prompt, ending with the stop token when one was produced (`score`,
    `scores`: as in `generate_tokens`)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in generate_tokens(model, prompts, s, pad_id, use_cache, score, scores):
        for row, t in zip(out, step):
            if t is not None:
                row.append(t)
    return out


class TextDecoder:
    """Turns a growing list of ids into safe text deltas: never splits a UTF-8 character,
    and holds back any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self.tok, self.stops = tokenizer, [x for x in stop_strings if x]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        for st in self.stops:
            i = text.find(st)
            if i >= 0:
                self.stopped = True
                return self._emit(text[:i])
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
            return ""
        hold = max((k for st in self.stops for k in range(1, len(st)) if text.endswith(st[:k])), default=0)
        return self._emit(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._emit(self.tok.decode(self.ids, skip_special_tokens=True))

    def _emit(self, text: str) -> str:
        delta = text[self.emitted :] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        return delta


def stream_text(model: Transformer, tokenizer, prompt_ids: Sequence[int], s: Sampling) -> Iterator[str]:
    """Text deltas for one prompt, stopping at stop ids or stop strings."""
    dec = TextDecoder(tokenizer, s.stop_strings)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for (t,) in generate_tokens(model, [prompt_ids], s, pad):
        if t is None:
            break
        if t in s.stop_ids:
            break
        delta = dec.add(t)
        if delta:
            yield delta
        if dec.stopped:
            return
    tail = dec.flush()
    if tail:
        yield tail


def complete(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], s: Sampling) -> list[str]:
    """Batched generation returning text, cut at stop ids and stop strings."""
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    outs = generate(model, prompts, s, pad)
    texts = []
    for ids in outs:
        ids = [t for t in ids if t not in set(s.stop_ids)]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(st) for st in s.stop_strings if st) if i >= 0), default=len(text))
        texts.append(text[:cut])
    return texts
