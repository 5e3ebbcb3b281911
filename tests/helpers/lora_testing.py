"""Shared by the LoRA, merge and PEFT-format tests."""

import torch

from yunque.lora import lora_modules


def perturb(model, seed=1, std=0.1):
    """Training-like adapter values: B no longer zero, A moved off its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.add_(torch.randn(m.lora_A.weight.shape, generator=g) * std)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)
