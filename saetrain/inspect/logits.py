"""Which tokens a latent promotes: its decoder direction through the final norm and unembedding.

From the weights alone (no data): effect[j] = W_U · (g ⊙ d_j), with d_j the latent's decoder row
and g the final norm's gain (Gemma's RMSNorm scales by 1 + weight; a LayerNorm also removes the
mean, which is applied to the direction). The norm's division by the residual's RMS is left out:
it scales every token alike and does not change the order. Only directions in the residual
stream have logit effects: a dictionary writing attn_z (n_heads × head_dim) has none.
"""

from __future__ import annotations

import torch
from torch import nn

from saetrain.activations.sites import model_family

# Where each family keeps its final norm (from the *ForCausalLM model).
FINAL_NORMS = {
    "llama": "model.norm",
    "mistral": "model.norm",
    "qwen2": "model.norm",
    "qwen3": "model.norm",
    "gemma2": "model.norm",
    "gemma3_text": "model.norm",
    "gpt2": "transformer.ln_f",
    "gpt_neox": "gpt_neox.final_layer_norm",
}


def final_norm(model: nn.Module) -> tuple[torch.Tensor | None, bool]:
    """(the final norm's effective gain [d_model] or None, whether it centres like LayerNorm)."""
    module: nn.Module | None = model
    for part in FINAL_NORMS[model_family(model)].split("."):
        module = getattr(module, part, None)
    weight = getattr(module, "weight", None)
    if module is None or weight is None:
        return None, False
    gain = weight.detach().float()
    if "gemma" in type(module).__name__.lower():
        gain = 1.0 + gain  # Gemma's RMSNorm: x̂ · (1 + weight)
    return gain, isinstance(module, nn.LayerNorm)


def unembedding(model: nn.Module) -> torch.Tensor:
    """W_U [vocab, d_model]: the LM head's weight."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head)")
    return head.weight.detach()


@torch.no_grad()
def logit_effects(
    W_dec: torch.Tensor,
    W_U: torch.Tensor,
    gain: torch.Tensor | None = None,
    centre: bool = False,
    k: int = 10,
    chunk: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top ids, top values, bottom ids, bottom values), each [n, k], of W_U · (g ⊙ d_j).

    Computed `chunk` latents at a time so that n × vocab is never held at once.
    """
    n = W_dec.shape[0]
    k = min(k, W_U.shape[0])
    W_U = W_U.float()
    out = [torch.empty(n, k, dtype=torch.int64), torch.empty(n, k),
           torch.empty(n, k, dtype=torch.int64), torch.empty(n, k)]  # fmt: skip
    for start in range(0, n, chunk):
        d = W_dec[start : start + chunk].to(W_U.device, torch.float32)
        if centre:
            d = d - d.mean(dim=1, keepdim=True)
        if gain is not None:
            d = d * gain.to(d.device)
        effects = d @ W_U.T
        top, bottom = effects.topk(k, dim=1), effects.topk(k, dim=1, largest=False)
        stop = start + d.shape[0]
        out[0][start:stop], out[1][start:stop] = top.indices.cpu(), top.values.cpu()
        out[2][start:stop], out[3][start:stop] = bottom.indices.cpu(), bottom.values.cpu()
    return out[0], out[1], out[2], out[3]


def model_logit_effects(
    model: nn.Module, W_dec: torch.Tensor, k: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`logit_effects` through `model`'s final norm and head; None when the decoder's width is
    not the residual stream's (nothing to unembed)."""
    W_U = unembedding(model)
    if W_dec.shape[1] != W_U.shape[1]:
        return None
    gain, centre = final_norm(model)
    return logit_effects(W_dec, W_U, gain, centre, k)
