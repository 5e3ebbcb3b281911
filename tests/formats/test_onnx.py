"""`yunque export --format onnx`: onnxruntime runs the exported decoder on CPU with yunque's logits, and a
greedy loop over its KV cache gives yunque's tokens."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from yunque.__main__ import main
from yunque.formats.hf import load_model, save_model
from yunque.generate import Sampling, generate
from yunque.model import ModelConfig, Transformer, causal_mask

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    attention_bias=True,
    tie_word_embeddings=False,
    architecture="Qwen2ForCausalLM",
    bos_token_id=1,
    eos_token_id=2,
    max_position_embeddings=128,
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Qwen2-shaped model (GQA, q/k/v bias) exported once through the CLI."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    m = Transformer(CFG)
    m.init_weights()
    with torch.no_grad():  # peaked predictions and non-trivial norms and biases, so greedy paths differ
        for n, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.1) if n.endswith(("norm.weight", ".bias")) else p.mul_(6.0)
    src = save_model(m, root / "model")
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    out = root / "onnx"
    assert main(["export", str(src), "--format", "onnx", "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return load_model(src, dtype=torch.float32), sess, out


def run(sess, ids: np.ndarray, mask: np.ndarray, pos: np.ndarray, past: list[np.ndarray] | None):
    B = ids.shape[0]
    if past is None:
        past = [np.zeros((B, CFG.num_key_value_heads, 0, CFG.head_size), np.float32)] * (2 * CFG.num_hidden_layers)
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
    feeds |= {f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p for i, p in enumerate(past)}
    logits, *present = sess.run(None, feeds)
    return logits, present


@pytest.mark.parametrize("family", ["llama", "mistral", "tied"])
def test_the_export_wrapper_computes_yunques_logits_and_tokens_in_pytorch(family):
    """What is traced, run eagerly: the concatenated cache, the mask (Mistral's window included) and
    left padding give `generate`'s tokens, for configurations the ONNX tests below do not export."""
    from yunque.formats.onnx_export import DecoderWithPast

    cfg = dataclasses.replace(
        CFG,
        architecture="LlamaForCausalLM",
        attention_bias=False,
        tie_word_embeddings=family == "tied",
        sliding_window=4 if family == "mistral" else None,
    )
    torch.manual_seed(1)
    m = Transformer(cfg)
    m.init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(6.0)
    m.eval()
    w = DecoderWithPast(m)
    prompts = [[1, 5, 9, 22, 40, 7, 3], [1, 17, 60, 4]]
    want = generate(m, prompts, Sampling(max_new_tokens=12), pad_id=0)
    P = 7
    ids = torch.tensor([prompts[0], [0, 0, 0] + prompts[1]])
    mask = (torch.arange(P) >= torch.tensor([[0], [3]])).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = tuple(torch.zeros(2, 2, 0, 16) for _ in range(4))
    got = []
    with torch.no_grad():
        for _ in range(12):
            logits, *past = w(ids, mask, pos, tuple(past))
            ids = logits[:, -1].argmax(-1, keepdim=True)
            got.append(ids[:, 0].tolist())
            pos, mask = pos[:, -1:] + 1, torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    assert [list(r) for r in zip(*got, strict=True)] == want


def test_graph_inputs_outputs_and_files(exported):
    _, sess, out = exported
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    assert list(ins)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert ins["input_ids"].shape == ["batch", "sequence_length"] and ins["input_ids"].type == "tensor(int64)"
    assert ins["attention_mask"].shape == ["batch", "total_sequence_length"]
    assert ins["past_key_values.1.value"].shape == ["batch", 2, "past_sequence_length", 16]
    assert list(outs) == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outs["logits"].shape == ["batch", "sequence_length", 96]
    assert outs["present.0.key"].shape == ["batch", 2, "total_sequence_length", 16]
    import onnx

    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.domain: o.version for o in m.opset_import}[""] == 23
    # the weights live in the external file, the graph file is small
    assert (out / "model.onnx.data").stat().st_size > 4 * CFG.vocab_size * CFG.hidden_size
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (out / "tokenizer.json").is_file()


def test_prefill_logits_match_yunque_with_left_padding(exported):
    model, sess, _ = exported
    prompts = [[1, 5, 9, 22, 40, 7, 3], [1, 17, 60, 4]]
    P = max(map(len, prompts))
    ids = torch.zeros(2, P, dtype=torch.long)
    valid = torch.zeros(2, P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], valid[i, P - len(p) :] = torch.tensor(p), True
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, pos, causal_mask(valid, torch.arange(P)))
    logits, present = run(sess, ids.numpy(), valid.long().numpy(), pos.numpy(), None)
    assert present[0].shape == (2, 2, P, 16)
    for i, p in enumerate(prompts):  # padding positions compute nothing anyone reads
        assert np.abs(logits[i, P - len(p) :] - ref[i, P - len(p) :].numpy()).max() <= 1e-4


def test_greedy_loop_over_the_onnx_kv_cache_gives_yunques_tokens(exported):
    model, sess, _ = exported
    prompts = [[1, 5, 9, 22, 40, 7, 3], [1, 17, 60, 4]]
    want = generate(model, prompts, Sampling(max_new_tokens=32), pad_id=0)
    assert len(set(map(tuple, want))) == 2 and all(len(w) == 32 for w in want)
    assert len(set(want[0])) > 3  # not a constant run: the cache is really read
    P = max(map(len, prompts))
    ids = np.zeros((2, P), np.int64)
    mask = np.zeros((2, P), np.int64)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :], mask[i, P - len(p) :] = p, 1
    pos = np.clip(mask.cumsum(-1) - 1, 0, None)
    logits, past = run(sess, ids, mask, pos, None)
    got = [[], []]
    for _ in range(32):
        nxt = logits[:, -1].argmax(-1)
        for row, t in zip(got, nxt, strict=True):
            row.append(int(t))
        pos = pos[:, -1:] + 1
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        logits, past = run(sess, nxt[:, None].astype(np.int64), mask, pos, past)
    assert got == want


def test_export_refuses_a_quantised_model_and_merges_an_adapter(exported, tmp_path, capsys):
    from yunque.formats.onnx_export import load_for_export
    from yunque.formats.peft import save_peft_adapter
    from yunque.lora import LoraConfig, apply_lora

    model, _, out = exported
    src = tmp_path / "m"
    save_model(model, src)
    q = tmp_path / "q"
    assert main(["quantize", str(src), "--bits", "8", "--out", str(q)]) == 0
    assert main(["export", str(q), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert "quantised for inference" in capsys.readouterr().err
    assert main(["export", str(src), "--format", "onnx", "--out", str(out)]) == 2  # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err
    # --adapter: the model exported is the adapter merged into the base, as `yunque generate` runs it
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"])
    lm = load_model(src)
    apply_lora(lm, cfg)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    save_peft_adapter(lm, tmp_path / "adapter", cfg, str(src))
    merged = load_for_export(src, tmp_path / "adapter")
    x = torch.tensor([[1, 5, 9, 22]])
    with torch.no_grad():
        assert torch.allclose(merged(x), lm(x), atol=1e-5)
        assert not torch.allclose(merged(x), model(x), atol=1e-2)
