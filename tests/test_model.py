"""Logit parity with transformers for every supported family and option (fp32, padded batches)."""

import pytest
import torch
import torch.nn.functional as F
from hf_models import FAMILIES, tiny_hf_model

from yunque.formats.hf import load_model
from yunque.model import ModelConfig, Transformer, causal_mask, document_mask
from yunque.ops import Segments, decode_attention


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        hf = tiny_hf_model(fam)
        d = tmp_path_factory.mktemp(fam)
        hf.save_pretrained(d)
        out[fam] = (hf, load_model(d))
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_parity_padded_batch(pairs, family):
    hf, ours = pairs[family]
    g = torch.Generator().manual_seed(0)
    lengths = [40, 23, 9]
    T = max(lengths)
    ids = torch.randint(3, 320, (3, T), generator=g)
    valid = torch.arange(T)[None] >= torch.tensor([T - n for n in lengths])[:, None]  # left padding
    ids[~valid] = 0
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=valid.long(), position_ids=positions).logits
        got = ours(ids, positions, causal_mask(valid, torch.arange(T), ours.config.sliding_window))
    diff = (ref - got).abs()[valid].max().item()
    assert diff <= 1e-4, f"{family}: max |logit diff| {diff}"


def test_padded_row_equals_unpadded(pairs):
    _, m = pairs["llama-gqa"]
    ids = torch.randint(3, 320, (1, 12))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    valid = torch.arange(17)[None] >= 5
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = m(ids)
        b = m(padded, pos, causal_mask(valid, torch.arange(17)))[:, 5:]
    assert (a - b).abs().max() < 1e-5


def test_document_mask_isolates_packed_documents(pairs):
    _, m = pairs["llama"]
    a, b = torch.randint(3, 320, (1, 7)), torch.randint(3, 320, (1, 9))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 7 + [1] * 9])
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        together = m(packed, pos, document_mask(doc))
        alone = torch.cat([m(a), m(b)], dim=1)
    assert (together - alone).abs().max() < 1e-5


def test_row_starts_of_segments():
    seg = Segments((9, 5, 2, 16))
    want = torch.tensor([[0] * 9 + [9] * 5 + [14] * 2, [0] * 16], dtype=torch.int32)
    assert torch.equal(seg.row_starts(2, 16), want)


@pytest.mark.parametrize("family", ["llama-gqa", "mistral"])
def test_segments_match_each_document_alone(pairs, family):
    """Packed rows (padding is its own document) through Segments: outputs and input
    gradients equal running each document on its own; Mistral's window (7) cuts inside one."""
    _, m = pairs[family]
    g = torch.Generator().manual_seed(1)
    rows = [[9, 5, 2], [16]]  # document lengths per row of 16: row 0 ends with 2 padding tokens
    ids = torch.randint(3, 320, (2, 16), generator=g)
    doc = torch.tensor([[0] * 9 + [1] * 5 + [2] * 2, [0] * 16])
    pos = torch.cat([torch.arange(n) for r in rows for n in r]).view(2, 16)
    seg = Segments.from_doc_ids(doc)
    assert seg.lengths == (9, 5, 2, 16)
    x = m.model.embed_tokens(ids).detach().requires_grad_()
    m.model.embed_tokens.forward = lambda _ids: x  # so the gradient reaches a leaf we can read
    try:
        out = m(ids, pos, seg)
        out.square().sum().backward()
    finally:
        del m.model.embed_tokens.forward
    flat_ids, flat_out, flat_grad = ids.view(-1), out.view(32, -1), x.grad.view(32, -1)
    start = 0
    for n in seg.lengths:
        piece = flat_ids[start : start + n][None]
        xa = m.model.embed_tokens(piece).detach().requires_grad_()
        m.model.embed_tokens.forward = lambda _ids: xa  # noqa: B023
        try:
            alone = m(piece)
            alone.square().sum().backward()
        finally:
            del m.model.embed_tokens.forward
        torch.testing.assert_close(flat_out[start : start + n], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(flat_grad[start : start + n], xa.grad[0], atol=1e-4, rtol=1e-4)
        start += n
    m.zero_grad()


def test_bf16_close_to_hf(pairs):
    hf, ours = pairs["llama-gqa"]
    ids = torch.randint(3, 320, (2, 16))
    with torch.no_grad():
        ref = hf.to(torch.bfloat16)(ids).logits.float()
        got = ours.to(torch.bfloat16)(ids).float()
    hf.float(), ours.float()
    assert (ref - got).abs().max() < 0.05


@pytest.mark.parametrize("n_kv", [8, 2])
def test_decode_attention_equals_sdpa(n_kv):
    """The single-query path (CPU bf16 decode) computes what SDPA does, GQA and padding included."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 1, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, n_kv, 10, 16, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.rand(3, 1, 1, 10, generator=g) > 0.4
    mask[..., -1] = True  # the query's own slot
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=n_kv != 8)
    torch.testing.assert_close(decode_attention(q, k, v, mask), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        decode_attention(q, k, v, None), torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != 8)
    )


def test_gradient_checkpointing_same_grads():
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    m = Transformer(cfg)
    m.init_weights()
    ids = torch.randint(0, 64, (2, 10))
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m.train()
        m(ids).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_segment_attention_runs_short_segments_in_fp32_under_autocast():
    """bf16 on CPU: each segment is attended in fp32 (the CPU flash kernel is faster there) and the
    output rounded once, even inside autocast (which would cast SDPA's inputs back to bf16)."""
    from yunque.ops import segment_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 16, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = segment_attention(q, k, v, (5, 7), None, False)
    assert got.dtype == torch.bfloat16
    want = []
    for a, b in ((0, 5), (5, 12)):
        y = F.scaled_dot_product_attention(
            q[:, :, a:b].float(), k[:, :, a:b].float(), v[:, :, a:b].float(), is_causal=True
        )
        want.append(y[0].transpose(0, 1).reshape(b - a, -1))
    assert torch.equal(got[0], torch.cat(want).bfloat16())
