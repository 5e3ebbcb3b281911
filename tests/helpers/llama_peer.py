"""llama.cpp (through llama-cpp-python, an optional peer) and yunque on the same prompts: greedy
continuations and per-position logits."""

from __future__ import annotations

import numpy as np


def open_llama_cpp(llama_cpp, path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)


def logits_llama_cpp(llm, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (teacher-forced)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def greedy_llama_cpp(llm, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens after each prompt (ids, BOS included), from llama.cpp's own logits."""
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(n):
            got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval(got[-1:])
        out.append(got)
    return out


def greedy_yunque(src, prompts: list[list[int]], n: int) -> list[list[int]]:
    from yunque.generate import Sampling, generate
    from yunque.inference import load

    model, _ = load(src, dtype="float32", device="cpu")
    return [generate(model, [ids], Sampling(max_new_tokens=n))[0] for ids in prompts]
