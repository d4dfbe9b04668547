"""Tests for the reconstruction metrics (FVU, MSE, L0, dead fraction) and CE recovered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saetrain.dictionaries.base import SparseCodes
from saetrain.evaluation.metrics import ReconstructionStats, ce_recovered, reconstruction_metrics


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _codes(N: int, k: int = 2, n: int = 8, seed: int = 0) -> SparseCodes:
    g = _gen(seed)
    return SparseCodes(
        torch.randint(0, n, (N, k), generator=g), torch.rand(N, k, generator=g) + 0.1
    )


def _fvu_numpy(x: np.ndarray, x_hat: np.ndarray) -> float:
    x = x.astype(np.float64)
    x_hat = x_hat.astype(np.float64)
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def test_perfect_reconstruction_has_zero_fvu_and_mse():
    x = torch.randn(50, 6, generator=_gen(0))
    stats = ReconstructionStats(8, 6)
    stats.update(x, x.clone(), _codes(50))
    m = stats.compute()
    assert m["fvu"] == 0.0
    assert m["mse"] == 0.0
    assert m["tokens"] == 50.0


def test_predicting_the_mean_of_the_whole_set_has_fvu_one():
    g = _gen(1)
    batches = [
        torch.randn(n, 5, generator=g, dtype=torch.float64) + 3.0 * i
        for i, n in enumerate((7, 20, 13))
    ]
    mean = torch.cat(batches).mean(0)
    stats = ReconstructionStats(8, 5)
    for b in batches:
        stats.update(b, mean.expand_as(b), _codes(len(b)))
    assert stats.compute()["fvu"] == pytest.approx(1.0, abs=1e-9)


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x_hat = torch.tensor([[1.0, 3.0], [2.0, 6.0]])
    # mean (2, 4); total variance 1 + 4 + 1 + 4 = 10; squared error 1 + 1 = 2
    m = reconstruction_metrics(x, x_hat, _codes(2), 8)
    assert m["fvu"] == pytest.approx(0.2, abs=1e-12)
    assert m["mse"] == pytest.approx(2 / 4, abs=1e-12)


def test_accumulated_batches_equal_one_batch_with_different_batch_means():
    g = _gen(2)
    sizes = (10, 40, 25)
    xs = [torch.randn(n, 8, generator=g) * (1 + i) + 5.0 * i for i, n in enumerate(sizes)]
    x_hats = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    codes = [_codes(len(x), seed=i) for i, x in enumerate(xs)]

    acc = ReconstructionStats(8, 8)
    for x, xh, c in zip(xs, x_hats, codes, strict=True):
        acc.update(x, xh, c)
    one = ReconstructionStats(8, 8)
    cat_codes = SparseCodes(
        torch.cat([c.indices for c in codes]), torch.cat([c.values for c in codes])
    )
    one.update(torch.cat(xs), torch.cat(x_hats), cat_codes)
    m_acc, m_one = acc.compute(), one.compute()
    for key in ("fvu", "mse", "l0", "never_fired_fraction", "never_fired_tokens", "tokens"):
        assert m_acc[key] == pytest.approx(m_one[key], rel=1e-12), key

    expected = _fvu_numpy(torch.cat(xs).numpy(), torch.cat(x_hats).numpy())
    assert m_acc["fvu"] == pytest.approx(expected, rel=1e-9)
    # A per-batch definition (mean of each batch's FVU, or each batch's own mean) differs a lot,
    # because the batch means differ: the test can tell the two apart.
    per_batch = np.mean(
        [_fvu_numpy(x.numpy(), xh.numpy()) for x, xh in zip(xs, x_hats, strict=True)]
    )
    pooled_own_means = sum(
        float((x - xh).pow(2).sum()) for x, xh in zip(xs, x_hats, strict=True)
    ) / sum(float((x - x.mean(0)).pow(2).sum()) for x in xs)
    assert abs(per_batch - expected) > 0.1 * expected
    assert abs(pooled_own_means - expected) > 0.1 * expected


def test_mse_and_l0_by_hand():
    x = torch.zeros(4, 3)
    x_hat = torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0], [1.0, 1.0, 1.0]])
    # squared error 1 + 4 + 0 + 3 = 8 over 12 entries
    codes = SparseCodes(
        torch.tensor([[0, 1, 2], [3, 4, 5], [0, 1, 2], [6, 0, 1]]),
        torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]]),
    )
    stats = ReconstructionStats(10, 3)
    stats.update(x, x_hat, codes)
    m = stats.compute()
    assert m["mse"] == pytest.approx(8 / 12, abs=1e-12)
    assert m["l0"] == pytest.approx((2 + 3 + 0 + 1) / 4, abs=1e-12)
    # Fired (non-zero value) latents: 0, 2, 3, 4, 5, 6 → 4 of 10 never fired (1, 7, 8, 9).
    assert m["never_fired_fraction"] == pytest.approx(0.4, abs=1e-12)
    assert m["never_fired_tokens"] == m["tokens"] == 4.0


def test_never_fired_fraction_over_several_batches():
    stats = ReconstructionStats(6, 2)
    x = torch.randn(2, 2, generator=_gen(3))
    stats.update(x, x, SparseCodes(torch.tensor([[0], [1]]), torch.tensor([[1.0], [1.0]])))
    assert stats.compute()["never_fired_fraction"] == pytest.approx(4 / 6)
    # Latent 5 appears only with value 0: it did not fire.
    stats.update(x, x, SparseCodes(torch.tensor([[1], [5]]), torch.tensor([[2.0], [0.0]])))
    assert stats.compute()["never_fired_fraction"] == pytest.approx(4 / 6)
    stats.update(x, x, SparseCodes(torch.tensor([[2], [3]]), torch.tensor([[0.1], [0.2]])))
    assert stats.compute()["never_fired_fraction"] == pytest.approx(2 / 6)
    assert stats.compute()["never_fired_tokens"] == 6.0
    assert stats.fire_counts.tolist() == [1, 2, 1, 1, 0, 0]


def test_leading_dimensions_are_flattened():
    g = _gen(4)
    x = torch.randn(3, 5, 4, generator=g)
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g)
    m = reconstruction_metrics(x, x_hat, _codes(15), 8)
    assert m["tokens"] == 15.0
    expected = _fvu_numpy(x.reshape(15, 4).numpy(), x_hat.reshape(15, 4).numpy())
    assert m["fvu"] == pytest.approx(expected, rel=1e-9)


def test_compute_without_rows_raises():
    with pytest.raises(ValueError):
        ReconstructionStats(4, 3).compute()


@pytest.mark.parametrize("n_batches", [1, 20])
def test_float64_accumulation_with_a_large_offset(n_batches):
    """x = 1e4 + noise in float32: FVU matches a float64 two-pass numpy computation."""
    g = _gen(5)
    d, N = 16, 1000
    stats = ReconstructionStats(8, d)
    xs, xhs = [], []
    for i in range(n_batches):
        x = (1e4 + torch.randn(N, d, generator=g, dtype=torch.float64)).float()
        x_hat = (x.double() + 0.5 * torch.randn(N, d, generator=g, dtype=torch.float64)).float()
        stats.update(x, x_hat, _codes(N, seed=i))
        xs.append(x.numpy())
        xhs.append(x_hat.numpy())
    expected = _fvu_numpy(np.concatenate(xs), np.concatenate(xhs))
    assert 0.2 < expected < 0.3
    assert stats.compute()["fvu"] == pytest.approx(expected, rel=1e-6)
    # A float32 accumulation of the same formula would be far off (the test can fail).
    x32 = torch.from_numpy(np.concatenate(xs))
    tv32 = (x32.pow(2).sum() - len(x32) * x32.mean(0).pow(2).sum()).item()
    tv64 = float(((np.concatenate(xs).astype(np.float64) - np.concatenate(xs).mean(0)) ** 2).sum())
    assert abs(tv32 / tv64 - 1) > 1e-2


def test_float64_accumulation_with_offset_large_against_spread():
    """x = 1e4 + 0.01·noise in float32: a one-pass Σx² − n·‖mean‖² would be 3e-5 relative off."""
    g = _gen(6)
    d, N = 16, 1000
    x = (1e4 + 1e-2 * torch.randn(N, d, generator=g, dtype=torch.float64)).float()
    x_hat = (x.double() + 5e-3 * torch.randn(N, d, generator=g, dtype=torch.float64)).float()
    m = reconstruction_metrics(x, x_hat, _codes(N), 8)
    expected = _fvu_numpy(x.numpy(), x_hat.numpy())
    assert m["fvu"] == pytest.approx(expected, rel=1e-6)


def test_ce_recovered():
    assert ce_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0) == pytest.approx(0.9)
    assert ce_recovered(ce_clean=3.0, ce_spliced=3.0, ce_zero=8.0) == pytest.approx(1.0)
    assert ce_recovered(ce_clean=3.0, ce_spliced=8.0, ce_zero=8.0) == pytest.approx(0.0)
    # Worse than zero-ablation is negative.
    assert ce_recovered(ce_clean=2.0, ce_spliced=10.0, ce_zero=6.0) == pytest.approx(-1.0)
    assert ce_recovered(ce_clean=1.25, ce_spliced=2.0, ce_zero=4.25) == pytest.approx(0.75)
