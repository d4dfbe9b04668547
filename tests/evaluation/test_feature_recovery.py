"""saetrain.evaluation.feature_recovery: the assignment solver, MCC, uniqueness and detection F1."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from saetrain.dictionaries.base import SparseCodes
from saetrain.evaluation.feature_recovery import (
    DetectionStats,
    abs_cosines,
    linear_assignment,
    mean_correlation_coefficient,
    uniqueness,
)


def brute_force(score: np.ndarray, maximize: bool) -> float:
    """The best total over every one-to-one matching of min(R, C) pairs."""
    r, c = score.shape
    best = -np.inf if maximize else np.inf
    if r <= c:
        for cols in itertools.permutations(range(c), r):
            total = score[np.arange(r), list(cols)].sum()
            best = max(best, total) if maximize else min(best, total)
    else:
        for rows in itertools.permutations(range(r), c):
            total = score[list(rows), np.arange(c)].sum()
            best = max(best, total) if maximize else min(best, total)
    return float(best)


def check_matching(score: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    k = min(score.shape)
    assert len(rows) == len(cols) == k
    assert len(set(rows.tolist())) == k and len(set(cols.tolist())) == k
    assert (np.diff(rows) > 0).all()  # rows increasing
    assert rows.min() >= 0 and rows.max() < score.shape[0]
    assert cols.min() >= 0 and cols.max() < score.shape[1]


@pytest.mark.parametrize("shape", [(1, 1), (3, 3), (4, 4), (5, 5), (2, 5), (3, 6), (6, 3), (5, 2)])
@pytest.mark.parametrize("maximize", [True, False])
def test_linear_assignment_matches_brute_force(shape, maximize):
    rng = np.random.default_rng(hash((shape, maximize)) % 2**32)
    for trial in range(8):
        score = rng.normal(size=shape)
        if trial % 3 == 1:
            score = np.round(score, 1)  # ties
        if trial % 3 == 2:
            score = rng.integers(-3, 4, size=shape).astype(float)  # many ties, negatives
        rows, cols = linear_assignment(score, maximize=maximize)
        check_matching(score, rows, cols)
        assert score[rows, cols].sum() == pytest.approx(brute_force(score, maximize), abs=1e-9)


def test_linear_assignment_accepts_tensors_and_edge_shapes():
    score = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    rows, cols = linear_assignment(score)
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    rows, cols = linear_assignment(np.zeros((0, 3)))
    assert len(rows) == len(cols) == 0
    with pytest.raises(ValueError, match="2-d"):
        linear_assignment(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        linear_assignment(np.array([[np.nan, 1.0]]))


def test_linear_assignment_larger_matrix_beats_greedy():
    """A case where greedy picking (best entry first) is wrong; the solver is optimal."""
    score = np.array([[10.0, 9.0], [9.0, 1.0]])  # greedy: 10 + 1 = 11; optimal: 9 + 9 = 18
    rows, cols = linear_assignment(score)
    assert score[rows, cols].sum() == 18.0
    rng = np.random.default_rng(0)
    big = rng.random((40, 60))
    rows, cols = linear_assignment(big)
    check_matching(big, rows, cols)
    # No single swap of two assigned columns, nor a move to a free column, improves it.
    total = big[rows, cols].sum()
    free = sorted(set(range(60)) - set(cols.tolist()))
    for i in range(40):
        for j in free:
            assert big[rows[i], j] <= big[rows[i], cols[i]] + 1e-12
        for k in range(i + 1, 40):
            swapped = total - big[rows[i], cols[i]] - big[rows[k], cols[k]]
            swapped += big[rows[i], cols[k]] + big[rows[k], cols[i]]
            assert swapped <= total + 1e-9


def unit_rows(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True)


def test_mcc_is_one_for_permuted_scaled_signed_true_directions():
    g = torch.Generator().manual_seed(0)
    features = unit_rows(torch.randn(12, 8, generator=g))
    perm = torch.randperm(12, generator=g)
    scales = torch.rand(12, 1, generator=g) * 5 + 0.1
    signs = torch.where(torch.rand(12, 1, generator=g) < 0.5, -1.0, 1.0)
    decoder = features[perm] * scales * signs
    assert mean_correlation_coefficient(decoder, features) == pytest.approx(1.0, abs=1e-12)
    assert uniqueness(decoder, features) == 1.0
    # A wider dictionary holding every true direction (plus extra rows): MCC over the F pairs.
    extra = torch.cat([decoder, torch.randn(5, 8, generator=g)])
    assert mean_correlation_coefficient(extra, features) == pytest.approx(1.0, abs=1e-12)
    # A narrower one made of some true directions: MCC over its n rows.
    assert mean_correlation_coefficient(decoder[:5], features) == pytest.approx(1.0, abs=1e-12)


def test_mcc_hand_computed():
    # Truth: e1, e2. Decoder rows: (1, 0.9) and (2, 0). |cos| = [[1/√1.81, 0.9/√1.81], [1, 0]].
    # One-to-one: row 0 → e1, row 1 → e2 sums 0.743; row 0 → e2, row 1 → e1 sums 1.669, the
    # optimum: MCC = (0.9/√1.81 + 1) / 2. Both rows best match e1: uniqueness 1/2.
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    decoder = torch.tensor([[1.0, 0.9], [2.0, 0.0]])
    norm = 1.81**0.5
    cos = abs_cosines(decoder, truth)
    assert cos.dtype == torch.float64
    assert torch.allclose(cos, torch.tensor([[1 / norm, 0.9 / norm], [1.0, 0.0]], dtype=cos.dtype))
    assert mean_correlation_coefficient(decoder, truth) == pytest.approx((0.9 / norm + 1) / 2)
    assert uniqueness(decoder, truth) == 0.5
    with pytest.raises(ValueError, match="matrices"):
        abs_cosines(torch.zeros(2, 3), torch.zeros(2, 4))


def test_f1_is_one_for_a_perfect_detector():
    g = torch.Generator().manual_seed(1)
    features = unit_rows(torch.randn(6, 4, generator=g))
    perm = torch.randperm(6, generator=g)
    coefficients = torch.rand(50, 6, generator=g) * (torch.rand(50, 6, generator=g) < 0.3)
    stats = DetectionStats(features[perm] * 3, features)  # latent j is feature perm[j]
    codes = coefficients[:, perm] * 2  # fires exactly where its feature is active
    stats.update(codes[:20], coefficients[:20])
    stats.update(codes[20:], coefficients[20:])  # batches add up
    assert stats.compute() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_f1_hand_computed_and_sparse_codes():
    # Two true features e1, e2; latent 0 matches e1, latent 1 matches e2, latent 2 matches e1.
    truth = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    decoder = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.9, 0.0]])
    coefficients = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    # latent 0 fires on rows 0, 2: TP 1 (row 0), FP 1 (row 2), FN 1 (row 1): P = R = F1 = 1/2.
    # latent 1 fires on rows 1, 2: TP 2, FP 0, FN 0: P = R = F1 = 1.
    # latent 2 never fires: P = R = F1 = 0 (undefined precision counts as 0).
    codes = torch.tensor([[0.5, 0.0, 0.0], [0.0, 2.0, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.0]])
    stats = DetectionStats(decoder, truth)
    stats.update(codes, coefficients)
    out = stats.compute()
    assert out["precision"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["recall"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert out["f1"] == pytest.approx((0.5 + 1 + 0) / 3)
    # The same codes as SparseCodes (TopK form, k = 2, a zero-valued padding slot): same counts.
    sparse = SparseCodes(
        torch.tensor([[0, 1], [1, 0], [0, 1], [2, 2]]),
        torch.tensor([[0.5, 0.0], [2.0, 0.0], [0.3, 1.0], [0.0, 0.0]]),
    )
    stats2 = DetectionStats(decoder, truth)
    stats2.update(sparse, coefficients)
    assert stats2.compute() == out
    # Asymmetric case: precision 1/3, recall 1 for a latent firing everywhere on a 1-in-3 feature.
    one = DetectionStats(torch.tensor([[1.0, 0.0]]), truth)
    one.update(torch.ones(3, 1), torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    got = one.compute()
    assert got["precision"] == pytest.approx(1 / 3) and got["recall"] == 1.0
    assert got["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
