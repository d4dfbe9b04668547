"""Feature density: how often each latent fires, and the never-fired / dense counts derived from it.

A latent's firing frequency is the fraction of (non-special) tokens on which its code is non-zero.
Never-fired latents fired on none of the tokens seen (`never_fired_count`; not "dead", which is
the training window's verdict, see evaluation/metrics.py); dense latents fire on more than
`dense_threshold` of them (0.1 by default: a latent active on one token in ten is no longer a
sparse feature, and such latents usually encode position or bias rather than meaning). The
histogram of log10 frequency is the usual health check of a dictionary: a bump far left is dying
latents, a bump right of -1 is dense ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from saetrain.dictionaries.base import Codes, SparseCodes, firing_counts

log = logging.getLogger(__name__)

DEFAULT_DENSE_THRESHOLD = 0.1


class FiringCounter:
    """Accumulates per-latent firing counts over batches of codes."""

    def __init__(self, n_latents: int):
        self.n_latents = n_latents
        self.counts = torch.zeros(n_latents, dtype=torch.int64)
        self.rows = 0

    def update(self, codes: Codes) -> None:
        self.counts += firing_counts(codes, self.n_latents).cpu()
        self.rows += int((codes.indices if isinstance(codes, SparseCodes) else codes).shape[0])

    def frequencies(self) -> torch.Tensor:
        """Float64 [n_latents]: fraction of rows each latent fired on."""
        if self.rows == 0:
            raise ValueError("no rows were counted; the evaluation set is empty")
        return self.counts.double() / self.rows


def density_summary(
    frequencies: torch.Tensor, dense_threshold: float = DEFAULT_DENSE_THRESHOLD
) -> dict[str, float]:
    """Never-fired and dense counts (and the dense fraction) of per-latent firing frequencies.

    `never_fired_count`: latents with frequency 0 on these tokens (the count behind
    ReconstructionStats' `never_fired_fraction`); `dense_count` / `dense_fraction`: latents above
    `dense_threshold`; `median_log10_frequency`: over the latents that fired.
    """
    if not 0.0 < dense_threshold <= 1.0:
        raise ValueError(f"dense_threshold={dense_threshold} must be in (0, 1]")
    n = frequencies.numel()
    never_fired = int((frequencies == 0).sum())
    dense = int((frequencies > dense_threshold).sum())
    alive = frequencies[frequencies > 0]
    return {
        "never_fired_count": float(never_fired),
        "dense_count": float(dense),
        "dense_fraction": dense / n,
        "median_log10_frequency": float(alive.log10().median()) if alive.numel() else float("nan"),
    }


def plot_density(
    frequencies: torch.Tensor,
    path: str | Path,
    title: str,
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
) -> Path | None:
    """Histogram of log10 firing frequency as a PNG, the dense threshold a dashed line.

    matplotlib is a saetrain dependency; where it was removed, None and a warning (the metrics
    are written all the same).
    """
    try:  # matplotlib is imported here: it takes half a second, and only this plot needs it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(
            "matplotlib is not installed: %s not written (it is a saetrain dependency: "
            "pip install matplotlib)",
            path,
        )
        return None
    path = Path(path)
    freqs = frequencies.detach().double().cpu()
    alive = freqs[freqs > 0]
    never_fired = int((freqs == 0).sum())
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    if alive.numel():
        ax.hist(alive.log10().numpy(), bins=60, color="tab:blue")
    ax.axvline(
        torch.tensor(dense_threshold).log10().item(),
        color="tab:red",
        ls="--",
        lw=1,
        label=f"dense threshold: fires on > {dense_threshold:g} of tokens",
    )
    # Headroom above the bars for the counts line and, under it, the legend.
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, 0.9), fontsize=8, frameon=False)
    ax.set_xlabel("log10 firing frequency (fraction of tokens)")
    ax.set_ylabel("latents")
    ax.set_title(title, fontsize=9)
    ax.text(
        0.02,
        0.95,
        f"{freqs.numel()} latents, {never_fired} never fired (not shown), "
        f"{int((freqs > dense_threshold).sum())} > {dense_threshold:g}",
        transform=ax.transAxes,
        va="top",
        fontsize=8,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def count_firing(codes_batches: Iterable[Codes], n_latents: int) -> FiringCounter:
    """A FiringCounter fed with every batch of codes."""
    counter = FiringCounter(n_latents)
    for codes in codes_batches:
        counter.update(codes)
    return counter
