"""Tiny random Hugging Face models: the oracle for parity tests (built here, never downloaded)."""

import torch

FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"]),
    "llama-gqa": dict(architectures=["LlamaForCausalLM"], num_key_value_heads=2),
    "llama3-rope": dict(
        architectures=["LlamaForCausalLM"],
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama-tied": dict(architectures=["LlamaForCausalLM"], tie_word_embeddings=True, num_key_value_heads=1),
    "llama-bias": dict(architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=True),
    "mistral": dict(architectures=["MistralForCausalLM"], num_key_value_heads=2, sliding_window=7),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], num_key_value_heads=2, tie_word_embeddings=True),
}


def tiny_hf_model(family: str, seed: int = 0, vocab_size: int = 320):
    import transformers

    kw = dict(FAMILIES[family])
    arch = kw.pop("architectures")[0]
    cfg_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[arch]
    cfg = cfg_cls(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **{"num_key_value_heads": 4, **kw},
    )
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so parity covers them too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model
