"""Log-likelihood scoring and sliding-window perplexity against transformers on one checkpoint."""

import math

import pytest
import torch
from eval_helpers import cached_model_dir

from yunque.evaluate.perplexity import perplexity, score_continuations, sliding_windows


@pytest.fixture(scope="module")
def setup():
    import transformers

    from yunque.evaluate.loading import load_for_eval

    d = cached_model_dir("llama-gqa")
    model, tok = load_for_eval(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return model, tok, hf


def _hf_logprob(hf, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0].double(), -1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_perplexity_equals_transformers_loss(setup):
    model, tok, hf = setup
    texts = ["The cat sat on the mat. The dog ran in the park.", "A bird sang.", "Große Freude!"]
    r = perplexity(model, tok, texts, max_length=256, batch_size=2)
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([[tok.bos_id] + tok.encode(t)])
        with torch.no_grad():
            loss = hf(ids, labels=ids).loss.item()
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    assert r.tokens == n
    assert r.perplexity == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r.bytes == sum(len(t.encode()) for t in texts)
    assert r.bits_per_byte == pytest.approx(nll / math.log(2) / r.bytes, rel=1e-4)


@pytest.mark.parametrize("n,L,S", [(1, 4, 2), (10, 4, 2), (10, 4, 4), (10, 4, 1), (37, 8, 3), (8, 8, 4)])
def test_sliding_windows_score_every_token_once(n, L, S):
    ids = list(range(100, 100 + n))
    pairs = sliding_windows(ids, 0, L, S)
    scored = [t for _, cont in pairs for t in cont]
    assert scored == ids  # each token exactly once, in order
    for k, (ctx, cont) in enumerate(pairs):
        assert len(ctx) + len(cont) <= L + 1  # the model sees at most L tokens
        if k > 0:
            assert len(ctx) >= L - S + 1  # after the first window, at least L - S tokens of context


def test_sliding_window_perplexity_matches_windowed_reference(setup):
    model, tok, hf = setup
    text = "The quick brown fox jumps over the lazy dog. " * 6
    L, S = 24, 8
    r = perplexity(model, tok, [text], max_length=L, stride=S)
    nll = -sum(_hf_logprob(hf, ctx, cont) for ctx, cont in sliding_windows(tok.encode(text), tok.bos_id, L, S))
    assert r.nll == pytest.approx(nll, rel=1e-4)
    full = perplexity(model, tok, [text], max_length=256)
    assert r.perplexity != pytest.approx(full.perplexity, rel=1e-6)  # the window really limited the context


def test_score_continuations_batched_matches_transformers(setup):
    model, tok, hf = setup
    pairs = [
        ([tok.bos_id] + tok.encode(c), tok.encode(x))
        for c, x in [
            ("The cat sat on", " the mat."),
            ("A", " bird sang in the tree."),
            ("Spam offers win free money", " now"),
        ]
    ]
    one = score_continuations(model, pairs, batch_size=1)
    many = score_continuations(model, pairs, batch_size=3)  # different lengths in one batch
    for (ctx, cont), a, b in zip(pairs, one, many):
        want = _hf_logprob(hf, ctx, cont)
        assert a.logprob == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert b.logprob == pytest.approx(a.logprob, rel=1e-5, abs=1e-5)
        assert a.tokens == len(cont)


def test_greedy_flag_and_left_truncation(setup):
    model, tok, hf = setup
    ctx = [tok.bos_id] + tok.encode("The dog ran in the park.")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False)[0, len(ctx) :].tolist()
    s = score_continuations(model, [(ctx, greedy), (ctx, [(greedy[0] + 1) % tok.vocab_size])])
    assert s[0].greedy and not s[1].greedy
    long_ctx = ctx * 4
    cut = score_continuations(model, [(long_ctx, greedy)], max_length=10)[0]
    kept = (long_ctx + greedy)[-11 : -len(greedy)]
    assert cut.logprob == pytest.approx(_hf_logprob(hf, kept, greedy), rel=1e-4, abs=1e-4)


def test_bad_pairs_are_rejected(setup):
    model, tok, _ = setup
    with pytest.raises(ValueError, match="empty continuation"):
        score_continuations(model, [([1], [])])
    with pytest.raises(ValueError, match="empty context"):
        score_continuations(model, [([], [5])])
    with pytest.raises(ValueError, match="no texts"):
        perplexity(model, tok, [])
