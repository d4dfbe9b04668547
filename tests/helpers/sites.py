"""A tiny random model of any family with O(1) activations, for the site tests."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig


def _build(config: PretrainedConfig) -> nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Re-initialise so activations are O(1): with the default std=0.02 init the attention and
    # MLP contributions are tiny and an atol=1e-5 identity would hardly test anything.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
            else:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.float().eval()
