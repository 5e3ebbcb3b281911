"""The decode layout (yunque/cpu/decode.py): oneDNN-packed or column-major linears, same values and tokens."""

import pytest
import torch
from hf_models import tiny_hf_model

from yunque.cpu.decode import PackedLinear, arrange_for_decode_
from yunque.formats.hf import load_model, save_model
from yunque.generate import Sampling, generate
from yunque.model import ModelConfig, Transformer


@pytest.fixture(scope="module", params=["llama-gqa", "qwen2", "mistral"])
def pair(request, tmp_path_factory):
    hf = tiny_hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(d)


@pytest.mark.parametrize("pack", [True, False])
def test_decode_layout_keeps_values_and_greedy_output(pair, tmp_path, pack):
    """inference.load re-lays linear weights for CPU decode (oneDNN-packed, or column-major):
    same state dict, same greedy tokens, and the model still saves and reloads."""
    _, ours = pair
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
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
    )
    model.init_weights()
    model = model.to(torch.bfloat16).eval()
    prompts = [[5, 9, 11, 3]]
    before = generate(model, prompts, Sampling(max_new_tokens=8))
    arrange_for_decode_(model)
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert isinstance(model.model.layers[0].mlp.up_proj, PackedLinear)
    assert generate(model, prompts, Sampling(max_new_tokens=8)) == before
