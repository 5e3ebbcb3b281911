"""Greedy continuations from llama.cpp (through llama-cpp-python, an optional peer) and from yunque."""

from __future__ import annotations

import numpy as np


def greedy_llama_cpp(llama_cpp, path, prompts: list[list[int]], n: int) -> list[list[int]]:
    """`n` greedy tokens after each prompt (ids, BOS included), from llama.cpp's own logits."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_batch=512, n_threads=2, verbose=False)
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
