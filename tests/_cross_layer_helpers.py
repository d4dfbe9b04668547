"""Independent float64 references for the cross-layer dictionaries' tests (test_cross_layer_*.py).

Nothing here calls saetrain's encode / decode / loss code: the CLT and crosscoder formulas are
written out densely from the spec (issue 12, Ameisen et al. 2025, Lindsey et al. 2024).
"""

from __future__ import annotations

from pathlib import Path

import torch


def clt_weights(clt) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(W_enc per layer [d, n], b_enc per layer [n], W_dec per layer [n, (L−ℓ)·d], b_dec [L·d]),
    float64 copies."""
    L, n = clt.n_layers, clt.layer_latents
    W_enc = [clt.W_enc[l].detach().double() for l in range(L)]
    b_enc = [clt.b_enc[l * n : (l + 1) * n].detach().double() for l in range(L)]
    W_dec = [W.detach().double() for W in clt.W_dec]
    return W_enc, b_enc, W_dec, clt.b_dec.detach().double()


def dense_clt_pre(clt, x: torch.Tensor) -> list[torch.Tensor]:
    """pre^ℓ = x^ℓ·W_enc^ℓ + b_enc^ℓ, per layer, float64."""
    W_enc, b_enc, _, _ = clt_weights(clt)
    d = clt.layer_d_in
    x = x.double()
    return [x[:, l * d : (l + 1) * d] @ W_enc[l] + b_enc[l] for l in range(clt.n_layers)]


def dense_activation(arch: str, pre: torch.Tensor, k: int | None = None,
                     threshold: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's codes from its pre-activations, written out: topk (k largest, ReLU'd),
    jumprelu (pre·1[pre > θ]), relu."""
    if arch == "topk":
        assert k is not None
        idx = pre.topk(k, dim=-1).indices
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, idx, True)
        return torch.where(keep, pre.clamp_min(0), torch.zeros_like(pre))
    if arch == "jumprelu":
        assert threshold is not None
        return torch.where(pre > threshold.double(), pre, torch.zeros_like(pre))
    if arch == "relu":
        return pre.clamp_min(0)
    raise ValueError(arch)


def dense_clt_decode(clt, codes: list[torch.Tensor]) -> torch.Tensor:
    """ŷ^ℓ' = Σ_{ℓ≤ℓ'} a^ℓ·W_dec^{ℓ→ℓ'} + b_dec^ℓ' with W_dec^{ℓ→ℓ'} = slot ℓ'−ℓ of W_dec[ℓ]."""
    _, _, W_dec, b_dec = clt_weights(clt)
    L, d = clt.n_layers, clt.layer_d_out
    outs = []
    for lp in range(L):
        y = b_dec[lp * d : (lp + 1) * d].clone()
        for l in range(lp + 1):
            j = lp - l
            y = y + codes[l].double() @ W_dec[l][:, j * d : (j + 1) * d]
        outs.append(y)
    return torch.cat(outs, dim=-1)


def dense_clt_forward(clt, arch: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, L·n], prediction [N, L·d_out]) of a CLT without skip, float64."""
    n = clt.layer_latents
    thr = getattr(clt, "threshold", None)
    codes = []
    for l, pre in enumerate(dense_clt_pre(clt, x)):
        t = thr[l * n : (l + 1) * n].detach() if thr is not None else None
        codes.append(dense_activation(arch, pre, getattr(clt, "k", None), t))
    return torch.cat(codes, dim=-1), dense_clt_decode(clt, codes)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """A saved dictionary's tensors as loaded by saetrain (state_dict order and names)."""
    from saetrain.export.saelens import load_dictionary

    return {k: v.detach().clone() for k, v in load_dictionary(folder).state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), (key, float((a[key] - b[key]).abs().max()))
