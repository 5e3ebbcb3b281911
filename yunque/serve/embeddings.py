"""`POST /v1/embeddings`: pooling of the last hidden state and OpenAI's response shape.

The vector of an input is its final-normed last hidden state (what Hugging Face calls
`last_hidden_state`), pooled over the input's tokens: "mean" (the default) averages every
token, "last" takes the last one (the only token that has seen the whole input in a causal
model). With `normalize` (the default, as OpenAI's embeddings are) it has length 1, so a dot
product is the cosine similarity. A text input is tokenized as a completion prompt is (with
BOS); a token-id input is used as given. The forward itself runs in the engine thread
(`Engine.embed`), between decode steps.
"""

from __future__ import annotations

import base64

import torch


def pool(hidden: torch.Tensor, how: str, normalize: bool) -> torch.Tensor:
    """One input's hidden states (T, D) -> its vector (D,), in float32."""
    h = hidden.float()
    v = h.mean(0) if how == "mean" else h[-1]
    return torch.nn.functional.normalize(v, dim=0) if normalize else v


def encode(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of little-endian float32."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def response(vectors: list[torch.Tensor], encoding_format: str, model: str, prompt_tokens: int) -> dict:
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v, encoding_format)} for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
