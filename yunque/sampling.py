"""The one sampler of `yunque generate` and the serving engine: logits (B, V) -> next ids (B,).

Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a multinomial draw.
The server applies OpenAI's frequency/presence penalties (`penalize_counts`) before all of these.
Temperature and top-p are one number for the whole batch or a (B,) tensor, one per row (the
engine batches requests with different settings); a row at temperature 0 is greedy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Hugging Face's repetition penalty: logits of tokens marked in `seen` (B, V) move toward 0."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def penalize_counts(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's frequency and presence penalties, one of each per row ((B,) tensors):
    `logits[j] - counts[j] * frequency - (counts[j] > 0) * presence`, where `counts` (B, V)
    is how often each token was sampled so far (the completion's tokens, not the prompt's).
    Positive values make repeats less likely, negative ones more."""
    counts = counts.to(logits.dtype)
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    row_generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next ids (B,) from `logits` (B, V).

    Rows draw together from `generator` (None: torch's global one), except a row with its own
    entry in `row_generators` (a request's `seed`): it draws from that alone, so its output
    does not depend on what else is in the batch.
    """
    logits = logits.float()
    greedy = logits.argmax(-1)
    if isinstance(temperature, torch.Tensor):
        hot = temperature > 0
        if not bool(hot.any()):
            return greedy
        x = logits / temperature.clamp(min=1e-5)[:, None]  # greedy rows are overwritten below
    else:
        if temperature <= 0:
            return greedy
        hot = torch.ones_like(greedy, dtype=torch.bool)
        x = logits / temperature
    if top_k > 0:
        kth = torch.topk(x, min(top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if bool((torch.as_tensor(top_p) < 1).any()):
        x = _top_p(x, top_p[:, None] if isinstance(top_p, torch.Tensor) else top_p)
    probs = x.softmax(-1)
    own = list(row_generators) if row_generators is not None else [None] * len(greedy)
    hot_rows = hot.tolist()
    shared = [i for i, (h, g) in enumerate(zip(hot_rows, own, strict=True)) if h and g is None]
    if len(shared) == len(greedy):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    out = greedy.clone()
    if shared:
        out[shared] = torch.multinomial(probs[shared], 1, generator=generator).squeeze(-1)
    for i, (h, g) in enumerate(zip(hot_rows, own, strict=True)):
        if h and g is not None:
            out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out


def _top_p(x: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = sorted_x.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p
    return torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
