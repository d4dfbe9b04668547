"""saetrain.bench.score.score_rows: the one way the benchmarks score a dictionary on rows."""

from __future__ import annotations

import pytest
import torch

from saetrain.bench.score import score_rows
from saetrain.dictionaries.topk import TopKSAE
from saetrain.synthetic.features import SyntheticConfig, SyntheticFeatures


def test_a_perfect_decoder_scores_mcc_one():
    """A dictionary whose decoder rows are the true directions (in some order)."""
    data = SyntheticFeatures(SyntheticConfig(d=16, n_features=32, mean_active=2))
    x, coefficients = data.sample_with_codes(512, torch.Generator().manual_seed(0))
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    sae = TopKSAE(16, 32, k=4)
    with torch.no_grad():
        sae.W_dec.copy_(data.features[perm])
        sae.W_enc.copy_(data.features[perm].T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    m = score_rows(sae.eval(), x, (data.features, coefficients))
    assert m["mcc"] == pytest.approx(1.0, abs=1e-9)
    assert m["uniqueness"] == 1.0
    assert {"f1", "precision", "recall", "fvu", "l0", "never_fired_fraction"} <= set(m)
