"""What a crosscoder's latents do across its sources: each latent's decoder norm per source.

For two sources (a base and a fine-tuned model, or two layers) the relative norm
‖W_dec^b‖ / (‖W_dec^a‖ + ‖W_dec^b‖) of a latent is 0 when it writes only to source a, 1 when
only to b, ½ when to both alike; its histogram is the model-diffing plot of Lindsey et al. (2024).
With S sources each latent has a share per source (Σ over sources = 1).
"""

from __future__ import annotations

from pathlib import Path

import torch


def decoder_norm_shares(source_norms: torch.Tensor) -> torch.Tensor:
    """[S, n] shares of each latent's decoder norm per source (columns sum to 1; a latent with
    a zero decoder gets equal shares)."""
    norms = source_norms.double()
    total = norms.sum(0, keepdim=True)
    equal = torch.full_like(norms, 1.0 / norms.shape[0])
    return torch.where(total > 0, norms / total.clamp_min(1e-30), equal)


def share_summary(shares: torch.Tensor, sources: list[str]) -> dict[str, float]:
    """Per source: its mean share, and the fraction of latents that write (share > 0.9) mostly to
    it; for the metrics and the model card."""
    out: dict[str, float] = {}
    for s, site in enumerate(sources):
        out[f"decoder_share.{site}"] = float(shares[s].mean())
        out[f"latents_mostly.{site}"] = float((shares[s] > 0.9).double().mean())
    return out


def plot_decoder_norm_shares(shares: torch.Tensor, sources: list[str], path: Path) -> Path:
    """A histogram PNG per source of the latents' decoder-norm shares (for two sources, one
    histogram of the second source's relative norm, as in the paper)."""
    import matplotlib  # here: it takes half a second, and only this plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [1] if len(sources) == 2 else list(range(len(sources)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(6, 2.4 * len(rows)), squeeze=False)
    for ax, s in zip(axes[:, 0], rows, strict=True):
        ax.hist(shares[s].cpu().numpy(), bins=50, range=(0.0, 1.0), color="#4c72b0")
        if len(sources) == 2:
            label = f"relative decoder norm: {sources[1]} / ({sources[0]} + {sources[1]})"
        else:
            label = f"share of decoder norm in {sources[s]}"
        ax.set_xlabel(label)
        ax.set_ylabel("latents")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
