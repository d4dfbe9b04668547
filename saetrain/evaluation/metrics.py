"""Reconstruction metrics: the one definition used by training logs and by the final evaluation.

FVU = Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over all rows seen, with mean(x) the mean of those rows;
MSE = Σ‖x − x̂‖² / (rows · d); L0 = mean number of non-zero codes per row. Sums are accumulated in
float64 so that millions of rows add up without loss, and around a shift (the first batch's mean)
so that the total variance is not lost to cancellation when the mean is large against the spread.

Two latent-health numbers, named for what they count so that neither passes for the other:

- `never_fired_fraction` (with `never_fired_tokens`): the share of latents that fired on none of
  the rows seen, and how many rows that was. It depends on the sample: the fewer the tokens, the
  more latents go unseen, so it is only comparable at equal `never_fired_tokens`.
- `dead_fraction` (with `dead_window_tokens`): the training-window meaning, the one AuxK acts on:
  latents that have not fired in the last `dead_window_tokens` training tokens
  (`training_dead_metrics`).
"""

from __future__ import annotations

import torch

from saetrain.dictionaries.base import Codes, active_count, firing_counts


class ReconstructionStats:
    def __init__(self, n_latents: int, d: int, device: torch.device | str = "cpu"):
        f64 = {"dtype": torch.float64, "device": device}
        self.n_latents = n_latents
        self.rows = 0
        self.shift: torch.Tensor | None = None
        self.sum_x = torch.zeros(d, **f64)
        self.sum_sq_x = torch.zeros((), **f64)
        self.sum_sq_err = torch.zeros((), **f64)
        self.sum_l0 = torch.zeros((), **f64)
        self.fire_counts = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, codes: Codes) -> None:
        """Add rows: targets x [N, d], reconstructions x̂ [N, d] and their codes."""
        x64 = x.reshape(-1, x.shape[-1]).double()
        err = x64 - x_hat.reshape(x64.shape).double()
        if self.shift is None:
            self.shift = x64.mean(0)
        centred = x64 - self.shift
        self.rows += x64.shape[0]
        self.sum_x += centred.sum(0)
        self.sum_sq_x += centred.pow(2).sum()
        self.sum_sq_err += err.pow(2).sum()
        self.sum_l0 += active_count(codes)
        self.fire_counts += firing_counts(codes, self.n_latents).to(self.fire_counts.device)

    @classmethod
    def merged(cls, parts: list[ReconstructionStats]) -> ReconstructionStats:
        """The stats of every part's rows together (a held-out set evaluated in shares, one per
        rank): the sums are moved to the first non-empty part's shift, then added, so that the
        merged stats are those of one pass over all the rows (up to float64 rounding)."""
        if not parts:
            raise ValueError("no stats to merge")
        first = parts[0]
        out = cls(first.n_latents, first.sum_x.numel(), first.sum_x.device)
        for part in parts:
            if part.rows == 0 or part.shift is None:
                continue
            if out.shift is None:
                out.shift = part.shift.clone()
            delta = part.shift - out.shift  # the part's sums are around its own shift
            out.sum_sq_x += (
                part.sum_sq_x + 2 * (delta * part.sum_x).sum() + part.rows * delta.pow(2).sum()
            )
            out.sum_x += part.sum_x + part.rows * delta
            out.rows += part.rows
            out.sum_sq_err += part.sum_sq_err
            out.sum_l0 += part.sum_l0
            out.fire_counts += part.fire_counts.to(out.fire_counts.device)
        return out

    def compute(self) -> dict[str, float]:
        if self.rows == 0:
            raise ValueError("no rows were added to the metrics")
        mean = self.sum_x / self.rows  # of the shifted rows; the variance is shift-invariant
        total_variance = self.sum_sq_x - self.rows * mean.pow(2).sum()
        d = self.sum_x.numel()
        # Σ‖x‖² from the shifted sums: the FVU of predicting zero (a trivial baseline; predicting
        # the mean has FVU 1 by definition).
        sum_sq_raw = (
            self.sum_sq_x
            + 2 * (self.shift * self.sum_x).sum()
            + self.rows * (self.shift.pow(2).sum())
        )
        return {
            "fvu": float(self.sum_sq_err / total_variance.clamp_min(1e-30)),
            "fvu_zero_baseline": float(sum_sq_raw / total_variance.clamp_min(1e-30)),
            "mse": float(self.sum_sq_err / (self.rows * d)),
            "l0": float(self.sum_l0 / self.rows),
            # Share of latents with zero firings on the rows seen, and the rows it is over.
            "never_fired_fraction": float((self.fire_counts == 0).double().mean()),
            "never_fired_tokens": float(self.rows),
            "tokens": float(self.rows),
        }


def reconstruction_metrics(
    x: torch.Tensor, x_hat: torch.Tensor, codes: Codes, n_latents: int
) -> dict[str, float]:
    """The metrics of one batch (training logs)."""
    stats = ReconstructionStats(n_latents, x.shape[-1], x.device)
    stats.update(x, x_hat, codes)
    return stats.compute()


def training_dead_metrics(
    tokens_since_fired: torch.Tensor, dead_after_tokens: int, tokens_trained: int
) -> dict[str, float]:
    """`dead_fraction` of a trained dictionary, over the window it was measured on.

    A latent is dead when it has not fired in the last `dead_window_tokens` training tokens
    (`tokens_since_fired` counts, per latent, the tokens since it last fired). The window is
    `trainer.dead_after_tokens`; a run that trained fewer tokens than that has no full window, so
    its window is every token trained and its dead latents are those that never fired in training
    (judged by `dead_after_tokens` alone, no latent of a short run could be dead, and the 0 would
    say nothing). For runs at least a window long this is exactly the trainer's dead mask.
    """
    window = min(int(dead_after_tokens), int(tokens_trained))
    if window <= 0:
        raise ValueError("no tokens were trained: there is no training window to judge latents by")
    return {
        "dead_fraction": float((tokens_since_fired >= window).double().mean()),
        "dead_window_tokens": float(window),
    }


def ce_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """(CE_zero − CE_spliced) / (CE_zero − CE_clean): 1 is perfect, 0 is as bad as ablation."""
    return (ce_zero - ce_spliced) / (ce_zero - ce_clean)
