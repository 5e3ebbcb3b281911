"""Greedy generation identical to transformers.generate; sampling controls; streaming text."""

import pytest
import torch
from hf_models import tiny_hf_model

from yunque.formats.hf import load_model
from yunque.generate import Sampling, TextDecoder, generate, generate_tokens, sample_next
from yunque.model import ModelConfig, Transformer


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
    out = hf.generate(ids, attention_mask=am.long(), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None, use_cache=use_cache)
    return out[:, P:].tolist()


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(pair, use_cache):
    hf, ours = pair
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (6, 19, 11)]
    s = Sampling(max_new_tokens=32)
    assert generate(ours, prompts, s, use_cache=use_cache) == _hf_batched(hf, prompts, 32, use_cache)
    for p in prompts:  # unbatched too
        ref = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        assert generate(ours, [p], s, use_cache=use_cache) == [ref]


def test_repetition_penalty_matches_transformers(pair):
    hf, ours = pair
    p = torch.randint(3, 320, (9,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                      repetition_penalty=1.3, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
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
    out += "".join(dec.add(b) for b in "OP tail".encode())
    assert dec.stopped and out == "año "


@pytest.mark.parametrize("pack", [True, False])
def test_decode_layout_keeps_values_and_greedy_output(pair, tmp_path, pack):
    """inference.load re-lays linear weights for CPU decode (oneDNN-packed, or column-major):
    same state dict, same greedy tokens, and the model still saves and reloads."""
    from yunque.formats.hf import save_model
    from yunque.cpu.decode import PackedLinear, arrange_for_decode_

    hf, ours = pair
    prompts = [[5, 9, 11, 3], [7, 8]]
    before = generate(ours, prompts, Sampling(max_new_tokens=12))
    logits = ours(torch.tensor([[5, 9, 11, 3]]))
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    d = tmp_path / "m"
    save_model(ours, d)
    model = load_model(d)
    n_lin = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert arrange_for_decode_(model, pack=pack) == n_lin
    if pack:
        tied = model.config.tie_word_embeddings  # a tied head stays the embedding's plain tensor
        assert sum(isinstance(m, PackedLinear) for m in model.modules()) == n_lin - tied
    else:
        lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in lin)
    assert sd.keys() == model.state_dict().keys()
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    # oneDNN sums in another order than MKL: rounding-level differences only.
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[5, 9, 11, 3]])), logits, atol=1e-5, rtol=1e-5)
    if pack:  # no backward: a forward that would need one fails loudly instead of losing gradients
        with pytest.raises(RuntimeError, match="inference-only"):
            model(torch.tensor([[5, 9, 11, 3]]))
    assert generate(model, prompts, Sampling(max_new_tokens=12)) == before
    save_model(model, tmp_path / "again")
    assert all(torch.equal(v, sd[k]) for k, v in load_model(tmp_path / "again").state_dict().items())
    assert arrange_for_decode_(model, pack=pack) == 0  # idempotent


def test_decode_layout_bf16_and_tied_head(tmp_path):
    from yunque.cpu.decode import PackedLinear, arrange_for_decode_

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    prompts = [[5, 9, 11, 3]]
    before = generate(model, prompts, Sampling(max_new_tokens=8))
    arrange_for_decode_(model)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    assert generate(model, prompts, Sampling(max_new_tokens=8)) == before
