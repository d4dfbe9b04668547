"""How well a dictionary recovers known features: SynthSAEBench's MCC, F1 and uniqueness.

Chanin & Garriga-Alonso, "SynthSAEBench: Evaluating Sparse Autoencoders on Scalable Realistic
Synthetic Data" (arXiv:2602.14687), with the definitions of SAELens' `sae_lens.synthetic`:

- MCC (mean correlation coefficient): an optimal one-to-one matching of decoder rows to true
  feature directions (the assignment maximising Σ |cos|), then the mean |cos| over the min(n, F)
  matched pairs. 1 when the decoder rows are the true directions in some order.
- F1 of feature detection: each latent is a binary classifier for its best-matching true feature
  (largest |cos|, not one-to-one): it predicts "active" where it fires (code > 0) against where the
  feature's coefficient is > 0. Precision, recall and F1 per latent (0 where undefined, so a
  latent that never fires scores 0), averaged over all latents.
- Uniqueness: distinct best-matching true features over the number of latents.

`linear_assignment` is an exact solver (shortest augmenting paths with dual potentials, the
Jonker–Volgenant / Hungarian method, O(n²·m)) in numpy, so that nothing beyond the project's
dependencies is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from saetrain.dictionaries.base import Codes, SparseCodes


def linear_assignment(
    score: np.ndarray | torch.Tensor, maximize: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """An optimal one-to-one matching of the rows and columns of a [R, C] matrix.

    Returns (rows, cols): min(R, C) pairs, each row and column used at most once, rows
    increasing, whose total score is the largest (maximize) or smallest possible.
    """
    if isinstance(score, torch.Tensor):
        score = score.detach().cpu().double().numpy()
    a = np.asarray(score, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"linear_assignment expects a 2-d matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("linear_assignment: the matrix has NaN or infinite entries")
    if maximize:
        a = -a
    transposed = a.shape[0] > a.shape[1]
    if transposed:
        a = a.T
    n, m = a.shape
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    col_of_row = _shortest_augmenting_paths(a - a.min())
    rows, cols = np.arange(n), col_of_row
    if transposed:
        rows, cols = cols, rows
        order = np.argsort(rows)
        rows, cols = rows[order], cols[order]
    return rows.astype(np.int64), cols.astype(np.int64)


def _shortest_augmenting_paths(a: np.ndarray) -> np.ndarray:
    """Minimum-cost assignment of every row of a [n, m] cost matrix (n <= m) to distinct columns.

    Rows are added one at a time; each addition grows a Dijkstra-like tree over columns with
    reduced costs a[i, j] − u[i] − v[j] ≥ 0 until it reaches a free column, then flips the path.
    Index 0 of the column arrays is a virtual column holding the row being added.
    """
    n, m = a.shape
    u = np.zeros(n + 1)
    v = np.zeros(m + 1)
    row_of_col = np.zeros(m + 1, dtype=np.int64)  # 1-based row; 0: free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of_col[0] = i
        j0 = 0
        min_reduced = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of_col[j0]
            reduced = a[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (reduced < min_reduced[1:])
            min_reduced[1:][better] = reduced[better]
            way[1:][better] = j0
            candidates = np.where(free, min_reduced[1:], np.inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[row_of_col[used]] += delta
            v[used] -= delta
            min_reduced[~used] -= delta
            j0 = j1
            if row_of_col[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of_col[j0] = row_of_col[j1]
            j0 = j1
    col_of_row = np.zeros(n, dtype=np.int64)
    assigned = np.nonzero(row_of_col[1:])[0]
    col_of_row[row_of_col[1:][assigned] - 1] = assigned
    return col_of_row


def abs_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|cos| between every row of a [n, d] and every row of b [F, d], float64, [n, F]."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"expected [n, d] and [F, d] matrices, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a = a.detach().to("cpu", torch.float64)
    b = b.detach().to("cpu", torch.float64)
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a @ b.T).abs()


def mean_correlation_coefficient(decoder: torch.Tensor, true_features: torch.Tensor) -> float:
    """SynthSAEBench's MCC: mean |cos| over the optimally matched (decoder row, feature) pairs."""
    cos = abs_cosines(decoder, true_features)
    rows, cols = linear_assignment(cos, maximize=True)
    return float(cos[torch.from_numpy(rows), torch.from_numpy(cols)].mean())


def uniqueness(decoder: torch.Tensor, true_features: torch.Tensor) -> float:
    """Distinct best-matching true features (by |cos|) over the number of latents."""
    best = abs_cosines(decoder, true_features).argmax(dim=1)
    return len(best.unique()) / max(decoder.shape[0], 1)


class DetectionStats:
    """Per-latent counts of latent firing vs its best-matching true feature being active."""

    def __init__(self, decoder: torch.Tensor, true_features: torch.Tensor):
        self.n_latents = decoder.shape[0]
        self.best_match = abs_cosines(decoder, true_features).argmax(dim=1)
        self.tp = torch.zeros(self.n_latents, dtype=torch.float64)
        self.fp = torch.zeros_like(self.tp)
        self.fn = torch.zeros_like(self.tp)

    @torch.no_grad()
    def update(self, codes: Codes, true_coefficients: torch.Tensor) -> None:
        """Add rows: the dictionary's codes and the true coefficients [N, F] of the same rows."""
        if isinstance(codes, SparseCodes):
            codes = codes.to_dense(self.n_latents)
        fires = codes.detach().cpu() > 0
        truth = true_coefficients.detach().cpu()[:, self.best_match] > 0
        self.tp += (fires & truth).sum(0).double()
        self.fp += (fires & ~truth).sum(0).double()
        self.fn += (~fires & truth).sum(0).double()

    def compute(self) -> dict[str, float]:
        """Mean precision, recall and F1 over latents (each 0 where its denominator is 0)."""
        tp, fp, fn = self.tp, self.fp, self.fn
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp))
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp))
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-30), 0 * tp)
        return {
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        }
