"""Greedy generation identical to transformers.generate; sampling controls; streaming text."""

import pytest
import torch
from hf_models import tiny_hf_model

from yunque.formats.hf import load_model
from yunque.generate import Sampling, TextDecoder, generate, generate_tokens, sample_next


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(d)


def _hf_batched(hf, prompts, n, use_cache=True):
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    am = (ids != 0) | (torch.arange(P)[None] >= torch.tensor([P - len(p) for p in prompts])[:, None])
    out = hf.generate(
        ids,
        attention_mask=am.long(),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        use_cache=use_cache,
    )
    return out[:, P:].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(pair, use_cache):
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (6, 19, 11)]
    s = Sampling(max_new_tokens=32)
    assert generate(ours, prompts, s, use_cache=use_cache) == _hf_batched(hf, prompts, 32, use_cache)
    for p in prompts:  # unbatched too
        ref = hf.generate(
            torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None
        )[0, len(p) :].tolist()
        assert generate(ours, [p], s, use_cache=use_cache) == [ref]


def test_repetition_penalty_matches_transformers(pair):
    hf, ours = pair
    p = torch.randint(3, 320, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf.generate(
        torch.tensor([p]),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.3,
        pad_token_id=0,
        eos_token_id=None,
    )[0, len(p) :].tolist()
    assert generate(ours, [p], Sampling(max_new_tokens=20, repetition_penalty=1.3)) == [ref]


def test_stop_ids_end_rows_independently(pair):
    _, ours = pair
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    free = generate(ours, prompts, Sampling(max_new_tokens=12))
    stop = free[0][3]  # a token row 0 emits at step 4
    out = generate(ours, prompts, Sampling(max_new_tokens=12, stop_ids=[stop]))
    assert out[0] == free[0][: free[0].index(stop) + 1]
    assert out[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    s = Sampling(max_new_tokens=16, temperature=0.9, top_k=50, top_p=0.9, seed=123)
    a = generate(ours, [[4, 5, 6]], s)
    assert a == generate(ours, [[4, 5, 6]], s)
    assert a != generate(ours, [[4, 5, 6]], Sampling(**{**s.__dict__, "seed": 124}))


def test_top_k_one_is_greedy():
    logits = torch.randn(4, 50)
    s = Sampling(temperature=1.0, top_k=1, seed=0)
    assert torch.equal(sample_next(logits, None, s, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    s = Sampling(temperature=1.0, top_p=0.7)
    draws = {sample_next(logits, None, s, g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_generate_tokens_streams_per_step(pair):
    _, ours = pair
    steps = list(generate_tokens(ours, [[3, 4], [5, 6, 7]], Sampling(max_new_tokens=5)))
    assert len(steps) == 5 and all(len(s) == 2 for s in steps)


class _CharTok:
    """Byte-level toy tokenizer: ids are UTF-8 bytes, so multi-byte characters span ids."""

    pad_id = 0

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_decoder_never_splits_characters_and_holds_stop_prefix():
    dec = TextDecoder(_CharTok(), stop_strings=["STOP"])
    out = "".join(dec.add(b) for b in "año ST".encode())
    assert out == "año " and "\ufffd" not in out  # "ST" held back: may start "STOP"
    out += "".join(dec.add(b) for b in b"OP tail")
    assert dec.stopped and out == "año "


def test_scoring_in_the_prefill_equals_separate_scoring_and_changes_no_token(pair):
    """A continuation scored in the generation's prefill: the same log-likelihoods as
    score_continuations, and the same new tokens as a plain prefill (the continuation's cache
    slots are overwritten before any query reads them)."""
    from yunque.evaluate.perplexity import score_continuations
    from yunque.generate import ContinuationScore

    _, ours = pair
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (6, 19, 11, 2)]
    conts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (3, 1, 24, 9)]  # one longer than the answers
    s = Sampling(max_new_tokens=16)
    scores: list[ContinuationScore] = []
    assert generate(ours, prompts, s, score=conts, scores=scores) == generate(ours, prompts, s)
    want = score_continuations(ours, list(zip(prompts, conts)))
    assert [x.tokens for x in scores] == [len(c) for c in conts]
    for got, w in zip(scores, want):
        assert got.logprob == pytest.approx(w.logprob, rel=1e-5, abs=1e-4) and got.greedy == w.greedy
    # a continuation the model itself would produce is greedy, and that is seen
    first = generate(ours, prompts[:1], Sampling(max_new_tokens=5))[0]
    one: list[ContinuationScore] = []
    generate(ours, prompts[:1], s, score=[first], scores=one)
    assert one[0].greedy and one[0].tokens == 5
    with pytest.raises(ValueError, match="one non-empty continuation per prompt"):
        generate(ours, prompts, s, score=conts[:2], scores=[])
