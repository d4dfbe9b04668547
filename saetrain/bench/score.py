"""The one way a benchmark scores a dictionary on rows held in memory.

The numbers are saetrain's own definitions (evaluation/metrics.py, evaluation/feature_recovery.py),
so a benchmark's FVU or L0 is the number a run reports; a peer library's dictionary, wrapped in a
saetrain class, is scored by the same code.
"""

from __future__ import annotations

import torch

from saetrain.evaluation.feature_recovery import (
    DetectionStats,
    mean_correlation_coefficient,
    uniqueness,
)
from saetrain.evaluation.metrics import ReconstructionStats


@torch.no_grad()
def score_rows(dictionary, x: torch.Tensor, truth=None, batch: int = 4096) -> dict[str, float]:
    """FVU, MSE, L0, never fired (metrics.ReconstructionStats) of a raw-scale dictionary on rows
    `x`; with `truth` = (features [F, d], coefficients [N, F]), also SynthSAEBench's feature
    recovery (MCC, uniqueness, detection F1)."""
    device = dictionary.W_enc.device
    stats = ReconstructionStats(dictionary.n_latents, dictionary.d_out, device)
    detection = DetectionStats(dictionary.W_dec, truth[0]) if truth is not None else None
    for i in range(0, len(x), batch):
        rows = x[i : i + batch].to(device=device, dtype=dictionary.W_enc.dtype)
        codes = dictionary.encode(rows)
        stats.update(rows, dictionary.reconstruct(rows, codes), codes)
        if detection is not None:
            detection.update(codes, truth[1][i : i + batch])
    out = stats.compute()
    if truth is not None:
        out["mcc"] = mean_correlation_coefficient(dictionary.W_dec, truth[0])
        out["uniqueness"] = uniqueness(dictionary.W_dec, truth[0])
        out |= detection.compute()
    return out
