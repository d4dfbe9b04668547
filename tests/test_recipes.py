"""Recipe conventions against independent computations: Matryoshka's mean over prefixes."""

from __future__ import annotations

import torch

from saetrain.config import DictionaryConfig
from saetrain.dictionaries import build_dictionary


def _matryoshka(reduction: str):
    cfg = DictionaryConfig(
        architecture="matryoshka",
        n_latents=32,
        k=4,
        matryoshka_prefixes=[4, 8, 32],
        matryoshka_reduction=reduction,
    )
    return build_dictionary(cfg, 8, 8, torch.device("cpu"), torch.Generator().manual_seed(0))


def test_matryoshka_mean_is_the_average_of_the_prefix_fvus():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    mean, total = _matryoshka("mean"), _matryoshka("sum")
    z = mean.encode(x)
    variance = (x - x.mean(0)).pow(2).sum()
    loss_mean, _, _ = mean.reconstruction_loss(x, x, z, variance)
    loss_sum, _, _ = total.reconstruction_loss(x, x, z, variance)
    dense = (
        z if isinstance(z, torch.Tensor) else torch.zeros(64, 32).scatter(1, z.indices, z.values)
    )
    by_hand = []
    for end in (4, 8, 32):
        x_hat = dense[:, :end] @ mean.W_dec[:end] + mean.b_dec
        by_hand.append(float((x - x_hat).pow(2).sum().detach() / variance))
    assert abs(float(loss_sum) - sum(by_hand)) < 1e-4
    assert abs(float(loss_mean) - sum(by_hand) / 3) < 1e-4
